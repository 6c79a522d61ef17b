"""Checkpoints and workdirs (checkpoint.py): save/restore round trips (sharded too), the last K kept,
asynchronous saves, the workdir's config.json and tokenizer copy, the errors that name the path, and
damaged checkpoints that fall back to the newest good one (for inference and for a resumed run).
(Checkpoints saved over 8 devices and loaded with one: test_train.py.)"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config, make_workdir, short_run_config
from vesper_jax import checkpoint, sharding, train
from vesper_jax.model import ModelConfig


def _state(seed: int):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {'params': {'w': jax.random.normal(keys[0], (8, 4)), 'b': jax.random.normal(keys[1], (4,))},
          'step': jnp.array(seed, jnp.int32)}


def test_save_restore_round_trip_keeps_the_last_k(tmp_path):
  checkpointer = checkpoint.Checkpointer(tmp_path, keep=2, async_save=False)
  assert checkpointer.latest_step() is None
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step))
  assert checkpointer.latest_step() == 3
  assert sorted(int(p.name) for p in (tmp_path / checkpoint.CHECKPOINT_DIR).iterdir()) == [2, 3]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  for step in (2, 3):
    jax.tree.map(np.testing.assert_array_equal, checkpointer.restore(step, abstract), _state(step))
  checkpointer.close()


def test_async_save_is_on_disk_after_wait_and_restores_onto_a_mesh(tmp_path):
  checkpointer = checkpoint.Checkpointer(tmp_path, keep=3, async_save=True)
  checkpointer.save(7, _state(7))
  checkpointer.wait()
  assert (tmp_path / checkpoint.CHECKPOINT_DIR / '7').is_dir()
  shardings = sharding.state_shardings(_state(7), sharding.make_mesh(2, 4))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _state(0), shardings)
  restored = checkpointer.restore(7, abstract)
  checkpointer.close()
  assert restored['params']['w'].sharding.spec == jax.sharding.PartitionSpec('fsdp', None)  # [8, 4]
  jax.tree.map(np.testing.assert_array_equal, restored, _state(7))


def test_workdir_metadata_and_load_for_inference(tmp_path):
  workdir = make_workdir(tmp_path / 'run', num_kv_heads=2)
  config = checkpoint.read_config(workdir)
  assert config.model.num_kv_heads == 2 and config.to_dict().keys() == load_config('tiny').to_dict().keys()
  assert (workdir / checkpoint.TOKENIZER_FILE).read_bytes() == (workdir / 'bpe.json').read_bytes()
  assert not list(workdir.glob('*.tmp'))  # written atomically
  model_config, params, tokenizer = checkpoint.load_for_inference(workdir)
  assert model_config == ModelConfig(**config.model).replace(platform='cpu')  # the loader's devices decide it
  step, again = checkpoint.load_params(workdir)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert tokenizer.vocab_size == model_config.vocab_size
  assert tokenizer.encode('The quick brown fox') and tokenizer.path == str(workdir / checkpoint.TOKENIZER_FILE)


def test_a_directory_that_is_not_a_workdir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/config.json: no config.json'):
    checkpoint.read_config(tmp_path)
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/checkpoints: no checkpoint'):
    checkpoint.load_params(tmp_path)


# ------------------------------------------------------------------------------ damaged checkpoints

def _run_config(root, steps):
  return short_run_config(root / 'cache', **{'train.num_steps': steps, 'checkpoint.every_steps': 3,
                                             'checkpoint.keep': 5, 'train.mesh_data': 1})


@pytest.fixture(scope='module')
def run6(tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6 (copied per test before damaging it)."""
  root = tmp_path_factory.mktemp('faults')
  train.train_and_evaluate(_run_config(root, 6), root / 'run')
  return root


def _copy(run6, tmp_path):
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
  parts = train.build(_run_config(workdir.parent, 6), sharding.make_mesh(1, 1))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          parts.abstract_state, parts.state_shardings)
  ckpt = checkpoint.Checkpointer(workdir, keep=5, async_save=False)
  state = ckpt.restore(6, abstract)
  state = state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params))
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
  summary = train.train_and_evaluate(_run_config(run6, 8), workdir)  # resume: from step 3
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
    train.train_and_evaluate(_run_config(run6, 8), workdir)


