"""The token cache and batches (SPEC §6): config → documents → tokens on disk → training windows.

Cache layout, under <cache_dir>/tokens/<key>/ (key = a hash of the source contents, the tokenizer file
and every reading option, so any change rebuilds and nothing else does):
  train.bin, val.bin   flat uint16 (uint32 when the vocabulary needs it) token ids; each document is
                       followed by the tokenizer's EOS id
  tokenizer.json       a copy of the tokenizer the tokens were made with
  meta.json            format version, dtype, counts, hashes, options, what was skipped and why
A cache is built in a temporary directory and renamed into place when complete, so a run killed while
writing leaves nothing that a later run would accept. Opening maps the token files (np.memmap) without
reading them; the only work that grows with the corpus is hashing the source files for the key (~1 GB/s).

The split is by documents: document i (in source order) is held out for validation when
floor((i + 1) * val_fraction) > floor(i * val_fraction), i.e. every 1/val_fraction-th document. A corpus
with too few documents for that (one book, say) holds out the last val_fraction of its tokens instead.

Batches are windows of seq_len + 1 tokens (inputs and shifted targets) at offsets drawn from a generator
seeded with (seed, step): the global batch for a step is a pure function of them, so resuming needs only
the step, and each process gathers only its own rows.
"""

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import logging

from vesper_jax import config as config_lib
from vesper_jax import sources as sources_lib
from vesper_jax import tokenizer as tokenizer_lib
from vesper_jax.sources import DataError
from vesper_jax.tokenizer import Tokenizer

FORMAT_VERSION = 1    # bump when the layout or the reading/splitting rules change: old caches then rebuild
PIECE_CHARS = 16_384  # long documents are encoded in pieces of about this size, so both cores get work
BATCH_CHARS = 1 << 20  # characters per encode_batch call: a build's peak memory grows with it, not the corpus
_MAX_SKIPPED_IN_META = 100


@dataclasses.dataclass
class TokenCache:
  """An opened token cache: memory-mapped train/val token arrays and the tokenizer that made them."""
  directory: pathlib.Path
  meta: dict
  train: np.ndarray  # 1-D np.memmap of token ids, documents each followed by EOS
  val: np.ndarray    # the same for the validation documents (empty when data.val_fraction = 0)
  built: bool = False          # True when this call tokenized the corpus, False when it opened a cache
  open_seconds: float = 0.0    # wall time of build_or_load_cache (source hashing included)
  eos_token: str = ''          # data.eos_token the tokens were made with ('' = found by the tokenizer)
  _tokenizer: Tokenizer | None = dataclasses.field(default=None, repr=False)

  @property
  def tokenizer(self) -> Tokenizer:
    """The tokenizer the tokens were made with (the copy in `directory`), loaded on first use.

    Loading a large tokenizer.json takes longer than opening the cache itself, and training never needs
    it: only sampling and chat do.
    """
    if self._tokenizer is None:
      self._tokenizer = Tokenizer.load(self.directory / 'tokenizer.json', self.eos_token)
    return self._tokenizer


