"""The CPU attention kernel (attention_cpu.cc): built on first use, registered with XLA, called from JAX.

`available()` compiles attention_cpu.cc with the system's C++ compiler (`$CXX`, else g++, c++ or
clang++) against the XLA FFI headers that ship with jaxlib, once per source / compiler / jaxlib / CPU:
the library is cached under `$VESPER_KERNEL_CACHE` (default ~/.cache/vesper_jax/kernels), ~3 s to build.
Where there is no compiler, or the build fails, it logs why once and returns False, and the model keeps
its pure-JAX attention (vesper_jax/attention_cpu.py). `VESPER_CPU_KERNELS=0` turns the kernel off (to
compare the two, or to rule it out).

`causal_attention` is differentiable: a custom VJP whose backward is the kernel's backward handler.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name('attention_cpu.cc')
_FORWARD, _BACKWARD = 'vesper_attention_forward', 'vesper_attention_backward'
LANES = 16  # the kernel's vector width in floats: the head size must be a multiple
# -march=native: the library is built on (and for) the machine that runs it, and its cache key holds
# the CPU's flags. 512-bit vectors where the CPU has them (GCC prefers 256 by default).
_FLAGS = ('-O3', '-march=native', '-mprefer-vector-width=512', '-std=c++17', '-shared', '-fPIC')


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('flags'):
        return line
  except OSError:
    pass
  return platform.processor()


def _cache_dir() -> Path:
  return Path(os.environ.get('VESPER_KERNEL_CACHE', Path.home() / '.cache' / 'vesper_jax' / 'kernels'))


def build(compiler: str) -> Path:
  """The compiled library's path, compiled now unless the cache holds it. Raises on a failed build."""
  import jaxlib
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), compiler, ' '.join(_FLAGS), jaxlib.__version__,
                                  _cpu_flags()]).encode()).hexdigest()[:16]
  target = _cache_dir() / f'attention_cpu-{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target, then renamed: processes that build at once (test workers) never load a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  try:
    cmd = [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed:\n{done.stderr[-2000:]}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered (once per process; False says why in the log)."""
  if os.environ.get('VESPER_CPU_KERNELS', '1') == '0':
    return False
  compiler = _compiler()
  if compiler is None:
    logging.warning('vesper_jax: no C++ compiler (g++, c++, clang++ or $CXX) found: CPU attention runs '
                    'as plain JAX ops, slower (README, "CPU train step")')
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (OSError, RuntimeError) as e:
    logging.warning('vesper_jax: the CPU attention kernel did not build, so attention runs as plain JAX '
                    'ops: %s', e)
    return False
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.VesperAttentionForward), platform='cpu')
  jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.VesperAttentionBackward), platform='cpu')
  return True


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether the kernel takes these operands (float32, head size a multiple of 16) and is available.

  One device only: XLA's SPMD partitioner does not know the kernel's sharding, so over a mesh the
  model keeps the pure-JAX attention, which it partitions like every other op.
  """
  return (all(a.dtype == jnp.float32 for a in (q, k, v)) and q.shape[-1] % LANES == 0
          and jax.device_count() == 1 and available())


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                     attention_mask_BT: jax.Array | None = None) -> jax.Array:
  """As `jax.nn.dot_product_attention(q, k, v, mask, is_causal=True)`, float32 (see `supports`).

  A query that sees no key (all padding) gets a zero output where XLA's gets an average: either is
  garbage that the loss weights out.
  """
  B, T = q_BTNH.shape[:2]
  mask_BT = (jnp.ones((B, T), jnp.int32) if attention_mask_BT is None
             else attention_mask_BT.astype(jnp.int32))
  return _attention(q_BTNH, k_BTKH, v_BTKH, mask_BT)


def _scale(q):
  return float(q.shape[-1]) ** -0.5


@jax.custom_vjp
def _attention(q, k, v, mask):
  return _forward(q, k, v, mask)[0]


def _forward(q, k, v, mask):
  B, T, N, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      _FORWARD, (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
      vmap_method='sequential')(q, k, v, mask, scale=np.float32(_scale(q)))
  return out, lse


def _attention_fwd(q, k, v, mask):
  out, lse = _forward(q, k, v, mask)
  return out, (q, k, v, mask, out, lse)


def _attention_bwd(residuals, dout):
  q, k, v, mask, out, lse = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      _BACKWARD, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)),
      vmap_method='sequential')(q, k, v, mask, out, lse, dout.astype(q.dtype), scale=np.float32(_scale(q)))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
