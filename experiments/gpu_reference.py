"""CPU reference for the GPU suite's correctness checks (experiments/gpu_checks.py, gpu_suite.sh).

    python experiments/gpu_reference.py     # CPU, ~6 min on 2 cores: writes experiments/gpu_reference.json

Runs the tiny model (float32, AdamW, OVERRIDES below: 20 steps of 4 x 64 tokens, seed 0) on CPU and
records its per-step training losses, the fingerprint of its initial parameters and the token batches it
trained on. The batches come from the built-in corpus (builtin:pydoc: no network, no ../shared) through
the real data path (BPE, token cache, data.get_batch), and are stored in the JSON rather than rebuilt on
the GPU machine: that corpus is CPython's own pydoc topics and the BPE is trained by `tokenizers`, so
another Python or tokenizers version there would make other tokens.

It also measures how far the losses move between legitimately different computations of the same run
on CPU (the C++ CPU kernels off, two micro-batches instead of one, XLA's attention instead of the CPU
kernel), under float32 matmuls emulated at TF32 precision (what the float32 check must catch), and in
bfloat16, and writes those spreads beside the tolerances the GPU checks use, so each tolerance sits
next to the numbers that justify it (the script refuses to write if they no longer bracket it).
Regenerate after a change that moves the tiny model's losses on purpose (its init, the loss, the
optimizer), or when the GPU check reports that the initial parameters differ from the reference's
(another JAX version's initialisers).
"""

import base64
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vesper_jax import config as base_config
from vesper_jax import data as data_lib
from vesper_jax import platforms
from vesper_jax import sharding
from vesper_jax import train

PATH = pathlib.Path(__file__).resolve().with_name('gpu_reference.json')

# The run: the tiny config with these keys changed (all of them are recorded in the JSON).
OVERRIDES = {
    'train.seed': 0,
    'train.num_steps': 20,
    'train.batch_size': 4,
    'train.grad_accum_steps': 1,   # explicit: auto differs between CPU and GPU (here both are 1)
    'data.seq_len': 64,
    'opt.warmup_steps': 2,
    'model.dtype': 'float32',
}

# Tolerances of the GPU checks, as max over steps of |loss - float32_losses| / float32_losses.
# float32 at 'highest' matmul precision: the GPU sums in other orders (cuBLAS and XLA:GPU tiling and
# reductions, the full-logits loss instead of the CPU's chunked head, libdevice's exp/log), as the CPU
# variants below do in their own ways; they move the 20 losses by at most 2.3e-7 (the GPU's code-path
# choices run on the CPU, `spread.gpu_choices`). 3e-6 is more than ten times that, and below what float32
# matmuls rounded to TF32 (10 mantissa bits, what a GPU does by default without 'highest') move them:
# 8.2e-6, emulated on CPU (`spread.tf32_emulated`).
FLOAT32_RTOL = 3e-6
# bfloat16 compute (parameters stay float32) against the float32 losses: the CPU's bfloat16 run moves
# them by 2.2e-4 (`spread.bfloat16`); 5e-3 is over twenty times that, for the GPU's other roundings
# (cuDNN's flash attention rounds its probabilities to bfloat16 before P·V) and still below what a broken
# bfloat16 path moves (a non-float32 softmax or loss: one bfloat16 rounding is 2^-8 ~ 3.9e-3 of a value,
# and a causal-mask leak drops the loss by far more within 20 steps).
BFLOAT16_RTOL = 5e-3


def reference_config(**changes) -> ml_collections.ConfigDict:
  """The tiny config with OVERRIDES, then `changes` ({'section.key': value})."""
  config = base_config.get_config()
  for key, value in {**OVERRIDES, **changes}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def encode_tokens(tokens_SBT1: np.ndarray) -> dict:
  """The token batches [steps, batch, seq_len + 1] as JSON: uint16 little-endian, base64, sha256."""
  raw = np.ascontiguousarray(tokens_SBT1, dtype='<u2').tobytes()
  return {'shape': list(tokens_SBT1.shape), 'uint16_base64': base64.b64encode(raw).decode(),
          'sha256': hashlib.sha256(raw).hexdigest()}


def decode_tokens(encoded: dict) -> np.ndarray:
  """encode_tokens' inverse (int32); raises ValueError if the bytes do not match their sha256."""
  raw = base64.b64decode(encoded['uint16_base64'])
  if hashlib.sha256(raw).hexdigest() != encoded['sha256']:
    raise ValueError('gpu_reference.json: the token batches do not match their sha256')
  return np.frombuffer(raw, dtype='<u2').astype(np.int32).reshape(encoded['shape'])


