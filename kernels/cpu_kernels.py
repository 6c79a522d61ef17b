"""The CPU kernels (kernels/*.cc): built on first use, registered with XLA as FFI targets.

`available()` compiles the C++ sources (attention_cpu.cc, cross_entropy_cpu.cc, era_cpu.cc,
quantized_matmul_cpu.cc, sampling_cpu.cc and their cpu_common.h) into one library with the system's
C++ compiler (`$CXX`, else g++, c++ or clang++) against the XLA FFI headers that ship with jaxlib, once
per source / compiler / jaxlib / CPU: the library is cached under `$VESPER_KERNEL_CACHE` (default
~/.cache/vesper_jax/kernels); ~7 s to build. Where there is no compiler, or the build fails, it logs why
once and returns False, and the callers keep their JAX code (vesper_jax/attention_cpu.py, losses.py,
era.py, quantize.py, sampling.py). `VESPER_CPU_KERNELS=0` turns the kernels off (to compare, or to rule
them out).

One device only (`usable`): XLA's SPMD partitioner does not know how to split these calls, so over a
mesh of several devices it would gather every operand to every device; there the JAX code runs, which
it partitions like every other op.
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

_DIR = Path(__file__).parent
SOURCES = ('attention_cpu.cc', 'cross_entropy_cpu.cc', 'era_cpu.cc', 'quantized_matmul_cpu.cc',
           'sampling_cpu.cc')
_HEADERS = ('cpu_common.h',)
# FFI target name -> the library's handler symbol.
TARGETS = {'vesper_attention_forward': 'VesperAttentionForward',
           'vesper_attention_backward': 'VesperAttentionBackward',
           'vesper_softmax_cross_entropy': 'VesperSoftmaxCrossEntropy',
           'vesper_era_forward': 'VesperEraForward', 'vesper_era_backward': 'VesperEraBackward',
           'vesper_int8_matmul': 'VesperInt8Matmul', 'vesper_int4_matmul': 'VesperInt4Matmul',
           'vesper_sample': 'VesperSample'}
LANES = 16  # the kernels' vector width in floats
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


@functools.cache
def wide_vectors() -> bool:
  """Whether this CPU has AVX-512 (the kernels' 16-float vectors in one register each)."""
  return 'avx512f' in _cpu_flags().split()


def _cache_dir() -> Path:
  return Path(os.environ.get('VESPER_KERNEL_CACHE', Path.home() / '.cache' / 'vesper_jax' / 'kernels'))


def build(compiler: str) -> Path:
  """The compiled library's path, compiled now unless the cache holds it. Raises on a failed build."""
  import jaxlib
  texts = [(_DIR / name).read_text() for name in (*SOURCES, *_HEADERS)]
  key = hashlib.sha256('\0'.join([*texts, compiler, ' '.join(_FLAGS), jaxlib.__version__,
                                  _cpu_flags()]).encode()).hexdigest()[:16]
  target = _cache_dir() / f'vesper_cpu_kernels-{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target, then renamed: processes that build at once (test workers) never load a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  try:
    cmd = [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{_DIR}', *(str(_DIR / n) for n in SOURCES),
           '-o', tmp]
    logging.info('vesper_jax: building the CPU kernels (once per machine, ~7 s): %s', ' '.join(cmd))
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f'{" ".join(cmd)} did not finish in 10 minutes') from e
    if done.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed:\n{done.stderr[-2000:]}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered (once per process; False says why in the log)."""
  if os.environ.get('VESPER_CPU_KERNELS', '1') == '0':
    return False
  compiler = _compiler()
  if compiler is None:
    logging.warning('vesper_jax: no C++ compiler (g++, c++, clang++ or $CXX) found: the CPU kernels '
                    '(attention, the head\'s softmax, ERA) run as plain JAX ops, slower (README, "CPU '
                    'train step")')
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (OSError, RuntimeError) as e:
    logging.warning('vesper_jax: the CPU kernels did not build, so attention, the head\'s softmax and '
                    'ERA run as plain JAX ops: %s', e)
    return False
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return True


def require() -> None:
  """Raises unless the kernels are available (for callers that ask for a kernel explicitly)."""
  if not available():
    raise RuntimeError('the vesper_jax CPU kernels are not available here (see the warning logged above, '
                       'or VESPER_CPU_KERNELS=0)')


def usable(*operands: jax.Array) -> bool:
  """Whether a kernel may run on these operands: float32, one device, and the library available.

  The callers ask only when the CPU platform's choices are made (vesper_jax/platforms.py): the model,
  the loss and ERA decide that from the platform they carry, not from here.
  """
  return all(a.dtype == jnp.float32 for a in operands) and jax.device_count() == 1 and available()