def build_or_load_cache(data_config: ml_collections.ConfigDict, vocab_size: int, *,
                        progress: bool = True) -> TokenCache:
  """Opens the token cache for `data_config`, building it (and training a BPE) first if needed.

  Args:
    data_config: the `data` section of the config.
    vocab_size: the model's vocabulary. A trained BPE gets exactly this size; a tokenizer.json with more
      tokens raises ValueError naming both numbers (before anything is trained or tokenized).
    progress: show progress bars.

  Returns:
    The opened cache. Raises DataError (a ValueError) on bad input under data.on_error='fail', when no
    document could be read, or when a split is shorter than one window of data.seq_len + 1 tokens.
  """
  start = time.perf_counter()
  options = sources_lib.ReadOptions.from_config(data_config)
  if not 0.0 <= data_config.val_fraction < 1.0:
    raise ValueError(f'data.val_fraction={data_config.val_fraction} must be in [0, 1)')
  cache_dir = sources_lib.default_cache_dir(data_config.cache_dir)
  errors = sources_lib.ErrorLog(options.on_error)
  sources = sources_lib.resolve_sources(data_config.sources, errors, cache_dir=cache_dir,
                                        download_base_url=data_config.download_base_url, progress=progress)
  reading = {'format_version': FORMAT_VERSION, 'options': dataclasses.asdict(options),
             'sources': [[s.kind, s.name, s.digest()] for s in sources]}
  tokenizer_origin = ''
  if data_config.tokenizer:
    tokenizer_path, tokenizer_origin = tokenizer_file(data_config.tokenizer)
  else:
    tokenizer_path = _trained_bpe(vocab_size, data_config.bpe_sample_bytes, reading, sources, options,
                                  cache_dir, progress)
  key = _hash({**reading, 'tokenizer_sha256': _tokenizer_sha256(tokenizer_path),
               'val_fraction': data_config.val_fraction, 'eos_token': data_config.eos_token})
  directory = cache_dir / 'tokens' / key[:24]
  cache = _open(directory, key) if (directory / 'meta.json').exists() else None
  if cache is None:
    # Started first (a child process when this one has a single malloc arena: tokenizer.BatchEncoder), so
    # that it loads the tokenizer while this process does.
    with tokenizer_lib.BatchEncoder(tokenizer_path, data_config.eos_token,
                                    sum(s.size() for s in sources)) as encoder:
      tokenizer = Tokenizer.load(tokenizer_path, data_config.eos_token)
      _check_vocab(tokenizer.vocab_size, vocab_size, tokenizer_path)
      _build(directory, key, reading, sources, options, errors, tokenizer, encoder, tokenizer_origin,
             data_config, progress)
    cache = _open(directory, key)
    cache.built = True
    cache._tokenizer = tokenizer.relocated(directory / 'tokenizer.json')  # the same bytes: no reload
  _check_vocab(cache.meta['vocab_size'], vocab_size, tokenizer_path)
  cache.eos_token = data_config.eos_token
  cache.open_seconds = time.perf_counter() - start
  logging.info('token cache %s: %d train / %d val tokens (%s in %.3fs)', directory, len(cache.train),
               len(cache.val), 'built' if cache.built else 'opened', cache.open_seconds)
  _check_windows(cache, data_config.seq_len, data_config.val_fraction)
  return cache


def tokenizer_file(spec: str) -> tuple[pathlib.Path, str]:
  """(local path, Hub origin or '') of data.tokenizer: a tokenizer.json path, or an hf:// path to one
  (fetched into the Hub cache, the revision resolved to a commit)."""
  if sources_lib.hub.is_hub(spec):
    try:
      file = sources_lib.hub.fetch_one(spec, what='data.tokenizer')
    except sources_lib.hub.HubError as e:
      raise DataError(f'data.tokenizer: {e}') from None
    return pathlib.Path(file.path), file.origin
  path = pathlib.Path(spec).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'data.tokenizer: tokenizer file not found: {path}')
  return path, ''


def _tokenizer_sha256(path: pathlib.Path) -> str:
  try:
    return tokenizer_lib.file_sha256(path)
  except OSError as e:  # permissions, I/O errors: one line naming the file, not a traceback
    raise ValueError(f'{path}: cannot read the tokenizer file ({e.__class__.__name__}: {e})') from e


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _check_vocab(tokenizer_vocab: int, model_vocab: int, path: pathlib.Path) -> None:
  if tokenizer_vocab > model_vocab:
    raise ValueError(f'{path} has {tokenizer_vocab} tokens, more than model.vocab_size={model_vocab}: '
                     f'set model.vocab_size to at least {tokenizer_vocab}')