def token_batches(config: ml_collections.ConfigDict, cache_dir: str) -> np.ndarray:
  """The batches the run trains on, [num_steps, batch_size, seq_len + 1], from the built-in corpus."""
  config.data.cache_dir = cache_dir
  cache = data_lib.build_or_load_cache(config.data, config.model.vocab_size, progress=False)
  t = config.train
  return np.stack([data_lib.get_batch(cache.train, seed=t.seed, step=step, batch_size=t.batch_size,
                                      seq_len=config.data.seq_len) for step in range(t.num_steps)])


def fingerprint(params) -> dict:
  """Sum, sum of squares and size of all parameters (float64): equal inits agree to ~1e-7."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(params))]
  return {'sum': float(sum(x.sum() for x in leaves)), 'sum_sq': float(sum((x * x).sum() for x in leaves)),
          'size': int(sum(x.size for x in leaves))}


def fingerprint_rel_diff(a: dict, b: dict) -> float:
  """Largest relative difference between two fingerprints (inf when the sizes differ)."""
  if a['size'] != b['size']:
    return float('inf')
  # The sum of a zero-mean init is small next to its terms: measure it against sqrt(sum_sq · size).
  scale = (b['sum_sq'] * b['size']) ** 0.5
  return max(abs(a['sum'] - b['sum']) / scale, abs(a['sum_sq'] - b['sum_sq']) / b['sum_sq'])


def run(config: ml_collections.ConfigDict, tokens_SBT1: np.ndarray, device=None,
        platform: str | None = None) -> dict:
  """Trains `config` on the given batches on one device (default: the first); the per-step losses.
  `platform`: whose code-path choices to make (train.build; None = the device's own).

  Returns {'losses': [...], 'init': fingerprint(initial parameters), 'seconds': wall time}.
  """
  start = time.perf_counter()
  mesh = sharding.make_mesh(1, 1, [device or jax.devices()[0]])
  parts = train.build(config, mesh, platform=platform)
  state = parts.init_fn(jax.random.key(config.train.seed))
  init = fingerprint(parts.param_tree(state.params))
  losses = []
  for batch in tokens_SBT1:
    state, metrics = parts.step_fn(state, sharding.global_batch({'tokens': batch}, parts.batch_sharding))
    losses.append(metrics['loss'])
  losses = [float(x) for x in jax.device_get(losses)]
  return {'losses': losses, 'init': init, 'seconds': round(time.perf_counter() - start, 1)}


def max_rel_diff(a: list[float], b: list[float]) -> float:
  """max over steps of |a - b| / |b| (inf if any is not finite)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
    return float('inf')
  return float(np.max(np.abs(a - b) / np.abs(b)))


def versions() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'numpy': np.__version__, 'python': platform.python_version(),
          'backend': platforms.hardware()}


# ------------------------------------------------------------------------------------------------ CLI

_JSON = flags.DEFINE_string('json', str(PATH), 'Where to write the reference JSON.')
_LOSSES_ONLY = flags.DEFINE_string('losses_only', None, 'Internal: train on the batches in this .npy and '
                                   'print the losses as JSON (a subprocess, for a variant below).')
_VARIANT = flags.DEFINE_string('variant', None, 'Internal: with --losses_only, the variant to run.')

# Other computations of the same run on CPU: (environment, config changes[, platform]). The first four
# are legitimate (their spread is what summation order alone does; gpu_choices is the code a GPU runs,
# vesper_jax/platforms.py, here on the CPU); tf32_emulated is what the float32 tolerance must catch;
# bfloat16 sets the bfloat16 check's scale.
VARIANTS = {
    'cpu_kernels_off': ({'VESPER_CPU_KERNELS': '0'}, {}),
    'grad_accum_2': ({}, {'train.grad_accum_steps': 2}),
    'xla_attention': ({}, {'model.attention_impl': 'xla'}),
    'gpu_choices': ({}, {}, 'gpu'),
    # Every matmul's float32 operands rounded to TF32's 10 mantissa bits (the products and sums stay
    # float32), as a GPU multiplies float32 by default; the CPU kernels off and XLA's attention, so that
    # every product goes through lax.dot_general.
    'tf32_emulated': ({'VESPER_CPU_KERNELS': '0', 'VESPER_EMULATE_TF32': '1'}, {'model.attention_impl': 'xla'}),
    'bfloat16': ({}, {'model.dtype': 'bfloat16'}),
}


