"""Training (train.py): sharding equivalence, exact resume (and what may change on resume), gradient
accumulation, non-finite handling, the stages' order (a bad config fails before data work or
compilation), Velvet's logged scalings, auto-scaling, and several processes."""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FRENCH_TOKENIZER, REPO, max_rel, short_run_config
from vesper_jax import checkpoint
from vesper_jax import optim
from vesper_jax import sharding
from vesper_jax import train
from vesper_jax.model import ModelConfig


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """One token cache for the module: every run below reuses the same tokenized corpus."""
  return tmp_path_factory.mktemp('cache')


def _loss_steps(workdir) -> list[int]:
  """Every step with a training-loss line in metrics.jsonl, repeats included (a resumed run's redone steps)."""
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [row['step'] for row in rows if 'loss' in row]


def _losses(workdir) -> dict[int, float]:
  """step → training loss from metrics.jsonl (the last line wins where a resumed run repeats a step)."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'loss' in row:
      out[row['step']] = row['loss']
  return out


@pytest.fixture(scope='module')
def one_device_run(cache_dir, tmp_path_factory) -> pathlib.Path:
  """The 5-step reference run on one device, with checkpoints at steps 3 and 5 (its workdir)."""
  workdir = tmp_path_factory.mktemp('one_device')
  train.train_and_evaluate(short_run_config(cache_dir, **{'train.mesh_data': 1, 'train.mesh_fsdp': 1,
                                                         'checkpoint.every_steps': 3}), workdir)
  return workdir


def test_sharded_runs_match_one_device(cache_dir, one_device_run, tmp_path):
  assert jax.device_count() == 8, 'conftest simulates 8 CPU devices'
  one = _losses(one_device_run)
  assert sorted(one) == [1, 2, 3, 4, 5]
  for name, (data, fsdp) in {'data8': (8, 1), 'data2_fsdp4': (2, 4)}.items():
    train.train_and_evaluate(short_run_config(cache_dir, **{'train.mesh_data': data, 'train.mesh_fsdp': fsdp}),
                             tmp_path / name)
    losses = _losses(tmp_path / name)
    np.testing.assert_allclose([losses[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=1e-5)
  # A checkpoint saved over 8 devices loads in a process that has one (generate/export after training).
  _, params = checkpoint.load_params(tmp_path / 'data2_fsdp4')
  np.save(tmp_path / 'kernel.npy', np.asarray(params['layers_0']['ffn']['gate_proj']['kernel']))
  code = ('import sys, numpy as np; from vesper_jax import checkpoint; '
          '_, p = checkpoint.load_params(sys.argv[1]); '
          'assert (np.asarray(p["layers_0"]["ffn"]["gate_proj"]["kernel"]) == np.load(sys.argv[2])).all()')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'data2_fsdp4'), str(tmp_path / 'kernel.npy')],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]


# ------------------------------------------------------------------------------ what may change on resume

def test_resume_rule_allows_runtime_fields_and_refuses_weight_fields_by_name(cache_dir, tmp_path):
  config = short_run_config(cache_dir)
  train.check_resumable(tmp_path, config)  # a new workdir: nothing to compare with
  (tmp_path / checkpoint.CONFIG_FILE).write_text(config.to_json())
  for key, value in (('dtype', 'bfloat16'), ('remat', True), ('attention_impl', 'xla'), ('max_seq_len', 512)):
    train.check_resumable(tmp_path, short_run_config(cache_dir, **{f'model.{key}': value}))  # allowed
  for key, value, message in (('model.d_model', 256, 'model.d_model 128 -> 256'),
                              ('model.activation', 'silu', "model.activation 'era' -> 'silu'"),
                              ('model.vocab_size', 1024, 'model.vocab_size 512 -> 1024'),
                              ('opt.name', 'velvet', "opt.name = 'adamw', this config has 'velvet'")):
    with pytest.raises(ValueError, match=message):
      train.check_resumable(tmp_path, short_run_config(cache_dir, **{key: value}))


def test_resume_with_runtime_fields_changed_continues_the_run(cache_dir, one_device_run, tmp_path):
  """A real resume from step 3 with remat, the attention implementation and the context length changed:
  steps 4 and 5 come out as in the uninterrupted run. A d_model change is refused, naming the field."""
  workdir = tmp_path / 'run'
  shutil.copytree(one_device_run, workdir)
  shutil.rmtree(workdir / checkpoint.CHECKPOINT_DIR / '5')  # as if the run had stopped after step 3
  overrides = {'train.mesh_data': 1, 'train.mesh_fsdp': 1, 'checkpoint.every_steps': 3}
  with pytest.raises(ValueError, match='model.d_model 128 -> 256'):
    train.train_and_evaluate(short_run_config(cache_dir, **overrides, **{'model.d_model': 256}), workdir)
  summary = train.train_and_evaluate(
      short_run_config(cache_dir, **overrides, **{'model.remat': True, 'model.attention_impl': 'xla',
                                                  'model.max_seq_len': 512}), workdir)
  assert summary['step'] == 5
  assert _loss_steps(workdir) == [1, 2, 3, 4, 5]  # steps 4 and 5 ran once more, replacing their rows
  want, got = _losses(one_device_run), _losses(workdir)
  np.testing.assert_allclose([got[4], got[5]], [want[4], want[5]], rtol=1e-5)


# ------------------------------------------------------------------------------ the step

def _tiny_state(config, batch_size):
  """(initial state, train_step without grad_accum_steps, a random batch) on one device."""
  parts = train.build(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
  step = functools.partial(train.train_step, model=parts.model, tx=parts.tx,
                           schedule=optim.learning_rate_schedule(config.opt, config.train.num_steps))
  tokens = jax.random.randint(jax.random.key(1), (batch_size, 17), 0, config.model.vocab_size)
  return parts.init_fn(jax.random.key(0)), step, {'tokens': tokens}


def test_gradient_accumulation_equals_one_big_batch(cache_dir):
  """4 micro-batches of 4 rows == one batch of 16, over three steps at learning rates 0, peak/2 and peak
  (the warmup of 2): the losses, the gradient norms, how far the parameters moved and AdamW's moments.
  Clipping off: it would rescale a wrongly scaled gradient sum back to the same update and moments."""
  config = short_run_config(cache_dir, **{'opt.grad_clip_norm': 0.0})
  init, step, _ = _tiny_state(config, batch_size=16)
  schedule = optim.learning_rate_schedule(config.opt, config.train.num_steps)
  rates = [float(schedule(s)) for s in range(3)]
  assert rates[0] == 0 < rates[1] < rates[2]
  batches = [{'tokens': jax.random.randint(jax.random.key(10 + t), (16, 17), 0, config.model.vocab_size)}
             for t in range(3)]
  states = {}  # grad_accum_steps → [(state, metrics) after each step]
  for accum in (1, 4):
    state, run, states[accum] = init, jax.jit(functools.partial(step, grad_accum_steps=accum)), []
    for batch in batches:
      state, metrics = run(state, batch)
      states[accum].append((state, metrics))
  for (big, m_big), (acc, m_acc) in zip(states[1], states[4]):
    np.testing.assert_allclose(float(m_acc['loss']), float(m_big['loss']), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc['grad_norm']), float(m_big['grad_norm']), rtol=1e-5)
  big, acc = states[1][-1][0], states[4][-1][0]
  # The moments follow the gradients' scale, which Adam's normalised step all but ignores.
  for moment in ('mu', 'nu'):
    assert max_rel(optax.tree.get(acc.opt_state, moment), optax.tree.get(big.opt_state, moment)) <= 1e-5
  moved_big, moved_acc = ([p - p0 for p, p0 in zip(jax.tree.leaves(s.params), jax.tree.leaves(init.params))]
                          for s in (big, acc))
  # Every parameter moved (Adam's step: up to about Σ rates per element), and by the same amount. On
  # average (1e-6 here): where a gradient is ~0, Adam's normalised step turns a rounding difference
  # (the sums' order) into a visible one, in a handful of elements.
  assert min(float(jnp.max(jnp.abs(d))) for d in moved_big) > sum(rates) / 4
  for a, b in zip(moved_acc, moved_big):
    assert float(jnp.mean(jnp.abs(a - b)) / jnp.mean(jnp.abs(b))) <= 1e-4


def test_auto_grad_accum_steps_follows_the_tokens_per_device(cache_dir):
  # train.grad_accum_steps = 0 (the default): on CPU, micro-batches of about 2,048 tokens per device.
  config = short_run_config(cache_dir, **{'train.batch_size': 128, 'train.grad_accum_steps': 0})  # 4,096
  assert train.build(config, sharding.make_mesh(1, 1, jax.devices()[:1])).grad_accum_steps == 2
  assert train.build(config, sharding.make_mesh(-1, 1)).grad_accum_steps == 1  # 512 tokens per device
  with config.unlocked():
    config.train.grad_accum_steps = 4
  assert train.build(config, sharding.make_mesh(1, 1, jax.devices()[:1])).grad_accum_steps == 4


def test_nonfinite_update_is_skipped_and_counted(cache_dir):
  config = short_run_config(cache_dir)
  state, step, batch = _tiny_state(config, batch_size=4)
  poisoned = state.replace(params=jax.tree.map(lambda p: p, state.params))
  emb = poisoned.params['embeddings']['embedding']
  poisoned.params['embeddings']['embedding'] = emb.at[batch['tokens'][0, 0]].set(jnp.nan)
  new, metrics = jax.jit(functools.partial(step, grad_accum_steps=1))(poisoned, batch)
  assert int(metrics['skipped']) == 1 and int(new.nonfinite_total) == 1
  assert int(new.nonfinite_streak) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((poisoned.params, poisoned.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing moved
  # The learning rate logged is the one the optimizer applies: its count did not advance on the skip.
  _, metrics = jax.jit(functools.partial(step, grad_accum_steps=1))(new, batch)
  schedule = optim.learning_rate_schedule(config.opt, config.train.num_steps)
  assert float(schedule(1)) > 0 and float(metrics['learning_rate']) == float(schedule(0))
  good, metrics = jax.jit(functools.partial(step, grad_accum_steps=1))(state, batch)
  assert int(metrics['skipped']) == 0 and int(good.nonfinite_streak) == 0


def _velvet_parts(cache_dir, kernel, mesh=None, platform=None, **overrides):
  config = short_run_config(cache_dir, **{'opt.name': 'velvet', 'opt.kernel': kernel, **overrides})
  return config, train.build(config, mesh or sharding.make_mesh(1, 1, jax.devices()[:1]), platform=platform)


def test_in_place_kernel_paths_match_the_optax_tree_path(cache_dir):
  """The real train step: Velvet on the parameter tree through optax (clip, velvet, apply_updates) ==
  the flat state updated in place by XLA == by the Pallas kernel (interpret mode), over 4 steps with a
  poisoned (skipped) batch among them that leaves the whole flat state bit for bit unchanged."""
  tokens = [jax.random.randint(jax.random.key(t), (8, 17), 0, 512) for t in range(4)]
  results = {}
  for kernel in ('xla', 'xla_flat', 'pallas'):
    _, parts = _velvet_parts(cache_dir, kernel)
    state = parts.init_fn(jax.random.key(0))
    assert (parts.layout is None) == (kernel == 'xla')
    for t, batch in enumerate(tokens):
      if t == 2 and kernel != 'xla':
        before = jax.tree.map(np.asarray, state)
        new, metrics = _nan_loss_step(parts, state, batch)
        assert int(metrics['skipped']) == 1
        after = jax.tree.map(np.asarray, new.replace(step=state.step, nonfinite_streak=state.nonfinite_streak,
                                                     nonfinite_total=state.nonfinite_total))
        jax.tree.map(np.testing.assert_array_equal, after, before)
      state, metrics = parts.step_fn(state, {'tokens': batch})
      assert int(metrics['skipped']) == 0
    results[kernel] = (parts.param_tree(state.params), metrics)
  tree, _ = results['xla']
  for kernel in ('xla_flat', 'pallas'):
    params, metrics = results[kernel]
    # Each path is fused differently (XLA may contract a·b + c into one rounding), and the model feeds a
    # last-bit difference back into the next gradients; with identical inputs the paths agree to 1e-6
    # (tests/test_velvet_kernel.py).
    assert max_rel(params, tree) <= 5e-5, kernel
    assert float(metrics['s_entropy']) == pytest.approx(float(results['xla'][1]['s_entropy']), rel=1e-5)


def test_in_place_velvet_on_8_devices_matches_one_and_resumes_exactly(cache_dir, tmp_path):
  """The Pallas in-place path with its flat buffers split over 'fsdp' (data=2 × fsdp=4) or replicated
  (data=8) gives the one-device losses; its checkpoints resume exactly and load as a parameter tree."""
  velvet_pallas = {'opt.name': 'velvet', 'opt.kernel': 'pallas', 'checkpoint.every_steps': 3}
  runs = {'one': (1, 1), 'data8': (8, 1), 'data2_fsdp4': (2, 4)}
  for name, (data, fsdp) in runs.items():
    train.train_and_evaluate(short_run_config(cache_dir, **velvet_pallas, **{'train.mesh_data': data,
                                                                             'train.mesh_fsdp': fsdp}),
                             tmp_path / name)
  one = _losses(tmp_path / 'one')
  for name in ('data8', 'data2_fsdp4'):
    losses = _losses(tmp_path / name)
    np.testing.assert_allclose([losses[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=1e-5)
  # Inference reads the tree from the flat checkpoint (flat_layout.json says where each leaf lives).
  assert (tmp_path / 'data2_fsdp4' / checkpoint.LAYOUT_FILE).is_file()
  step, params = checkpoint.load_params(tmp_path / 'data2_fsdp4')
  assert step == 5 and params['layers_0']['ffn']['gate_proj']['kernel'].shape == (128, 384)
  _, inference_params, _ = checkpoint.load_for_inference(tmp_path / 'data2_fsdp4')  # generate/chat/export
  assert jax.tree.structure(inference_params) == jax.tree.structure(params)
  _, params_one = checkpoint.load_params(tmp_path / 'one')
  # Loose: Adam's normalised step turns a last-bit gradient difference (the reduction order over
  # devices) into a visible move where a gradient is ~0; the losses above are the equivalence. A wrong
  # layout (a leaf read from another slice) would be off by O(1).
  assert max_rel(params, params_one) <= 1e-3
  # Resume from step 3 of the one-device run: steps 4 and 5 as uninterrupted.
  workdir = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'one', workdir)
  shutil.rmtree(workdir / checkpoint.CHECKPOINT_DIR / '5')
  train.train_and_evaluate(short_run_config(cache_dir, **velvet_pallas, **{'train.mesh_data': 1,
                                                                           'train.mesh_fsdp': 1}), workdir)
  got = _losses(workdir)
  assert [got[4], got[5]] == [one[4], one[5]]
  # Another layout of the buffers (here: the embeddings decayed) is refused before any restore.
  with pytest.raises(ValueError, match='flat checkpoints laid out as'):
    train.train_and_evaluate(short_run_config(cache_dir, **velvet_pallas, **{
        'train.mesh_data': 1, 'train.mesh_fsdp': 1, 'opt.decay_embeddings': True, 'train.num_steps': 6}),
        workdir)
  # The flat state and the tree state are different structures: switching is refused by name.
  with pytest.raises(ValueError, match="opt.kernel in .* = True, this config has False"):
    train.check_resumable(workdir, short_run_config(cache_dir, **{'opt.name': 'velvet', 'opt.kernel': 'xla'}))


@pytest.mark.parametrize('data, fsdp', [(1, 1), (2, 4)])
def test_in_place_pallas_train_step_lowers_for_cuda(cache_dir, monkeypatch, data, fsdp):
  """The whole jitted step (not run) lowered for CUDA with the compiled kernel: one Triton call per flat
  buffer, each writing p, m, v over its inputs, per shard on a split mesh; the state donated."""
  import re
  # The one reason to skip: a jaxlib built without the Triton dialect that Pallas lowers to for GPUs
  # (jax then says only 'Cannot lower pallas_call on platform: gpu'). Any other error fails the test.
  pytest.importorskip('jaxlib.triton.dialect', reason='this jaxlib has no Triton dialect (jaxlib.triton)')
  from vesper_jax.kernels import velvet_pallas
  monkeypatch.setattr(velvet_pallas, 'velvet_update',
                      functools.partial(velvet_pallas.velvet_update, interpret=False))
  # The GPU's choices (platforms.py): the graph lowered is the one a GPU would run, not the CPU's.
  config, parts = _velvet_parts(cache_dir, 'pallas', sharding.make_mesh(data, fsdp), platform='gpu')
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          parts.abstract_state, parts.state_shardings)
  batch = {'tokens': jax.ShapeDtypeStruct((8, 33), jnp.int32, sharding=parts.batch_sharding)}
  text = parts.step_fn.trace(abstract, batch).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('__gpu$xla.gpu.triton') == len(parts.layout.buffers) == 2
  aliases = re.findall(r'output_tuple_indices = \[(\d)\], operand_index = (\d)', text)
  assert sorted(aliases) == sorted([('0', '1'), ('1', '3'), ('2', '4')] * 2)  # p, m, v over themselves
  assert 'tf.aliasing_output' in text  # the donated state
  assert 'optimization_barrier' not in text and '@vesper_' not in text  # no CPU layout copies, no CPU kernels


def _nan_loss_step(parts, state, batch):
  """One in-place step whose loss is NaN (as a diverged model gives), through train.train_step."""
  real_loss = train._loss
  try:
    train._loss = lambda *a, **k: jax.tree.map(lambda x: x * jnp.nan, real_loss(*a, **k))
    step = functools.partial(train.train_step, model=parts.model, tx=parts.tx,
                             schedule=lambda count: 1e-3, grad_accum_steps=1, layout=parts.layout,
                             in_place=parts.in_place, grad_clip_norm=1.0)
    return jax.jit(step)(state, {'tokens': batch})
  finally:
    train._loss = real_loss


def test_consecutive_nonfinite_steps_stop_the_run(cache_dir, tmp_path, monkeypatch):
  config = short_run_config(cache_dir, **{'train.num_steps': 4, 'checkpoint.every_steps': 4})
  train.train_and_evaluate(config, tmp_path)  # a good checkpoint at step 4
  before = checkpoint.load_params(tmp_path)[1]

  real_loss = train._loss
  monkeypatch.setattr(train, '_loss', lambda *a, **k: jax.tree.map(lambda x: x * jnp.nan, real_loss(*a, **k)))
  config = short_run_config(cache_dir, **{'train.num_steps': 20, 'checkpoint.every_steps': 2,
                                 'train.max_nonfinite_steps': 3})
  with pytest.raises(train.NonFiniteError, match='3 consecutive') as error:
    train.train_and_evaluate(config, tmp_path)
  step, after = checkpoint.load_params(tmp_path)
  # One line for the person: which checkpoint to go back to (skipped updates left the state as it was).
  assert f'Last checkpoint: step {step} in {tmp_path}' in str(error.value) and '\n' not in str(error.value)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['skipped'] for r in rows if r['step'] > 4 and 'skipped' in r][:3] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize('override,match', [
    ({'train.bogus_key': 1}, "unknown config key 'train.bogus_key'"),
    ({'data.seq_len': 1024}, r'data.seq_len=1024 must be in \[1, model.max_seq_len=256\]'),
    ({'data.sources': '/nonexistent/corpus.txt'}, '/nonexistent/corpus.txt'),
    ({'train.grad_accum_steps': -1}, r'train.grad_accum_steps=-1 must be >= 0 \(0 = auto\)'),
])
def test_bad_config_fails_before_compiling(cache_dir, tmp_path, override, match, monkeypatch):
  built = []
  monkeypatch.setattr(train, 'build', lambda *a, **k: built.append(1))
  config = short_run_config(cache_dir)
  (key, value), = override.items()
  section, name = key.split('.')
  with config.unlocked():
    config[section][name] = value
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    train.train_and_evaluate(config, tmp_path)
  assert not built


@pytest.mark.parametrize('key, value', [('opt.name', 'sgd'), ('opt.kernel', 'cuda'),
                                        ('checkpoint.every_steps', 0)])
def test_bad_config_is_refused_before_any_data_work(tmp_path, key, value):
  cache = tmp_path / 'cache'
  with pytest.raises(ValueError, match=f'{key}='):
    train.train_and_evaluate(short_run_config(cache, **{key: value}), tmp_path / 'run')
  assert not cache.exists() or not any(cache.iterdir())  # no tokenizer trained, no token cache built
  assert not (tmp_path / 'run').exists()


def test_tokenizer_larger_than_model_is_refused(cache_dir, tmp_path):
  config = short_run_config(cache_dir, **{'data.tokenizer': str(FRENCH_TOKENIZER)})  # 1,000 tokens
  with pytest.raises(ValueError, match=r'1,?000.*512|512.*1,?000'):
    train.train_and_evaluate(config, tmp_path)


# ------------------------------------------------------------------------------ subprocess runs

def _cli(workdir, cache_dir, *extra):
  args = [sys.executable, '-m', 'vesper_jax.train', '--config=configs/tiny.py', f'--workdir={workdir}',
          '--config.model.vocab_size=512', '--config.data.seq_len=32', f'--config.data.cache_dir={cache_dir}',
          '--config.train.batch_size=8', '--config.train.eval_every=1000', '--config.train.eval_tokens=512',
          '--config.train.sample_prompt=', '--config.logging.every_steps=1',
          '--config.logging.progress_bar=False', '--config.opt.warmup_steps=2', *extra]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  return args, env


def _wait_for(predicate, *procs, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    for proc in procs:
      if proc.poll() is not None:
        raise AssertionError(f'process exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}')
    time.sleep(0.05)
  raise AssertionError('timed out')


def _logged_steps(workdir) -> int:
  """How many training-loss rows metrics.jsonl holds so far (0 before it exists)."""
  metrics = pathlib.Path(workdir) / 'metrics.jsonl'
  return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.fixture(scope='module')
def uninterrupted(cache_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  args, env = _cli(workdir, cache_dir, '--config.train.num_steps=20', '--config.checkpoint.every_steps=5')
  subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  return _losses(workdir)


def test_resume_after_sigterm_is_exact(cache_dir, tmp_path, uninterrupted):
  args, env = _cli(tmp_path, cache_dir, '--config.train.num_steps=20', '--config.checkpoint.every_steps=100')
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 8, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
  stopped_at = max(_losses(tmp_path))
  assert stopped_at < 20, 'the run should have stopped early'
  assert (tmp_path / 'checkpoints' / str(stopped_at)).is_dir(), 'the signal saved the step it stopped at'
  subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  resumed = _losses(tmp_path)
  # Each step ran once: the second run continued from the signal's checkpoint, not from scratch.
  assert _loss_steps(tmp_path) == list(range(1, 21))
  for s in range(stopped_at + 1, 21):
    assert resumed[s] == uninterrupted[s], f'step {s}: {resumed[s]!r} != {uninterrupted[s]!r}'


def test_resume_after_sigkill_is_exact(cache_dir, tmp_path, uninterrupted):
  args, env = _cli(tmp_path, cache_dir, '--config.train.num_steps=20', '--config.checkpoint.every_steps=10',
                   '--config.checkpoint.async_save=False')
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  # Saves are synchronous here: once step 12 is logged, the step-10 checkpoint is complete.
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 12, proc)
  proc.kill()
  proc.wait(timeout=60)
  assert (tmp_path / 'checkpoints' / '10').is_dir()
  subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  resumed = _losses(tmp_path)
  # Steps 1-10 ran once (the second run restored step 10); only steps after it may repeat.
  assert [s for s in _loss_steps(tmp_path) if s <= 10] == list(range(1, 11))
  for s in range(11, 21):
    assert resumed[s] == uninterrupted[s], f'step {s}: {resumed[s]!r} != {uninterrupted[s]!r}'


def test_signal_on_a_checkpoint_step_saves_it_once_and_stops(cache_dir, tmp_path, monkeypatch):
  """SIGTERM arriving on a step that is also a checkpoint step: one save, a clean stop (no orbax
  'step already exists' error)."""
  real_build = train.build

  def build(config, mesh):
    parts = real_build(config, mesh)
    calls = []

    def step_fn(state, batch):
      calls.append(1)
      if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by train's flag: stop after step 2
      return parts.step_fn(state, batch)
    return dataclasses.replace(parts, step_fn=step_fn)

  monkeypatch.setattr(train, 'build', build)
  summary = train.train_and_evaluate(
      short_run_config(cache_dir, **{'checkpoint.every_steps': 2, 'train.mesh_data': 1}), tmp_path)
  assert summary['stopped_by_signal'] and summary['step'] == 2
  assert checkpoint.load_params(tmp_path)[0] == 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_two(workdir, cache_dir, *extra) -> list[subprocess.Popen]:
  """Two processes of one run (jax.distributed over localhost, CPU collectives), one device each."""
  port = _free_port()
  procs = []
  for pid in range(2):
    args, env = _cli(workdir, cache_dir, *extra, f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', f'--process_id={pid}')
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def test_two_processes_match_one(cache_dir, tmp_path):
  """jax.distributed over localhost with CPU (gloo) collectives: 2 processes × 1 device."""
  procs = _start_two(tmp_path, cache_dir, '--config.train.num_steps=3', '--config.checkpoint.every_steps=100')
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  losses = _losses(tmp_path)  # written by process 0 only
  single = tmp_path / 'single'
  train.train_and_evaluate(short_run_config(cache_dir, **{'train.num_steps': 3, 'train.mesh_data': 1}), single)
  expected = _losses(single)
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('who,gap', [('both', 0.2), ('process 0', 0.0)])
def test_sigterm_at_different_moments_saves_one_step_everywhere(who, gap, cache_dir, tmp_path):
  """Preemption of a multi-host run: a SIGTERM that reaches the processes at different moments (or only
  one of them) makes every process save the same step and exit 0."""
  workdir = tmp_path / 'run'
  procs = _start_two(workdir, cache_dir, '--config.train.num_steps=5000',
                     '--config.logging.tensorboard=False', '--config.checkpoint.every_steps=100000')
  try:
    _wait_for(lambda: _logged_steps(workdir) >= 3, *procs, timeout=300)
    procs[0].send_signal(signal.SIGTERM)
    if who == 'both':
      time.sleep(gap)
      procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  summary = json.loads(outputs[0][0][outputs[0][0].index('{'):])
  assert summary['stopped_by_signal'] and summary['step'] < 5000
  assert checkpoint.load_params(workdir)[0] == summary['step']


def test_velvet_run_logs_its_scalings(cache_dir, tmp_path):
  config = short_run_config(cache_dir, **{'opt.name': 'velvet', 'train.num_steps': 3, 'train.mesh_data': 1})
  train.train_and_evaluate(config, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines() if '"loss"' in l]
  assert len(rows) == 3
  for row in rows:
    # s_E = clip(Ĥ / 0.5) with Ĥ the logged entropy / ln V; the perplexity (~V) is far above the
    # pivot of 40, so s_P sits at its floor and β1 = clip(0.9 · 0.5) = 0.5.
    expected = min(max(row['entropy'] / np.log(512) / 0.5, 0.5), 2.0)
    assert row['s_entropy'] == pytest.approx(expected, rel=1e-5)
    assert row['s_perplexity'] == pytest.approx(0.5) and row['beta1'] == pytest.approx(0.5)


def test_auto_scale_picks_chinchilla_steps_capped_by_the_cache(cache_dir):
  config = short_run_config(cache_dir)  # tiny at vocab 512: 20·N tokens is far more than a small cache holds
  n = train.abstract_param_counts(ModelConfig(**config.model))['total']
  tokens_per_step = config.train.batch_size * config.data.seq_len
  assert train.auto_scale_steps(config, cached_tokens=10 ** 12) == -(-20 * n // tokens_per_step)
  assert train.auto_scale_steps(config, cached_tokens=100_000) == -(-100_000 // tokens_per_step)