def _trained_bpe(vocab_size: int, sample_bytes: int, reading: dict, sources, options,
                 cache_dir: pathlib.Path, progress: bool) -> pathlib.Path:
  """The path of a byte-level BPE trained on the first `sample_bytes` of the corpus's documents (all of
  them when 0), training it first if it is not cached. One BPE serves every run on the same corpus."""
  bpe_key = _hash({**reading, 'vocab_size': vocab_size, 'trainer': tokenizer_lib.BPE_TRAINER_VERSION,
                   'sample_bytes': sample_bytes})
  bpe_path = cache_dir / 'tokenizers' / f'bpe{vocab_size}-{bpe_key[:24]}' / 'tokenizer.json'
  if bpe_path.exists():
    return bpe_path
  logging.info('training a byte-level BPE with %d tokens on %s of the corpus -> %s', vocab_size,
               f'the first {sample_bytes:,} bytes' if sample_bytes else 'all', bpe_path)
  total = sum(s.size() for s in sources)
  bar = tqdm.tqdm(total=min(total, sample_bytes) if sample_bytes else total, unit='B', unit_scale=True,
                  desc='BPE sample', disable=not progress)
  with bar:
    tokenizer_lib.train_bpe(_sample(sources, options, sample_bytes, bar), vocab_size, bpe_path,
                            progress=progress)
    bar.update(bar.total - bar.n)  # stripped documents are a little shorter than their files
  return bpe_path


def _sample(sources, options, sample_bytes: int, bar: tqdm.tqdm) -> Iterator[str]:
  """Pieces of the corpus's documents, in order, up to the document that reaches `sample_bytes`."""
  # The tokenization pass reports bad input (once); this pass only needs to stop on it under 'fail'.
  quiet = sources_lib.ErrorLog(options.on_error, quiet=True)
  taken = 0
  for source in sources:
    for document in sources_lib.read_documents(source, options, quiet):
      size = len(document.encode())
      bar.update(min(size, bar.total - bar.n) if bar.total else size)
      yield from split_long(document, PIECE_CHARS)
      taken += size
      if sample_bytes and taken >= sample_bytes:
        return


