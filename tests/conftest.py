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


def short_run_config(cache_dir, **overrides):
  """A seconds-long tiny training run (vocab 512, 32-token windows, batch 8, 5 steps, quiet logging).

  Args:
    cache_dir: the token cache directory (share one per module so the corpus is tokenized once).
    **overrides: 'section.key' → value, e.g. short_run_config(d, **{'train.num_steps': 20}).
  """
  config = load_config('tiny')
  config.model.vocab_size = 512
  config.data.seq_len = 32
  config.data.cache_dir = str(cache_dir)
  config.train.batch_size = 8
  config.train.num_steps = 5
  config.train.eval_every = 1000
  config.train.eval_batches = 2
  config.train.sample_prompt = ''
  config.opt.warmup_steps = 2
  config.checkpoint.every_steps = 1000
  config.checkpoint.async_save = False
  config.logging.every_steps = 1
  config.logging.progress_bar = False
  config.logging.tensorboard = False
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config