def _corrupt_moments(workdir, step: int) -> set[str]:
  """Overwrites the data of every optimizer moment (mu, nu) of checkpoint `step` on disk with bytes that
  are no array chunk; returns the moments' names. Their zarr headers stay: orbax's metadata() opens every
  array's header (shape, dtype) to describe the tree, so that much of each moment is read. (The arrays
  share OCDBT data files, so their keys are rewritten, not files.)"""
  import tensorstore as ts
  item = workdir / checkpoint.CHECKPOINT_DIR / str(step) / 'default'
  kvstore = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{item}/'}).result()
  keys = [k.decode() for k in kvstore.list().result()]
  moments = [k for k in keys if k.startswith('opt_state.') and ('.mu.' in k or '.nu.' in k)
             and not k.endswith('/.zarray')]
  for key in moments:
    kvstore.write(key, b'not an array').result()
  return {k.split('/')[0] for k in moments}


def test_inference_never_reads_the_optimizer_moments(run6, tmp_path):
  """The data of every moment of step 6 unreadable on disk: resuming (the whole state) fails on it, while
  the inference restore still loads step 6's parameters, unchanged — step 6, not a fallback to step 3."""
  workdir = _copy(run6, tmp_path)
  _, want = checkpoint.load_params(workdir)
  moments = _corrupt_moments(workdir, 6)
  assert len(moments) == 2 * len(jax.tree.leaves(want))  # AdamW's mu and nu for each parameter
  parts = train.build(_run_config(run6, 6), sharding.make_mesh(1, 1))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          parts.abstract_state, parts.state_shardings)
  checkpointer = checkpoint.Checkpointer(workdir, keep=5, async_save=False)
  with pytest.raises(Exception, match='opt_state'):  # the damage bites whoever reads the moments
    checkpointer.restore(6, abstract)
  checkpointer.close()
  step, params = checkpoint.load_params(workdir)
  assert step == 6 and set(params) >= {'embeddings', 'lm_head', 'layers_0'}
  jax.tree.map(np.testing.assert_array_equal, params, want)


# ------------------------------------------------------------------------------ torn, read by the CLIs

# `python -c _SLOW_READS <entry> <flags>` runs `python -m vesper_jax.<entry> <flags>` as on a busy machine,
# reproducibly: every other array read of orbax waits 0.3 s, so the first torn read fails while its
# siblings are still pending (on an idle machine they have mostly all failed by then). Those pending reads
# once printed a page of 'Exception ignored in: <coroutine ...>' after the one-line error.
_SLOW_READS = """
import asyncio, itertools, runpy, sys
from orbax.checkpoint._src.serialization import serialization
read, count = serialization._read_shard, itertools.count()
async def slow_read(*args, **kwargs):
  if next(count) % 2:
    await asyncio.sleep(0.3)
  return await read(*args, **kwargs)
serialization._read_shard = slow_read
runpy.run_module('vesper_jax.' + sys.argv.pop(1), run_name='__main__', alter_sys=True)
"""


@pytest.mark.parametrize('entry', ['generate', 'export'])
def test_torn_checkpoint_is_one_line_on_a_busy_machine(entry, inference_workdir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(inference_workdir, workdir)
  torn = list((workdir / checkpoint.CHECKPOINT_DIR).glob('*/default/ocdbt.process_0/d/*'))  # array data
  assert torn
  for path in torn:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  flags = [f'--workdir={workdir}'] + ([f'--out={tmp_path / "out"}'] if entry == 'export' else [])
  out = subprocess.run([sys.executable, '-c', _SLOW_READS, entry, *flags], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
  assert out.returncode == 1, out.stderr[-3000:]
  lines = out.stderr.splitlines()
  assert len(lines) == 1, out.stderr[:3000]
  directory = workdir / checkpoint.CHECKPOINT_DIR
  assert lines[0].startswith(f'vesper_jax.{entry}: error: {directory}: no checkpoint could be loaded')