def split_long(text: str, max_chars: int) -> Iterator[str]:
  """Cuts `text` into pieces of about max_chars where encoding the pieces equals encoding the whole.

  A cut goes just after a lone newline between two non-space characters, or (where there is none) just
  before a lone space between two non-space characters. Byte-level (GPT-2 regex) and whitespace or
  metaspace pre-tokenizers never join tokens across such a point. (A tokenizer whose normalizer
  prepends a marker to the whole input, like Llama 2's, differs by one token per cut.) A piece is longer
  than max_chars only where the text has no such point.
  """
  start = 0
  while len(text) - start > max_chars:
    cut = _last_cut(text, start + max_chars // 2, start + max_chars)
    lo = start + max_chars
    while cut is None and lo < len(text):  # nothing nearby: the first cut point further on
      cut = _first_cut(text, lo, min(lo + max_chars, len(text)))
      lo += max_chars
    if cut is None:
      break
    yield text[start:cut]
    start = cut
  yield text[start:]


def _is_lone(text: str, i: int) -> bool:
  return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


def _last_cut(text: str, lo: int, hi: int) -> int | None:
  for sep in ('\n', ' '):  # prefer line ends
    i = text.rfind(sep, lo, hi)
    while i > lo and not _is_lone(text, i):
      i = text.rfind(sep, lo, i)
    if i > lo:
      return i + 1 if sep == '\n' else i
  return None


def _first_cut(text: str, lo: int, hi: int) -> int | None:
  cuts = []
  for sep in ('\n', ' '):
    i = text.find(sep, lo, hi)
    while i != -1 and not _is_lone(text, i):
      i = text.find(sep, i + 1, hi)
    if i != -1:
      cuts.append(i + 1 if sep == '\n' else i)
  return min(cuts, default=None)


def _is_val(index: int, val_fraction: float) -> bool:
  return int((index + 1) * val_fraction) > int(index * val_fraction)


def _build(directory: pathlib.Path, key: str, reading: dict, sources, options, errors, tokenizer: Tokenizer,
           encoder: tokenizer_lib.BatchEncoder, tokenizer_origin: str, data_config: ml_collections.ConfigDict,
           progress: bool) -> None:
  """Tokenizes every source into a temporary directory, then renames it to `directory`."""
  start = time.perf_counter()
  directory.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_builds(directory.parent)
  tmp = directory.parent / f'{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  val_fraction = data_config.val_fraction
  per_source = [{'kind': s.kind, 'path': s.path, 'origin': s.origin, 'sha256': sha, 'documents': 0,
                 'tokens': 0} for s, (_, _, sha) in zip(sources, reading['sources'])]
  counts = {'train_documents': 0, 'val_documents': 0, 'train_tokens': 0, 'val_tokens': 0}

  try:
    tmp.mkdir()
    shutil.copyfile(tokenizer.path, tmp / 'tokenizer.json')
    # Bytes of the sources read (compressed ones as stored), so the bar's rate and ETA hold for any corpus.
    bar = tqdm.tqdm(total=sum(s.size() for s in sources), unit='B', unit_scale=True, desc='tokenizing',
                    disable=not progress)
    with open(tmp / 'train.bin', 'wb') as train_file, open(tmp / 'val.bin', 'wb') as val_file, bar:
      pieces = _pieces(sources, options, errors, val_fraction, counts, per_source, bar.update)
      batches = ((batch, [text for _, _, _, text in batch]) for batch in _batches(pieces, BATCH_CHARS))
      for batch, encoded in encoder.encode_batches(tokenizer, batches):
        out = {False: [], True: []}
        for (k, is_val, last, _), ids in zip(batch, encoded):
          if last:
            ids.append(tokenizer.eos_id)
          per_source[k]['tokens'] += len(ids)
          out[is_val].append(ids)
        for is_val, file in ((False, train_file), (True, val_file)):
          n = sum(map(len, out[is_val]))
          np.fromiter(itertools.chain.from_iterable(out[is_val]), dtype=dtype, count=n).tofile(file)
          counts['val_tokens' if is_val else 'train_tokens'] += n
        tokens = counts['train_tokens'] + counts['val_tokens']
        bar.set_postfix_str(f'{tokens:,} tokens, {tokens / max(bar.format_dict["elapsed"], 1e-9):,.0f} tok/s',
                            refresh=False)
      for file in (train_file, val_file):  # on disk before the rename, even if the machine goes down
        file.flush()
        os.fsync(file.fileno())
    if counts['train_documents'] + counts['val_documents'] == 0:
      raise DataError(f'no documents could be read from data.sources={data_config.sources!r}'
                      + (f' (skipped: {"; ".join(errors.skipped[:5])})' if errors.skipped else ''))
    split = 'documents'
    if val_fraction > 0 and counts['val_tokens'] == 0:
      split = 'tail'  # too few documents to hold any out: hold out the last tokens instead
      _move_tail(tmp, dtype, counts, val_fraction)
    meta = {
        'format_version': FORMAT_VERSION, 'key': key, 'dtype': np.dtype(dtype).name,
        **_tokenizer_meta(tokenizer), 'tokenizer_origin': tokenizer_origin, **counts, 'split': split,
        'val_fraction': val_fraction,
        'options': reading['options'], 'sources': per_source, 'skipped_count': len(errors.skipped),
        'skipped': errors.skipped[:_MAX_SKIPPED_IN_META], 'ignored': errors.ignored[:_MAX_SKIPPED_IN_META],
        **_timing_meta(start, counts['train_tokens'] + counts['val_tokens']),
    }
    _publish(tmp, directory, meta)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _pieces(sources, options, errors, val_fraction: float, counts: dict, per_source: list[dict],
            on_bytes: Callable[[int], Any]) -> Iterator[tuple[int, bool, bool, str]]:
  """(source index, is validation, last piece of its document, text) for every piece of every document,
  counting documents per split and per source as they are read."""
  index = 0
  for k, source in enumerate(sources):
    for document in sources_lib.read_documents(source, options, errors, on_bytes):
      is_val = _is_val(index, val_fraction)
      counts['val_documents' if is_val else 'train_documents'] += 1
      per_source[k]['documents'] += 1
      index += 1
      parts = list(split_long(document, PIECE_CHARS))
      for j, part in enumerate(parts):
        yield k, is_val, j == len(parts) - 1, part


def _tokenizer_meta(tokenizer: Tokenizer) -> dict[str, Any]:
  return {'vocab_size': tokenizer.vocab_size, 'eos_id': tokenizer.eos_id, 'bos_id': tokenizer.bos_id,
          'pad_id': tokenizer.pad_id, 'tokenizer_sha256': tokenizer.sha256(),
          'tokenizer_source': tokenizer.path}


def _timing_meta(start: float, tokens: int) -> dict[str, Any]:
  seconds = time.perf_counter() - start
  return {'build_seconds': seconds, 'tokens_per_second': tokens / max(seconds, 1e-9),
          'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')}


