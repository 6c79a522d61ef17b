"""The GPU suite's correctness checks (experiments/gpu_suite.sh runs them first, before any timing).

    python experiments/gpu_checks.py --out=$OUT     # ~1-2 min on an H100; elsewhere 'SKIP <name>: no GPU'

Each check prints one line, `PASS name: detail`, `FAIL name: detail` or `SKIP name: reason`, and all
results go to $OUT/checks.json, rewritten after each check (a run cut short keeps what finished):

  package            the installed vesper_jax (the suite's wheel) holds the working tree's sources
  tiny_float32       the tiny run (float32, 'highest' matmul precision, 20 steps on stored batches)
                     against the CPU reference losses in experiments/gpu_reference.json
  tiny_bfloat16      the same run with model.dtype='bfloat16' (cuDNN attention) is finite and near them
  attention_cudnn    jax.nn.dot_product_attention, cuDNN against XLA: bfloat16, causal, outputs and
                     gradients, at the head dims of tiny, small, medium/large and a grouped-query shape
  velvet_pallas      the compiled Pallas Velvet update against XLA: in place over flat buffers
                     (velvet_in_place, as opt.kernel='pallas' trains) with a skipped step, and the optax
                     form (velvet(kernel='pallas'))
  velvet_triton      the jax-triton kernel in place against XLA (SKIP with the reason where it cannot run)

`--run_on_cpu` runs what can run on CPU (not cuDNN, not Triton; Pallas interpreted), to test the checks.
Tolerances: the training runs use those in gpu_reference.json (with the CPU measurements that justify
them; experiments/gpu_reference.py); the others are defined below with their reasons. Exit status 1
when a check failed, else 0 (also without a GPU). A check that raises is a FAIL with the error's last
line (its traceback goes to stderr).
"""

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
import traceback

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

import vesper_jax
from vesper_jax import platforms
from vesper_jax import velvet

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

_OUT = flags.DEFINE_string('out', os.environ.get('OUT', '/tmp/gpu_out'), 'Directory for checks.json.')
_ONLY = flags.DEFINE_list('only', [], 'Run only these checks (default: all).')
_RUN_ON_CPU = flags.DEFINE_bool('run_on_cpu', False, 'Development aid: run the checks that can on CPU '
                                '(not cuDNN or Triton; Pallas interpreted), to test the checks themselves.')

# cuDNN against XLA attention in bfloat16: both are compared with XLA in float32 at 'highest' precision
# on the same (bfloat16-valued) inputs. cuDNN passes if its error is within twice XLA's own bfloat16
# error, or within one bfloat16 rounding (2^-8 of the largest value) where XLA's is smaller than that:
# the two differ in where they round (cuDNN rounds P to bfloat16 before P·V), not in accuracy class; a
# wrong mask or scale errs by O(1).
ATTENTION_ERROR_RATIO = 2.0
ATTENTION_ERROR_FLOOR = 2.0 ** -8
# (batch, seq, query heads, kv heads, head dim): tiny (32), small (64), medium/large (64) and a
# grouped-query shape at head dim 128, the largest cuDNN's flash attention takes.
ATTENTION_SHAPES = ((4, 256, 4, 4, 32), (2, 512, 6, 6, 64), (2, 1024, 12, 12, 64), (2, 512, 8, 2, 128))
# The Velvet kernels repeat velvet_elementwise's expressions in the same order, so only contraction into
# fused multiply-adds may differ: the tests' bound, 1e-6 of the largest value per buffer.
VELVET_RTOL = 1e-6
VELVET_STEPS = 6        # with the loss, entropy, clip factor and schedule moving, one step skipped
VELVET_SKIPPED_STEP = 3


# ------------------------------------------------------------------------------------------- helpers

