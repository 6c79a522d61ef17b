"""host_memory: freed host memory is kept for reuse, so a repeated large allocation is not faulted in again."""

import os
import subprocess
import sys

import pytest

# A thread other than the main one (as XLA's workers) allocates, touches and frees a 64 MiB block three
# times; prints the page faults of each touch. Run in a fresh process: the settings apply to threads
# that start after them (importing vesper_jax applies them).
_SCRIPT = """
import ctypes, resource, sys, threading
if sys.argv[1] == 'vesper_jax':
  import vesper_jax
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
def worker():
  for _ in range(3):
    block = libc.malloc(64 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.memset(block, 1, 64 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
thread = threading.Thread(target=worker)
thread.start()
thread.join()
print(*faults)
"""


def _page_faults(first_import: str, **env: str) -> list[int]:
  out = subprocess.run([sys.executable, '-c', _SCRIPT, first_import], check=True, capture_output=True,
                       text=True, timeout=60, env={**os.environ, **env})
  return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings (Linux only)')
def test_a_freed_large_block_is_reused_without_page_faults():
  pages = 64 * 2**20 // 4096
  assert min(_page_faults('jax')) >= pages // 2          # glibc's default: a fresh mmap every time
  assert max(_page_faults('vesper_jax')[1:]) < pages // 100  # after the first: the same memory, reused
  # The opt-out, and a process whose JAX runs on an accelerator: glibc's defaults are left alone.
  assert min(_page_faults('vesper_jax', VESPER_SYSTEM_MALLOC='1')) >= pages // 2
  assert min(_page_faults('vesper_jax', JAX_PLATFORMS='cuda')) >= pages // 2
  assert max(_page_faults('vesper_jax', JAX_PLATFORMS='cpu')[1:]) < pages // 100
