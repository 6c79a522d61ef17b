"""Host memory: glibc keeps the memory XLA:CPU frees, so a step's buffers are not faulted in again next step.

XLA:CPU allocates one block per execution for all of a step's intermediates (about 0.65 GB for the
`small` model at batch 8 × 256) with malloc and frees it when the step ends. glibc serves any block over
32 MiB with a fresh mmap and returns it on free, so every step page-faulted its whole working set back
in: about 170,000 faults and 0.35 s of kernel time per step (a tenth of the step's CPU time; 0.7 million
faults and over 1 s at batch 32). With the three settings below the block stays in the heap and is
reused: no faults after the first steps.

  M_ARENA_MAX=1          one arena: XLA's worker threads allocate from the main heap, the only one that
                         can hold blocks larger than 64 MiB without mmap;
  M_MMAP_MAX=0           large blocks come from the heap, not from mmap;
  M_TRIM_THRESHOLD=-1    freed memory at the top of the heap is kept, never returned (trimming off).

The cost is memory that stays mapped after its peak (the next step needs it again) and one malloc lock
for all threads: other multi-threaded work in the process queues on it. The tokenizer's parallel
encoding is such work (BARThez on 21 MB of TinyStories: 0.58M tokens/s in `prepare` under one arena,
2.00M with glibc's arenas), so the token cache is not tokenized under it: `tokenizer.BatchEncoder` hands
a corpus larger than 1 MiB to a child process started with VESPER_SYSTEM_MALLOC=1 (SYSTEM_MALLOC_ENV),
which keeps glibc's defaults; reading and writing stay here, and the bytes are the same. That holds for
`prepare`, for `train` building its cache on a first run, and for a notebook calling either. Applying
the settings later instead (after the data, before JAX) does not work once the tokenizer has run in the
process: threads keep the arena they started with, and M_ARENA_MAX=1 then hands new threads the existing
arenas in turn, the tokenizer's included, whose heaps cannot hold a block over 64 MiB without mmap
(measured: after an in-process encode, 4 of 6 threads started after the settings faulted a freed 64 MiB
block in again on every allocation; none did without the encode).

The step gains more than the lock costs on a CPU-only machine, so the settings are applied when
`vesper_jax` is imported (the package's __init__), and the entry points, benchmarks, scripts and
notebooks all get the same step: a script without them ran `small`'s 8 x 256 step 13% slower (1,393
against 1,582 tok/s, ../shared/bench/cpu_side_by_side.py). Not applied where JAX will run on an
accelerator (JAX_PLATFORMS names one first, or a CUDA / TPU plugin is installed and JAX_PLATFORMS does
not say cpu): there the step does not use host malloc, and tokenization stays in the process.
VESPER_SYSTEM_MALLOC=1 keeps glibc's defaults anywhere (e.g. to compare). It takes full effect when the
import comes before JAX starts its CPU backend (threads keep the arena they started with). Other C
libraries (macOS, musl) are left alone. `single_arena()` says whether this process runs under them.
"""

import ctypes
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
SYSTEM_MALLOC_ENV = {'VESPER_SYSTEM_MALLOC': '1'}  # in a child's environment: it keeps glibc's defaults
_applied = False  # whether this process runs under the settings (set by retain_freed_memory)


def retain_freed_memory() -> bool:
  """Applies the settings above; returns whether glibc accepted all three (False elsewhere)."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError):
    return False
  global _applied
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
  return _applied


def single_arena() -> bool:
  """Whether this process runs under the settings above (one malloc arena for every thread)."""
  return _applied


def apply_default() -> bool:
  """`retain_freed_memory()` for a CPU-only process, unless VESPER_SYSTEM_MALLOC=1; returns whether applied."""
  if os.environ.get('VESPER_SYSTEM_MALLOC', '0') not in ('', '0') or _accelerator_expected():
    return False
  return retain_freed_memory()


# Modules whose presence means jax picks a GPU / TPU by default (jax[cuda12], jax[cuda13], jax[tpu]).
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu')


def _accelerator_expected() -> bool:
  """Whether JAX will run on an accelerator, judged without importing jax (this runs while vesper_jax is
  imported): JAX_PLATFORMS's first entry, else an installed accelerator plugin."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)
