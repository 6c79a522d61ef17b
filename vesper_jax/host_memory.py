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
for all threads. It is applied when `vesper_jax` is imported (the package's __init__), so the entry
points, benchmarks, scripts and notebooks all get it: a script that imported only JAX and the library's
modules without it ran `small`'s 8 x 256 step 13% slower (1,393 against 1,582 tok/s,
../shared/bench/cpu_side_by_side.py). It takes full effect when the import comes before JAX starts its CPU
backend (threads keep the arena they started with), as it does when a program imports what it uses first.
VESPER_SYSTEM_MALLOC=1 keeps glibc's defaults (e.g. to compare, or for a host program that needs many
malloc arenas). Other C libraries (macOS, musl) are left alone.
"""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
  """Applies the settings above; returns whether glibc accepted all three (False elsewhere)."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def apply_default() -> bool:
  """`retain_freed_memory()` unless the environment says VESPER_SYSTEM_MALLOC=1 (then nothing changes)."""
  if os.environ.get('VESPER_SYSTEM_MALLOC', '0') not in ('', '0'):
    return False
  return retain_freed_memory()
