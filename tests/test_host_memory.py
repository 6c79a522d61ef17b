"""host_memory: freed host memory is kept for reuse, so a repeated large allocation is not faulted in again;
the token cache is tokenized outside the single arena that this costs, with the same bytes."""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import FRENCH_TOKENIZER, MISERABLES, TINYSHAKESPEARE, TINYSTORIES
from vesper_jax import config as config_lib
from vesper_jax import data, host_memory
from vesper_jax import tokenizer as tokenizer_lib

glibc_only = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings (Linux only)')

# A thread other than the main one (as XLA's workers) allocates, touches and frees a 64 MiB block three
# times; prints the page faults of each touch. Run in a fresh process: the settings apply to threads
# that start after them (importing vesper_jax applies them). With a corpus and a cache folder as further
# arguments, the token cache is built first (tokenized by the child process that prepare starts).
_SCRIPT = """
import ctypes, resource, sys, threading
if sys.argv[1] == 'vesper_jax':
  import vesper_jax
if len(sys.argv) > 2:
  from vesper_jax import config, data
  cfg = config.get_config()
  cfg.data.sources, cfg.data.cache_dir, cfg.data.tokenizer = sys.argv[2], sys.argv[3], sys.argv[4]
  data.build_or_load_cache(cfg.data, 50_000, progress=False)
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
_PAGES = 64 * 2**20 // 4096


def _page_faults(first_import: str, *args: str, **env: str) -> list[int]:
  out = subprocess.run([sys.executable, '-c', _SCRIPT, first_import, *args], check=True, capture_output=True,
                       text=True, timeout=120, env={**os.environ, **env})
  return [int(n) for n in out.stdout.split()]


@glibc_only
def test_a_freed_large_block_is_reused_without_page_faults():
  assert min(_page_faults('jax')) >= _PAGES // 2          # glibc's default: a fresh mmap every time
  assert max(_page_faults('vesper_jax')[1:]) < _PAGES // 100  # after the first: the same memory, reused
  # The opt-out, and a process whose JAX runs on an accelerator: glibc's defaults are left alone.
  assert min(_page_faults('vesper_jax', VESPER_SYSTEM_MALLOC='1')) >= _PAGES // 2
  assert min(_page_faults('vesper_jax', JAX_PLATFORMS='cuda')) >= _PAGES // 2
  assert max(_page_faults('vesper_jax', JAX_PLATFORMS='cpu')[1:]) < _PAGES // 100


# A corpus of three batches (data.BATCH_CHARS = 1M characters), so prepare hands it to the child process.
def _corpus(tmp_path: pathlib.Path) -> pathlib.Path:
  parts = [TINYSTORIES.read_text(), MISERABLES.read_text(), TINYSHAKESPEARE.read_text()] * 10
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n<|endoftext|>\n'.join(parts))
  return corpus


def _build(corpus: pathlib.Path, cache_dir: pathlib.Path) -> data.TokenCache:
  cfg = config_lib.get_config()
  cfg.data.sources, cfg.data.cache_dir, cfg.data.tokenizer = str(corpus), str(cache_dir), str(FRENCH_TOKENIZER)
  return data.build_or_load_cache(cfg.data, 50_000, progress=False)


# Golden values: the cache of _corpus with the French fixture, made by the code before issue 24 (every
# batch encoded in the process). Update only when the reading or splitting rules change (FORMAT_VERSION).
_GOLDEN = {'train_documents': 1159, 'val_documents': 61, 'train_tokens': 1_060_841, 'val_tokens': 57_219,
           'train.bin': 'b5501512dd4d4850df27e40dd7b1f8deebee37668e502b746194fe4ff27f3a50',
           'val.bin': '92c82f3e0207c38b1bbd38a4c8688cc759e47d400810157ae2843f1e66f7a9d2'}


def _fingerprint(cache: data.TokenCache) -> dict:
  return {**{key: cache.meta[key] for key in ('train_documents', 'val_documents', 'train_tokens', 'val_tokens')},
          **{name: hashlib.sha256((cache.directory / name).read_bytes()).hexdigest()
             for name in ('train.bin', 'val.bin')}}


@glibc_only
def test_prepare_tokenizes_outside_the_single_arena_with_the_same_bytes(tmp_path, monkeypatch):
  # As in any CPU-only process (conftest's JAX_PLATFORMS=cpu: importing vesper_jax applied them here too).
  monkeypatch.setattr(host_memory, 'single_arena', lambda: True)

  def not_here(self, texts):
    raise AssertionError('encode_batch ran in the process that has one malloc arena')

  monkeypatch.setattr(tokenizer_lib.Tokenizer, 'encode_batch', not_here)
  assert _fingerprint(_build(_corpus(tmp_path), tmp_path / 'cache')) == _GOLDEN


def test_without_the_single_arena_the_same_bytes_are_made_here(tmp_path, monkeypatch):
  monkeypatch.setattr(host_memory, 'single_arena', lambda: False)  # as with VESPER_SYSTEM_MALLOC=1
  monkeypatch.setattr(tokenizer_lib, '_EncoderProcess', None)  # no child process on this path
  assert _fingerprint(_build(_corpus(tmp_path), tmp_path / 'cache')) == _GOLDEN


@glibc_only
def test_the_tokenizer_process_keeps_glibcs_arenas_or_is_refused(monkeypatch):
  monkeypatch.setattr(host_memory, 'single_arena', lambda: True)
  tokenizer = tokenizer_lib.Tokenizer.load(FRENCH_TOKENIZER)
  batches = [(k, ['Il était une fois', f'un petit chat numéro {k}.']) for k in range(3)]
  expected = [(k, tokenizer.encode_batch(texts)) for k, texts in batches]
  large = tokenizer_lib.OUT_OF_PROCESS_BYTES + 1  # what is encoded is not sized: a child is started
  with tokenizer_lib.BatchEncoder(FRENCH_TOKENIZER, '', large) as encoder:
    assert list(encoder.encode_batches(None, batches)) == expected  # no tokenizer here: the child's
  # Without VESPER_SYSTEM_MALLOC=1 in its environment the child would apply the settings on import:
  # its first reply says so, and the parent refuses it rather than tokenize slowly.
  monkeypatch.setattr(host_memory, 'SYSTEM_MALLOC_ENV', {'VESPER_SYSTEM_MALLOC': '0', 'JAX_PLATFORMS': 'cpu'})
  with pytest.raises(RuntimeError, match='single arena'):
    with tokenizer_lib.BatchEncoder(FRENCH_TOKENIZER, '', large) as encoder:
      list(encoder.encode_batches(None, batches))


@glibc_only
def test_the_train_step_keeps_the_settings_after_preparing_in_the_process(tmp_path):
  # What train.py does on a first run: build the token cache, then run the step, in one process.
  faults = _page_faults('vesper_jax', str(_corpus(tmp_path)), str(tmp_path / 'cache'), str(FRENCH_TOKENIZER),
                        JAX_PLATFORMS='cpu')
  assert max(faults[1:]) < _PAGES // 100
  assert (next((tmp_path / 'cache' / 'tokens').glob('*/meta.json'))).is_file()