def _publish(tmp: pathlib.Path, directory: pathlib.Path, meta: dict[str, Any]) -> None:
  """Writes meta.json last, then gives the build its final name: a cache is complete or absent."""
  (tmp / 'meta.json').write_text(json.dumps(meta, indent=1, ensure_ascii=False))
  try:
    os.rename(tmp, directory)
  except OSError:
    if not (directory / 'meta.json').exists():
      raise
    logging.info('another process built %s first; using its cache', directory)
    shutil.rmtree(tmp, ignore_errors=True)


def _batches(pieces: Iterator[tuple], max_chars: int) -> Iterator[list[tuple]]:
  batch, chars = [], 0
  for piece in pieces:
    batch.append(piece)
    chars += len(piece[-1])
    if chars >= max_chars:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def _move_tail(directory: pathlib.Path, dtype, counts: dict, val_fraction: float) -> None:
  total = counts['train_tokens']
  n_val = max(1, round(total * val_fraction))
  tail = np.fromfile(directory / 'train.bin', dtype=dtype, offset=(total - n_val) * np.dtype(dtype).itemsize)
  tail.tofile(directory / 'val.bin')
  os.truncate(directory / 'train.bin', (total - n_val) * np.dtype(dtype).itemsize)
  counts['train_tokens'], counts['val_tokens'] = total - n_val, n_val


def _remove_stale_builds(parent: pathlib.Path) -> None:
  """Deletes temporary build directories left by dead processes on this host."""
  host = socket.gethostname()
  for tmp in parent.glob(f'*.tmp-{host}-*'):
    pid = tmp.name.rsplit('-', 2)[-2]
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      logging.info('removing an unfinished cache build left by process %s: %s', pid, tmp)
      shutil.rmtree(tmp, ignore_errors=True)
    except (ValueError, PermissionError):
      pass


def _open(directory: pathlib.Path, key: str) -> TokenCache | None:
  """Memory-maps a complete cache, or returns None (after removing it) if it does not check out."""
  try:
    meta = json.loads((directory / 'meta.json').read_text())
    dtype = np.dtype(meta['dtype'])
    arrays = {}
    for split in ('train', 'val'):
      path, n = directory / f'{split}.bin', meta[f'{split}_tokens']
      if meta['key'] != key or path.stat().st_size != n * dtype.itemsize:
        raise ValueError(f'{path} does not match {directory / "meta.json"}')
      arrays[split] = np.memmap(path, dtype=dtype, mode='r', shape=(n,)) if n else np.zeros(0, dtype)
    if not (directory / 'tokenizer.json').is_file():
      raise ValueError(f'{directory / "tokenizer.json"} is missing')
  except (OSError, ValueError, KeyError) as e:
    logging.warning('token cache %s is invalid (%s); rebuilding it', directory, e)
    shutil.rmtree(directory, ignore_errors=True)
    return None
  return TokenCache(directory, meta, arrays['train'], arrays['val'])


def _check_windows(cache: TokenCache, seq_len: int, val_fraction: float) -> None:
  for split, tokens, fix in (('training', cache.train, 'add text or lower data.seq_len'),
                             ('validation', cache.val, 'raise data.val_fraction or lower data.seq_len')):
    if (split == 'training' or val_fraction > 0) and len(tokens) < seq_len + 1:
      raise DataError(f'the {split} split of {cache.directory} has {len(tokens)} tokens, fewer than one '
                      f'window of data.seq_len + 1 = {seq_len + 1}: {fix}')


