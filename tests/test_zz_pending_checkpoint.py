"""PENDING (merge into test_checkpoint.py / test_train.py): damaged checkpoints fall back to the newest good one."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vesper_jax import checkpoint
from vesper_jax import config as base_config
from vesper_jax import train


def _config(cache_dir, steps):
  config = base_config.short_run(load_config('tiny'), steps, evaluations=0)
  config.model.vocab_size, config.data.seq_len, config.train.batch_size = 512, 32, 8
  config.data.cache_dir = str(cache_dir)
  config.checkpoint.every_steps, config.checkpoint.keep = 3, 5
  config.train.mesh_data = 1
  return config


@pytest.fixture(scope='module')
def run6(tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6 (copied per test before damaging it)."""
  root = tmp_path_factory.mktemp('faults')
  train.train_and_evaluate(_config(root / 'cache', 6), root / 'run')
  return root


def _copy(run6, tmp_path) -> pathlib.Path:
  import shutil
  shutil.copytree(run6 / 'run', tmp_path / 'run')
  return tmp_path / 'run'


def _truncate(workdir):
  data_dir = workdir / 'checkpoints' / '6' / 'default' / 'd'
  for f in data_dir.iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty_metadata(workdir):
  (workdir / 'checkpoints' / '6' / 'default' / '_METADATA').write_text('')


def _non_finite(workdir):
  """Step 6 rewritten with NaN parameters (as flipped bytes that decode to NaN would leave it)."""
  config = _config(workdir.parent / 'unused', 6)
  mesh = train.sharding.make_mesh(1, 1)
  parts = train.build(config, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          parts.abstract_state, parts.state_shardings)
  ckpt = checkpoint.Checkpointer(workdir, keep=5, async_save=False)
  state = ckpt.restore(6, abstract)
  state = state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params))
  import shutil
  shutil.rmtree(workdir / 'checkpoints' / '6')
  ckpt.close()
  ckpt = checkpoint.Checkpointer(workdir, keep=5, async_save=False)
  ckpt.save(6, state)
  ckpt.close()


@pytest.mark.parametrize('damage', [_truncate, _empty_metadata, _non_finite])
def test_damaged_latest_checkpoint_falls_back(damage, run6, tmp_path):
  workdir = _copy(run6, tmp_path)
  damage(workdir)
  step, params = checkpoint.load_params(workdir)  # inference: the newest good one, parameters only
  assert step == 3 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  summary = train.train_and_evaluate(_config(run6 / 'cache', 8), workdir)  # resume: from step 3
  assert summary['step'] == 8
  damaged = list((workdir / checkpoint.DAMAGED_DIR).iterdir())
  assert len(damaged) == 1 and damaged[0].name.startswith('6-')
  assert checkpoint.load_params(workdir)[0] == 8


def test_no_restorable_checkpoint_is_one_error_naming_the_directory(run6, tmp_path):
  workdir = _copy(run6, tmp_path)
  for step in ('3', '6'):
    (workdir / 'checkpoints' / step / 'default' / '_METADATA').write_text('')
  with pytest.raises(ValueError, match=str(workdir / 'checkpoints')):
    checkpoint.load_params(workdir)
  with pytest.raises(ValueError, match='none of the checkpoints'):
    train.train_and_evaluate(_config(run6 / 'cache', 8), workdir)


def test_inference_restores_parameters_only(run6):
  step, params = checkpoint.load_params(run6 / 'run')
  assert step == 6 and set(params) >= {'embeddings', 'lm_head', 'layers_0'}