def _emulate_tf32() -> None:
  """Rounds float32 operands of every lax.dot_general to TF32 (jnp.dot and einsum call it too)."""
  from jax._src.lax import lax as lax_internal  # pylint: disable=import-outside-toplevel
  dot_general = lax_internal.dot_general

  def tf32_dot_general(lhs, rhs, *args, **kwargs):
    round_ = lambda x: (jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10)
                        if x.dtype == jnp.float32 else x)
    return dot_general(round_(lhs), round_(rhs), *args, **kwargs)

  lax_internal.dot_general = jax.lax.dot_general = tf32_dot_general


def _variant_losses(name: str, tokens_SBT1: np.ndarray) -> list[float]:
  """The run as variant `name`, in a fresh process (the CPU kernels are chosen once per process)."""
  env = VARIANTS[name][0]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'tokens.npy')
    np.save(path, tokens_SBT1)
    done = subprocess.run([sys.executable, __file__, f'--losses_only={path}', f'--variant={name}'],
                          env={**os.environ, **env}, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f'variant {name} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')  # the CPU reference, also on a machine with a GPU
  jax.config.update('jax_default_matmul_precision', 'highest')  # as the GPU check runs (a no-op on CPU)
  if _LOSSES_ONLY.value:
    if os.environ.get('VESPER_EMULATE_TF32') == '1':
      _emulate_tf32()
    _, changes, platform = (*VARIANTS[_VARIANT.value], None)[:3] if _VARIANT.value else ({}, {}, None)
    print(json.dumps(run(reference_config(**changes), np.load(_LOSSES_ONLY.value), platform=platform)['losses']))
    return
  with tempfile.TemporaryDirectory() as cache_dir:  # a fresh BPE and token cache, the user's left alone
    tokens = token_batches(reference_config(), cache_dir)
  ref = run(reference_config(), tokens)
  print(f"float32 reference ({ref['seconds']} s): " + ' '.join(f'{x:.6f}' for x in ref['losses']))
  losses = {name: _variant_losses(name, tokens) for name in VARIANTS}
  spread = {name: max_rel_diff(values, ref['losses']) for name, values in losses.items()}
  per_step = {name: [float(f'{abs(a - b) / b:.2e}') for a, b in zip(values, ref['losses'])]
              for name, values in losses.items()}
  for name, value in spread.items():
    print(f'spread {name}: {value:.2e} (per step: {" ".join(f"{x:.0e}" for x in per_step[name])})')
  legit = max(spread[k] for k in ('cpu_kernels_off', 'grad_accum_2', 'xla_attention', 'gpu_choices'))
  if not (legit * 10 <= FLOAT32_RTOL < spread['tf32_emulated'] and spread['bfloat16'] * 10 <= BFLOAT16_RTOL):
    raise SystemExit(f'the CPU spreads {spread} no longer bracket the tolerances (float32 {FLOAT32_RTOL}: '
                     f'>= 10x the legitimate ones and below TF32; bfloat16 {BFLOAT16_RTOL}: >= 10x its '
                     'spread): revisit them before writing the reference')
  result = {
      'about': 'CPU reference of experiments/gpu_checks.py; written by experiments/gpu_reference.py',
      'created_with': versions(),
      'config': 'configs/tiny.py (vesper_jax.config.get_config()) with config_overrides',
      'config_overrides': OVERRIDES,
      'matmul_precision': 'highest',
      'data': {'source': 'builtin:pydoc; BPE and token cache built by vesper_jax.data; batch of step s = '
                         'data.get_batch(seed, s)', 'tokens': encode_tokens(tokens)},
      'init_fingerprint': ref['init'],
      'float32_losses': ref['losses'],
      'bfloat16_losses_cpu': losses['bfloat16'],
      'tolerance': {'float32_rtol': FLOAT32_RTOL, 'bfloat16_rtol': BFLOAT16_RTOL,
                    'measure': 'max over steps of |loss - float32_losses| / float32_losses',
                    'why': 'float32: >= 10x the largest legitimate CPU spread (summation order) and below '
                           'the TF32-emulated spread; bfloat16: >= 10x the CPU bfloat16 spread '
                           '(experiments/gpu_reference.py)'},
      'spread': spread,
      'spread_per_step': per_step,
  }
  pathlib.Path(_JSON.value).write_text(json.dumps(result, indent=1) + '\n')
  print(f'wrote {_JSON.value}')


if __name__ == '__main__':
  app.run(main)