# ------------------------------------------------------------------------------------- guards (issue 17)

MAX_EPOCHS = 4                # a plan beyond this many passes over the train split is warned about
MAX_VOCAB_FRACTION = 0.1      # a trained BPE above this fraction of the train tokens is refused
MIN_VAL_TOKENS = 50_000       # a validation split below this is warned about
SIZE_CONFIGS = ('tiny', 'small', 'medium', 'large')  # configs/ files named when one would fit


def check_scale(cache: TokenCache, config: ml_collections.ConfigDict) -> list[str]:
  """Checks the run's plan against its data, once, before training; returns the warnings it logged.

  Refuses (DataError) a trained BPE (data.tokenizer = '') of model.vocab_size tokens above
  MAX_VOCAB_FRACTION of the train split: most of its tokens would be seen a handful of times. Warns when
  train.num_steps × train.batch_size × data.seq_len exceeds MAX_EPOCHS passes over the train split,
  and when the validation split holds fewer than MIN_VAL_TOKENS tokens.
  """
  t, d = config.train, config.data
  train_tokens, val_tokens = len(cache.train), len(cache.val)
  vocab = config.model.vocab_size
  if not d.tokenizer and vocab > MAX_VOCAB_FRACTION * train_tokens:
    raise DataError(
        f'a trained BPE of model.vocab_size={vocab:,} tokens is {vocab / train_tokens:.0%} of the '
        f'{train_tokens:,}-token train split (at most {MAX_VOCAB_FRACTION:.0%}): most tokens would be seen a '
        f'handful of times. Use more data (data.sources; configs/small.py and medium.py default to '
        f'download:tinystories_train), model.vocab_size <= {int(MAX_VOCAB_FRACTION * train_tokens):,}, '
        f'or a tokenizer.json (data.tokenizer)')
  warnings = []
  planned = t.num_steps * t.batch_size * d.seq_len
  if planned > MAX_EPOCHS * train_tokens:
    fits = [f'configs/{name}.py' for name, tokens in _size_config_budgets()
            if tokens <= MAX_EPOCHS * train_tokens]
    steps = MAX_EPOCHS * train_tokens // (t.batch_size * d.seq_len)
    warnings.append(
        f'train.num_steps={t.num_steps:,} × train.batch_size={t.batch_size} × data.seq_len={d.seq_len} = '
        f'{planned:,} tokens is {planned / train_tokens:,.1f} epochs of the {train_tokens:,}-token train '
        f'split (more than {MAX_EPOCHS}): the model will mostly memorise it. Fits this data: '
        + (f'{", ".join(fits)}; ' if fits else '')
        + f'--config.train.auto_scale=True (at most one epoch), --config.train.num_steps={steps:,} '
        f'({MAX_EPOCHS} epochs), or more data (data.sources)')
  if d.val_fraction > 0 and val_tokens < MIN_VAL_TOKENS:
    needed = d.val_fraction * MIN_VAL_TOKENS / max(val_tokens, 1)
    how = (f'--config.data.val_fraction={needed:.2g}' if needed <= 0.2 else
           'a larger corpus (data.sources; this one is too small for such a split)')
    warnings.append(
        f'the validation split has {val_tokens:,} tokens (fewer than {MIN_VAL_TOKENS:,}): its evaluation '
        f'noise is larger than most differences it could show. For about {MIN_VAL_TOKENS:,} use {how}')
  for warning in warnings:
    logging.warning('%s', warning)
  return warnings


def _size_config_budgets() -> list[tuple[str, int]]:
  """(name, planned tokens) of each configs/ size file present (a source checkout has them)."""
  budgets = []
  for name in SIZE_CONFIGS:
    if (config_lib.CONFIGS_DIR / f'{name}.py').is_file():
      c = config_lib.load_config_file(name)
      budgets.append((name, c.train.num_steps * c.train.batch_size * c.data.seq_len))
  return budgets


