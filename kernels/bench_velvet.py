"""Velvet update throughput against optax.adamw and a device-to-device copy (SPEC §8, issue 5).

    python kernels/bench_velvet.py                      # GPU: the medium and large parameter trees
    python kernels/bench_velvet.py --quick              # any machine: the tiny tree, few iterations
    python kernels/bench_velvet.py --e2e                # also a whole train step (fwd + bwd + update)

Every timed function is a whole optimizer step as a jitted train step runs it: (params, grads, state) in,
(params, grads, state) out, all donated, so buffers are updated in place and nothing is copied that a
train step would not copy.

Paths:
  adamw            tree: optax.adamw(mask=decay mask) + optax.apply_updates
  velvet-xla       tree: velvet(kernel='xla') + optax.apply_updates (opt.kernel 'xla', today's 'auto')
  velvet-xla_flat  flat: velvet_in_place(kernel='xla_flat'): the same math, XLA-fused, p written in place
  velvet-pallas-b* flat: velvet_in_place(kernel='pallas'): one aliased Pallas launch per buffer
  velvet-triton-b* flat: velvet_in_place(kernel='triton'): jax-triton (skipped, with the reason, without it)
  copy             jnp.copy of a buffer of 14 bytes/param: reads and writes the same 28 bytes/param
("flat" = the buffers of velvet.flat_layout, one per decay group and dtype, as the train state holds them.)

GB/s counts 28 bytes per parameter (read p, g, m, v; write p, m, v) whatever a path really moves, so
the fraction of the copy rate is the fraction of the floor reached. Times are medians over repeats of
back-to-back calls (dispatch overlapped), after warm-up. The table comes last; JSON goes to --json.
"""

import functools
import json
import math
import os
import pathlib
import statistics
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from vesper_jax import config as base_config  # noqa: E402
from vesper_jax import losses, optim  # noqa: E402
from vesper_jax import model as model_lib  # noqa: E402
from vesper_jax import velvet  # noqa: E402
from vesper_jax.kernels import velvet_triton  # noqa: E402

_QUICK = flags.DEFINE_bool('quick', False, 'The tiny tree and few iterations (CPU check of the script).')
_SIZES = flags.DEFINE_list('sizes', ['medium', 'large'], 'Configs (configs/<name>.py) whose trees are timed.')
_ITERS = flags.DEFINE_integer('iters', 20, 'Back-to-back calls per timed repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (median reported).')
_BLOCKS = flags.DEFINE_list('block_sizes', ['1024', '4096'], 'Pallas block sizes to try (powers of two).')
_E2E = flags.DEFINE_bool('e2e', False, 'Also time a whole train step (forward, backward, update).')
_E2E_BATCH = flags.DEFINE_integer('e2e_batch', 8, 'Sequences per end-to-end step (at the config seq_len).')
_JSON = flags.DEFINE_string('json', None, 'Results JSON (default: $OUT/bench_velvet.json if $OUT is set, '
                            'else experiments/results/bench_velvet.json).')

BYTES_PER_PARAM = 28
_HP = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def _model_config(name: str) -> model_lib.ModelConfig:
  fields = model_lib.ModelConfig.__dataclass_fields__
  return model_lib.ModelConfig(**{k: v for k, v in base_config.load_config_file(name).model.items() if k in fields})


def _random_tree(shapes, seed: int, scale: float):
  """Random float32 leaves of the given shapes, made on the device (no host transfer of 100s of MB)."""
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.float32) * scale, static_argnums=1)
  return treedef.unflatten([make(k, tuple(s.shape)) for k, s in zip(keys, leaves)])


def _time(fn, args, iters: int, repeats: int) -> tuple[float, tuple]:
  """Median seconds per call of `args = fn(*args)`; returns it and the final args (donation chain)."""
  for _ in range(2):
    args = fn(*args)
  jax.block_until_ready(args)
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      args = fn(*args)
    jax.block_until_ready(args)
    samples.append((time.perf_counter() - start) / iters)
  return statistics.median(samples), args


def _optax_step(tx, hand_back_updates: bool = False):
  """A jitted optimizer step through the optax contract, everything donated.

  With `hand_back_updates` (the Pallas path) u, written over the gradient buffer, is returned as the
  next call's gradient, so the kernel's output buffer is reused rather than reallocated.
  """
  def step(params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params, loss=jnp.float32(3.0),
                                   entropy=jnp.float32(0.4))
    return optax.apply_updates(params, updates), (updates if hand_back_updates else grads), opt_state
  return jax.jit(step, donate_argnums=(0, 1, 2))