@functools.cache
def _reference_module():
  """experiments/gpu_reference.py (the shared run, tokens and tolerances), loaded beside this file."""
  spec = importlib.util.spec_from_file_location('gpu_reference', HERE / 'gpu_reference.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def _matmul_precision(value: str | None):
  previous = jax.config.jax_default_matmul_precision
  jax.config.update('jax_default_matmul_precision', value)
  try:
    yield
  finally:
    jax.config.update('jax_default_matmul_precision', previous)


def _on_gpu() -> bool:
  return platforms.hardware() == 'gpu'


class Skip(Exception):
  """Raised by a check that cannot run here; its message is the reason."""


def _need_gpu(cpu_can: bool = True) -> None:
  if not _on_gpu() and not (cpu_can and _RUN_ON_CPU.value):
    raise Skip(f'no GPU (the devices are {platforms.hardware()!r})')


def _rel_error(got, want) -> float:
  """max|got - want| / max|want| in float32 (inf if got is not finite)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not np.isfinite(got).all():
    return float('inf')
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ------------------------------------------------------------------------------------------- checks

def check_package() -> tuple[bool, str, dict]:
  """The vesper_jax being imported holds the same .py/.cc/.h files as the working tree's vesper_jax/ and
  kernels/ (installed as vesper_jax.kernels): a wheel built before an edit would test stale code."""
  installed = pathlib.Path(vesper_jax.__file__).resolve().parent
  if installed == (REPO / 'vesper_jax').resolve():
    return True, f'vesper_jax imported from the working tree ({installed})', {'location': str(installed)}
  pairs = {}  # both directions: a file only in the tree, or only in the installed package, differs too
  for tree_dir, package_dir in ((REPO / 'vesper_jax', installed), (REPO / 'kernels', installed / 'kernels')):
    for pattern in ('*.py', '*.cc', '*.h'):
      for name in {p.name for p in tree_dir.glob(pattern)} | {p.name for p in package_dir.glob(pattern)}:
        pairs[f'{tree_dir.name}/{name}'] = (tree_dir / name, package_dir / name)
  digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
  differ = sorted(name for name, (tree, package) in pairs.items() if digest(tree) != digest(package))
  data = {'location': str(installed), 'files': len(pairs), 'differ': differ}
  if differ:
    return False, (f'{installed} differs from the working tree in {len(differ)} of {len(pairs)} files '
                   f"({', '.join(differ[:4])}{'...' if len(differ) > 4 else ''}): rebuild the wheel "
                   '(bash experiments/gpu_suite.sh --prep)'), data
  return True, f'{installed} = working tree ({len(pairs)} files, vesper_jax.kernels included)', data


def _tiny_run(changes: dict, precision: str | None):
  ref_module = _reference_module()
  reference = json.loads((HERE / 'gpu_reference.json').read_text())
  if reference['config_overrides'] != ref_module.OVERRIDES:
    raise ValueError('experiments/gpu_reference.json was written with other overrides than '
                     'gpu_reference.py has now: regenerate it (python experiments/gpu_reference.py)')
  tokens = ref_module.decode_tokens(reference['data']['tokens'])
  with _matmul_precision(precision):
    result = ref_module.run(ref_module.reference_config(**changes), tokens)
  init_diff = ref_module.fingerprint_rel_diff(result['init'], reference['init_fingerprint'])
  if init_diff > 1e-5:  # equal inits agree to ~1e-7: this is another initialiser, not GPU arithmetic
    raise ValueError(f"the initial parameters differ from the reference's (relative {init_diff:.1e}; "
                     f"reference written with jax {reference['created_with']['jax']}, here "
                     f'{jax.__version__}): regenerate it with this jax on CPU '
                     '(JAX_PLATFORMS=cpu python experiments/gpu_reference.py)')
  want = reference['float32_losses']
  per_step = [abs(a - b) / abs(b) if math.isfinite(a) else math.inf for a, b in zip(result['losses'], want)]
  worst = int(np.argmax(per_step))
  return ref_module, reference, result, per_step, worst


def check_tiny_float32() -> tuple[bool, str, dict]:
  _need_gpu()
  _, reference, result, per_step, worst = _tiny_run({}, 'highest')
  tol = reference['tolerance']['float32_rtol']
  data = {'losses': result['losses'], 'reference': reference['float32_losses'], 'rel_diff': per_step,
          'tolerance': tol, 'seconds': result['seconds']}
  spread = reference['spread']
  cpu_spread = max(spread[k] for k in ('cpu_kernels_off', 'grad_accum_2', 'xla_attention', 'gpu_choices'))
  ok = per_step[worst] <= tol
  return ok, (f'max |loss - CPU| / CPU {per_step[worst]:.1e} at step {worst + 1} of {len(per_step)} '
              f'(tolerance {tol:.0e}; step 1 {per_step[0]:.1e}; on CPU: other summation orders '
              f"{cpu_spread:.0e}, TF32 matmuls {spread['tf32_emulated']:.0e}); loss {result['losses'][0]:.4f} "
              f"-> {result['losses'][-1]:.4f}"), data


def check_tiny_bfloat16() -> tuple[bool, str, dict]:
  _need_gpu()
  from vesper_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  ref_module, reference, result, per_step, worst = _tiny_run({'model.dtype': 'bfloat16'}, None)
  tol = reference['tolerance']['bfloat16_rtol']
  config = ref_module.reference_config(**{'model.dtype': 'bfloat16'})
  attention = model_lib.attention_implementation(model_lib.ModelConfig(**config.model), True) or 'xla'
  finite = all(math.isfinite(x) for x in result['losses'])
  data = {'losses': result['losses'], 'reference_float32': reference['float32_losses'],
          'rel_diff': per_step, 'tolerance': tol, 'attention': attention, 'seconds': result['seconds']}
  ok = finite and per_step[worst] <= tol
  return ok, (f"{'finite' if finite else 'NOT FINITE'}; max |loss - float32 CPU| / CPU {per_step[worst]:.1e} "
              f"at step {worst + 1} (tolerance {tol:.0e}; CPU bfloat16 {reference['spread']['bfloat16']:.0e}); "
              f'attention {attention}'), data


def _attention_errors(shape) -> dict:
  """Relative errors of cuDNN and XLA (bfloat16) against XLA in float32, for the output and dq, dk, dv."""
  B, T, N, K, H = shape
  keys = jax.random.split(jax.random.key(sum(shape)), 4)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
  cotangent = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)

  def forward_backward(implementation):
    def f(q, k, v, cotangent):
      out, vjp = jax.vjp(lambda *qkv: jax.nn.dot_product_attention(
          *qkv, is_causal=True, implementation=implementation), q, k, v)
      return (out, *vjp(cotangent))
    return jax.jit(f)

  with _matmul_precision('highest'):
    want = forward_backward('xla')(*(x.astype(jnp.float32) for x in (q, k, v, cotangent)))
  errors = {}
  for implementation in ('cudnn', 'xla'):
    got = forward_backward(implementation)(q, k, v, cotangent)
    errors[implementation] = {name: _rel_error(g, w) for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want)}
  return errors


def check_attention_cudnn() -> tuple[bool, str, dict]:
  _need_gpu(cpu_can=False)
  rows, failures, worst_ratio = [], [], 0.0
  for shape in ATTENTION_SHAPES:
    errors = _attention_errors(shape)
    for name in ('out', 'dq', 'dk', 'dv'):
      cudnn, xla = errors['cudnn'][name], errors['xla'][name]
      bound = max(ATTENTION_ERROR_RATIO * xla, ATTENTION_ERROR_FLOOR)
      worst_ratio = max(worst_ratio, cudnn / max(xla, 1e-30))
      if not cudnn <= bound:
        failures.append(f'{name} at {shape}: cuDNN {cudnn:.1e} > {bound:.1e} (XLA {xla:.1e})')
    rows.append({'shape_BTNKH': list(shape), **errors})
  worst_cudnn = max(r['cudnn'][n] for r in rows for n in ('out', 'dq', 'dk', 'dv'))
  data = {'rows': rows, 'ratio': ATTENTION_ERROR_RATIO, 'floor': ATTENTION_ERROR_FLOOR}
  if failures:
    return False, '; '.join(failures[:3]) + (f' (+{len(failures) - 3} more)' if len(failures) > 3 else ''), data
  return True, (f'{len(ATTENTION_SHAPES)} shapes (head dims {sorted({s[4] for s in ATTENTION_SHAPES})}, GQA 8/2), '
                f'out and dq/dk/dv: largest cuDNN error {worst_cudnn:.1e} of max|float32|, at most '
                f'{worst_ratio:.2f}x XLA bfloat16\'s'), data


def _velvet_tree(rng: np.random.Generator) -> tuple[dict, dict]:
  """Odd-sized leaves (block tails everywhere), a decayed matrix, a decayed embedding, an undecayed vector:
  ~4M elements on a GPU, ~20k on CPU (interpreted Pallas takes ~100 s per million elements there)."""
  rows, cols = (1001, 3001) if _on_gpu() else (37, 301)
  params = {'w': rng.normal(size=(rows, cols)), 'emb': rng.normal(size=(rows // 4 + 7, cols + 98)) * 0.02,
            'norm': 1 + 0.1 * rng.normal(size=(cols,))}
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, {'w': True, 'emb': True, 'norm': False}


def _velvet_in_place_paths(kernels: tuple[str, ...]) -> dict:
  """{kernel: (params, mu, nu) flat buffers} after VELVET_STEPS steps of velvet_in_place, the schedule,
  clip factor, loss and entropy moving, and a skipped step (NaN gradient, ok=False) that must leave
  every buffer bit for bit (else AssertionError)."""
  import optax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  params, mask = _velvet_tree(rng)
  layout = velvet.flat_layout(params, mask, pad_multiple=4096)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 2, VELVET_STEPS, 3e-3)
  noise = [layout.flatten(jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params))
           for _ in range(VELVET_STEPS)]
  results = {}
  for kernel in kernels:
    opt = velvet.velvet_in_place(schedule, layout.decay_mask(), kernel=kernel, b1=0.9, b2=0.95,
                                 weight_decay=0.1, vocab_size=4096)

    @jax.jit
    def step(p, g, state, loss, entropy, grad_scale, ok, opt=opt):
      return opt.step(p, g, state, loss=loss, entropy=entropy, grad_scale=grad_scale, ok=ok)

    p = layout.flatten(params)
    state = jax.jit(opt.init)(p)
    for t in range(VELVET_STEPS):
      g = jax.tree.map(lambda x, n, t=t: 0.5 * x + n * (1 + t % 3), p, noise[t])
      ok = t != VELVET_SKIPPED_STEP
      if not ok:
        g = jax.tree.map(lambda x: x.at[5].set(jnp.nan), g)
        before = jax.tree.map(np.asarray, (p, state))
      p, state = step(p, g, state, 6.0 - t / 2, 0.3 + 0.1 * (t % 4), 0.7 if t % 2 else 1.0, ok)
      if not ok:
        after = jax.tree.map(np.asarray, (p, state))
        if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))):
          raise AssertionError(f'{kernel}: the skipped step (ok=False, NaN gradient) changed the state')
    results[kernel] = {f'{part}/{buf}': np.asarray(x) for part, tree in zip(('params', 'mu', 'nu'),
                                                                            (p, state.mu, state.nu))
                       for buf, x in tree.items()}
  return results


def _velvet_optax_form_errors() -> dict:
  """velvet(kernel='pallas') (the optax form: the kernel returns the update) against kernel='xla' on the
  parameter tree, fed the same gradients: largest relative error of each step's update and of the moments."""
  rng = np.random.default_rng(1)
  params, mask = _velvet_tree(rng)
  hyper = dict(b1=0.9, b2=0.95, weight_decay=0.1, mask=mask, vocab_size=4096)
  txs = {kernel: velvet.velvet(3e-3, kernel=kernel, **hyper) for kernel in ('xla', 'pallas')}
  updates = {kernel: jax.jit(tx.update) for kernel, tx in txs.items()}
  states = {kernel: tx.init(params) for kernel, tx in txs.items()}
  errors, p = {}, params
  for t in range(VELVET_STEPS):
    g = jax.tree.map(lambda x: 0.5 * x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    out = {}
    for kernel in txs:
      out[kernel], states[kernel] = updates[kernel](g, states[kernel], p, loss=6.0 - t / 2,
                                                    entropy=0.3 + 0.1 * (t % 4))
    for name in params:
      errors[f'update/{name}'] = max(errors.get(f'update/{name}', 0.0),
                                     _rel_error(out['pallas'][name], out['xla'][name]))
    p = jax.tree.map(lambda x, u: x + u, p, out['xla'])
  for part in ('mu', 'nu'):
    for name in params:
      errors[f'{part}/{name}'] = _rel_error(getattr(states['pallas'], part)[name],
                                            getattr(states['xla'], part)[name])
  return errors


def _check_velvet_kernel(kernel: str) -> tuple[bool, str, dict]:
  results = _velvet_in_place_paths(('xla_flat', kernel))
  errors = {f'in_place/{k}': _rel_error(v, results['xla_flat'][k]) for k, v in results[kernel].items()}
  n = sum(v.size for k, v in results[kernel].items() if k.startswith('params/'))
  forms = 'in place'
  if kernel == 'pallas':
    errors.update({f'optax_form/{k}': v for k, v in _velvet_optax_form_errors().items()})
    forms = 'in place (vs xla_flat) and optax form (vs xla)'
  worst = max(errors, key=errors.get)
  data = {'errors': errors, 'tolerance': VELVET_RTOL, 'steps': VELVET_STEPS, 'elements': n}
  return (errors[worst] <= VELVET_RTOL,
          f'{forms}, {VELVET_STEPS} steps on {n:,} elements: largest error {errors[worst]:.1e} of max|x| '
          f'({worst}; tolerance {VELVET_RTOL:.0e}); the skipped step left every buffer bit for bit', data)


def check_velvet_pallas() -> tuple[bool, str, dict]:
  _need_gpu()
  return _check_velvet_kernel('pallas')


def check_velvet_triton() -> tuple[bool, str, dict]:
  _need_gpu(cpu_can=False)
  from vesper_jax.kernels import velvet_triton  # pylint: disable=import-outside-toplevel
  reason = velvet_triton.unavailable_reason()
  if reason:
    raise Skip(reason)
  return _check_velvet_kernel('triton')


CHECKS = {
    'package': check_package,
    'tiny_float32': check_tiny_float32,
    'tiny_bfloat16': check_tiny_bfloat16,
    'attention_cudnn': check_attention_cudnn,
    'velvet_pallas': check_velvet_pallas,
    'velvet_triton': check_velvet_triton,
}


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  names = _ONLY.value or list(CHECKS)
  unknown = set(names) - set(CHECKS)
  if unknown:
    raise app.UsageError(f'--only: unknown checks {sorted(unknown)} (known: {list(CHECKS)})')
  devices = jax.devices()
  report = {'backend': platforms.hardware(), 'device': devices[0].device_kind, 'jax': jax.__version__,
            'vesper_jax': str(pathlib.Path(vesper_jax.__file__).parent), 'planned': names, 'checks': []}
  print(f'checks on {len(devices)} x {devices[0].device_kind} (JAX {jax.__version__}, backend '
        f"{report['backend']}); vesper_jax from {report['vesper_jax']}", flush=True)
  (out / 'checks.json').write_text(json.dumps(report, indent=1))  # what was planned, should none finish
  failed = False
  for name in names:
    start = time.perf_counter()
    try:
      ok, detail, data = CHECKS[name]()
      status = 'PASS' if ok else 'FAIL'
    except Skip as e:
      status, detail, data = 'SKIP', str(e), {}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stderr)
      last = (str(e).strip().splitlines() or [''])[-1]
      status, detail, data = 'FAIL', f'{type(e).__name__}: {last[:300]}', {}
    failed |= status == 'FAIL'
    seconds = round(time.perf_counter() - start, 1)
    print(f'{status} {name}: {detail} [{seconds} s]', flush=True)
    report['checks'].append({'name': name, 'status': status, 'detail': detail, 'seconds': seconds, **data})
    (out / 'checks.json').write_text(json.dumps(report, indent=1))
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  app.run(main)