# ---------------------------------------------------------------------------------------------- batches


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This process's rows of the global training batch for `step`: int32 [batch_size // process_count, seq_len + 1].

  A pure function of its arguments. The global batch does not depend on process_count: process p gets
  rows [p * b, (p + 1) * b) of it, b = batch_size // process_count, and reads only those windows.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by process_count={process_count}')
  if len(tokens) < seq_len + 1:
    raise DataError(f'{len(tokens)} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}')
  rng = np.random.default_rng([seed, step])
  offsets = rng.integers(0, len(tokens) - seq_len, size=batch_size)
  per_process = batch_size // process_count
  mine = offsets[process_index * per_process:(process_index + 1) * per_process]
  return np.asarray(tokens[mine[:, None] + np.arange(seq_len + 1)], dtype=np.int32)


def num_eval_targets(tokens: np.ndarray, max_tokens: int = 0) -> int:
  """How many next-token targets an evaluation scores: every one of the split (len − 1), or the first
  `max_tokens` of them when that is smaller (0 = no bound)."""
  targets = max(0, len(tokens) - 1)
  return min(targets, max_tokens) if max_tokens > 0 else targets


def num_eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_tokens: int = 0) -> int:
  """How many `eval_batch`es cover those targets (windows of seq_len targets, batch_size per batch)."""
  windows = -(-num_eval_targets(tokens, max_tokens) // seq_len)
  return -(-windows // batch_size)


def eval_batch(tokens: np.ndarray, *, index: int, batch_size: int, seq_len: int, max_tokens: int = 0,
               process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of the index-th evaluation batch: (tokens_BT1 int32 [b, seq_len + 1],
  weights_BT float32 [b, seq_len]), b = batch_size // process_count; deterministic.

  Window w holds tokens [w·seq_len, (w + 1)·seq_len] (its targets start at w·seq_len + 1), so over all
  batches every target up to `num_eval_targets` is scored exactly once. Targets past that end, and whole
  windows that only pad the last batch, have weight 0 (their token ids are 0).
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by process_count={process_count}')
  n = num_eval_targets(tokens, max_tokens)
  if n == 0:
    raise DataError(f'{len(tokens)} tokens hold no next-token target to evaluate')
  per_process = batch_size // process_count
  rows = index * batch_size + process_index * per_process + np.arange(per_process)
  positions_BT1 = rows[:, None] * seq_len + np.arange(seq_len + 1)
  weights_BT = (positions_BT1[:, 1:] <= n).astype(np.float32)  # target at position p is scored if p ≤ n
  readable_BT1 = positions_BT1 < len(tokens)
  tokens_BT1 = np.where(readable_BT1, np.asarray(tokens[np.minimum(positions_BT1, len(tokens) - 1)]), 0)
  return tokens_BT1.astype(np.int32), weights_BT


class Prefetcher:
  """Computes fn(start_step), fn(start_step + 1), ... on a background thread, `depth` ahead.

  Iterating yields the results in order; an exception raised by fn is re-raised in the consumer.
  `fn` may place arrays on devices (jax.device_put releases the GIL). Call close() (or use `with`).
  """

  def __init__(self, fn: Callable[[int], Any], start_step: int, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(fn, start_step), daemon=True, name='prefetch')
    self._thread.start()

  def _run(self, fn: Callable[[int], Any], step: int) -> None:
    while not self._stop.is_set():
      try:
        item = (True, fn(step))
      except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
        item = (False, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if not item[0]:
        return
      step += 1

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Any:
    while True:
      if self._stop.is_set():
        raise StopIteration
      try:
        ok, value = self._queue.get(timeout=0.1)
      except queue.Empty:
        continue
      if not ok:
        self.close()
        raise value
      return value

  def close(self) -> None:
    """Stops the thread (after the call of fn in flight, if any, returns)."""
    self._stop.set()
    self._thread.join()

  def __enter__(self) -> 'Prefetcher':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