def _in_place_step(opt: velvet.InPlace):
  """The train step's optimizer stage on the flat buffers: velvet_in_place's step with its scalars
  (clip factor, skip flag) as the train step passes them, writing p, m, v in place."""
  def step(params, grads, state):
    params, state = opt.step(params, grads, state, loss=jnp.float32(3.0), entropy=jnp.float32(0.4),
                             grad_scale=jnp.float32(0.5), ok=jnp.bool_(True))
    return params, grads, state
  return jax.jit(step, donate_argnums=(0, 1, 2))


def bench_tree(name: str, model_cfg: model_lib.ModelConfig, iters: int, repeats: int,
               block_sizes: list[int]) -> list[dict]:
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg), jax.random.key(0))
  n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  mask = optim.decay_mask(shapes, decay_embeddings=False)
  layout = velvet.flat_layout(shapes, mask)
  rows = []

  def record(path: str, layout_name: str, seconds: float):
    gbps = BYTES_PER_PARAM * n / seconds / 1e9
    rows.append({'tree': name, 'params': n, 'leaves': len(jax.tree.leaves(shapes)), 'path': path,
                 'layout': layout_name, 'ms': seconds * 1e3, 'gb_per_s': gbps})
    print(f'  {name:8s} {path:24s} {layout_name:5s} {seconds * 1e3:9.3f} ms  {gbps:8.1f} GB/s', flush=True)

  # The copy first: the reference the others are measured against, in the same process and memory state.
  copy_src = jax.jit(lambda k: jax.random.normal(k, (BYTES_PER_PARAM * n // 8,), jnp.float32))(
      jax.random.key(9))
  # Each call copies the same source into the previous copy's (donated) buffer, so no call pays for
  # fresh memory, as the in-place updates do not.
  copy = jax.jit(lambda src, dst: jnp.copy(src), donate_argnums=1)
  seconds, _ = _time(lambda src, dst: (src, copy(src, dst)), (copy_src, jnp.copy(copy_src)), iters,
                     repeats)
  record('copy', '-', seconds)
  del copy_src

  def fresh(flat: bool):
    p = _random_tree(shapes, 0, 0.02)
    g = _random_tree(shapes, 1, 1e-3)
    return (layout.flatten(p), layout.flatten(g)) if flat else (p, g)

  # The parameter tree through optax (what a user who chains Velvet runs), and AdamW as the reference.
  for path, tx in (('adamw', optax.adamw(1e-3, mask=mask, **_HP)),
                   ('velvet-xla', velvet.velvet(1e-3, mask=mask, kernel='xla', **_HP))):
    p, g = fresh(False)
    seconds, _ = _time(_optax_step(tx), (p, g, tx.init(p)), iters, repeats)
    record(path, 'tree', seconds)
  # The flat buffers updated in place (the train state's form on the kernel paths).
  hp = {k: v for k, v in _HP.items() if k != 'weight_decay'}
  paths = [('velvet-xla_flat', 'xla_flat', 1024)]
  paths += [(f'velvet-pallas-b{b}', 'pallas', b) for b in block_sizes]
  triton_missing = velvet_triton.unavailable_reason()
  if triton_missing:
    print(f'  velvet-triton: skipped ({triton_missing})', flush=True)
    rows.append({'tree': name, 'params': n, 'path': 'velvet-triton', 'layout': 'flat', 'skipped': triton_missing})
  else:
    paths += [(f'velvet-triton-b{b}', 'triton', b) for b in block_sizes]
  for path, kernel, block in paths:
    opt = velvet.velvet_in_place(1e-3, layout.decay_mask(), kernel=kernel, block_size=block,
                                 weight_decay=_HP['weight_decay'], **hp)
    p, g = fresh(True)
    try:
      seconds, _ = _time(_in_place_step(opt), (p, g, jax.jit(opt.init)(p)), iters, repeats)
    except Exception as e:  # pylint: disable=broad-except  (a kernel that fails to build: a row saying so)
      reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}'
      print(f'  {name:8s} {path:24s} failed: {reason}', flush=True)
      rows.append({'tree': name, 'params': n, 'path': path, 'layout': 'flat', 'skipped': reason})
      continue
    record(path, 'flat', seconds)
  copy_ms = rows[0]['ms']
  for r in rows:
    if 'ms' in r:
      r['fraction_of_copy'] = copy_ms / r['ms']
  return rows


def bench_e2e(name: str, model_cfg: model_lib.ModelConfig, batch: int, seq_len: int, iters: int,
              repeats: int) -> list[dict]:
  """A whole train step (forward, backward, clipping, update) with AdamW and Velvet, tree and flat."""
  model = model_lib.VesperLM(model_cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  mask = optim.decay_mask(params, decay_embeddings=False)
  layout = velvet.flat_layout(params, mask)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, model_cfg.vocab_size)
  log_v = math.log(model_cfg.vocab_size)
  rows = []
  for layout_name in ('tree', 'flat'):
    unflatten = layout.unflatten if layout_name == 'flat' else (lambda p: p)
    decay = mask if layout_name == 'tree' else layout.decay_mask()
    for opt_name, core in (('adamw', optax.adamw(1e-4, mask=decay, **_HP)),
                           ('velvet-xla', velvet.velvet(1e-4, mask=decay, kernel='xla', **_HP))):
      tx = optax.chain(optax.clip_by_global_norm(1.0), core)

      def step(p, opt_state, tokens_BT1, tx=tx, unflatten=unflatten):
        def loss_fn(p):
          logits = model.apply({'params': unflatten(p)}, tokens_BT1[:, :-1])
          return losses.cross_entropy_and_entropy(logits, tokens_BT1[:, 1:])
        (loss, entropy), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p, loss=loss, entropy=entropy / log_v)
        return optax.apply_updates(p, updates), opt_state, tokens_BT1

      p = layout.flatten(params) if layout_name == 'flat' else jax.tree.map(jnp.copy, params)
      seconds, _ = _time(jax.jit(step, donate_argnums=(0, 1)), (p, tx.init(p), tokens), iters, repeats)
      rows.append({'tree': name, 'path': f'train-step {opt_name}', 'layout': layout_name,
                   'ms': seconds * 1e3, 'tokens_per_s': batch * seq_len / seconds})
      print(f'  {name:8s} train-step {opt_name:13s} {layout_name:5s} {seconds * 1e3:9.3f} ms', flush=True)
  return rows


