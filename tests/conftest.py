"""Shared test fixtures. Tests run on CPU; 8 host devices are simulated for the sharding tests."""

import os
import pathlib

# Must be set before jax is imported anywhere: simulate 8 CPU devices so sharding tests can run.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data, or skip the test with the reason."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real corpora not found at {SHARED_DATA} (see README: Tests)')
  return SHARED_DATA


def load_config(name: str):
  """configs/<name>.py's get_config(), loaded by path as the train entry point does."""
  from vesper_jax import config as base_config
  return base_config.load_config_file(REPO / 'configs' / f'{name}.py')