def _table(rows: list[dict], e2e: list[dict]) -> str:
  lines = ['| tree | params | path | layout | ms | GB/s (28 B/param) | fraction of copy |',
           '|---|---:|---|---|---:|---:|---:|']
  for r in rows:
    if 'skipped' in r:
      lines.append(f"| {r['tree']} | {r['params'] / 1e6:.1f}M | {r['path']} | {r['layout']} | skipped: "
                   f"{r['skipped']} | | |")
      continue
    lines.append(f"| {r['tree']} | {r['params'] / 1e6:.1f}M | {r['path']} | {r['layout']} | {r['ms']:.3f} | "
                 f"{r['gb_per_s']:.1f} | {100 * r['fraction_of_copy']:.0f}% |")
  if e2e:
    lines += ['', '| tree | train step | layout | ms | tokens/s |', '|---|---|---|---:|---:|']
    lines += [f"| {r['tree']} | {r['path']} | {r['layout']} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} |"
              for r in e2e]
  return '\n'.join(lines)


def main(argv):
  del argv
  device = jax.devices()[0]
  quick = _QUICK.value
  sizes = ['tiny'] if quick else _SIZES.value
  iters, repeats = (2, 2) if quick else (_ITERS.value, _REPEATS.value)
  block_sizes = [int(b) for b in _BLOCKS.value]
  print(f'bench_velvet on {device.platform} ({device.device_kind}), jax {jax.__version__}; '
        f'Pallas {"interpreted" if device.platform == "cpu" else "compiled"}', flush=True)
  rows, e2e = [], []
  for name in sizes:
    rows += bench_tree(name, _model_config(name), iters, repeats, block_sizes)
    if _E2E.value:
      cfg = base_config.load_config_file(name)
      seq_len = 64 if quick else cfg.data.seq_len
      e2e += bench_e2e(name, _model_config(name), 2 if quick else _E2E_BATCH.value, seq_len, iters, repeats)
  out = _JSON.value or (str(pathlib.Path(os.environ['OUT']) / 'bench_velvet.json') if os.environ.get('OUT')
                        else str(REPO / 'experiments' / 'results' / 'bench_velvet.json'))
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  result = {'device': device.device_kind, 'platform': device.platform, 'jax': jax.__version__,
            'quick': quick, 'iters': iters, 'repeats': repeats, 'bytes_per_param': BYTES_PER_PARAM,
            'rows': rows, 'e2e': e2e}
  pathlib.Path(out).write_text(json.dumps(result, indent=2))
  print(f'\nwrote {out}\n\nVelvet update on {device.device_kind} ({device.platform}), '
        f'jax {jax.__version__}{" [--quick]" if quick else ""}:\n')
  print(_table(rows, e2e))


if __name__ == '__main__':
  app.run(main)
