"""Tokenizers: load any Hugging Face `tokenizer.json`, or train a byte-level BPE on the corpus (SPEC §6).

`Tokenizer` is a thin wrapper around `tokenizers.Tokenizer` that fixes the special-token ids the rest of
the code needs (EOS always; BOS and PAD when the tokenizer has them) and never adds special tokens
implicitly: the data pipeline places EOS between documents itself, so a tokenizer's post-processor
(BARThez's `<s> ... </s>` template, say) never leaks into the token stream.

`BatchEncoder` encodes a corpus at the tokenizer's own speed: in a process that runs under host_memory's
single malloc arena (a CPU-only training process), the tokenizer's threads would queue on that arena's
lock, so a corpus larger than one batch is encoded by a child process with glibc's default arenas.
"""

import collections
import copy
import hashlib
import json
import os
import pathlib
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import tokenizers
from absl import logging
from tokenizers import decoders, models, pre_tokenizers, trainers

from vesper_jax import host_memory

# Special tokens recognised by name, most specific first. EOS is required: it separates documents.
EOS_CANDIDATES = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>', '<|eos|>', '[SEP]')
BOS_CANDIDATES = ('<s>', '<|begin_of_text|>', '<bos>', '<|bos|>', '[CLS]')
PAD_CANDIDATES = ('<pad>', '<|pad|>', '[PAD]')

# The trained BPE's only special token: GPT-2's end-of-text, which is also TinyStories' separator.
BPE_EOS = '<|endoftext|>'
# Bump when the trainer settings below change, so cached tokenizers trained the old way are not reused.
BPE_TRAINER_VERSION = 2
# BPE training is quadratic in the length of a pre-token: text without whitespace or punctuation
# (minified data, long base64) would be one pre-token and stall training for minutes. Runs of this many
# non-space characters are cut into pieces first; ordinary words never reach it, so they are unaffected.
MAX_PRETOKEN_CHARS = 64


class Tokenizer:
  """A loaded `tokenizer.json` with its special-token ids resolved."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, path: str, eos_token: str = ''):
    """`eos_token` (data.eos_token) names the end-of-text token; '' finds it (see `_find_eos`)."""
    self._tokenizer = tokenizer
    self.path = str(path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    # get_vocab_size can undercount when ids have gaps; the model needs max id + 1 rows.
    self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    self.eos_id: int = _find_eos(tokenizer, self.path, eos_token)
    self.bos_id: int | None = _first_id(tokenizer, BOS_CANDIDATES)
    self.pad_id: int | None = _first_id(tokenizer, PAD_CANDIDATES)

  @classmethod
  def load(cls, path: str | os.PathLike, eos_token: str = '') -> 'Tokenizer':
    """Loads a Hugging Face `tokenizer.json`; the error names the file if it is missing, unreadable or
    invalid. `eos_token`: as in the constructor."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer file not found: {path}')
    try:
      text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:  # permissions, I/O errors, binary garbage
      raise ValueError(f'{path}: cannot read the tokenizer file ({e.__class__.__name__}: {e})') from e
    try:
      tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every parse error.
      raise ValueError(f'{path}: not a valid Hugging Face tokenizer.json ({e})') from e
    return cls(tokenizer, str(path), eos_token)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, encoded in parallel by the Rust library (no offsets computed)."""
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` (a list, array or jax.Array of ints)."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(int(token_id))

  def relocated(self, path: str | os.PathLike) -> 'Tokenizer':
    """This tokenizer, recorded as loaded from `path` (a byte-identical copy of its file)."""
    other = copy.copy(self)
    other.path = str(path)
    return other

  def sha256(self) -> str:
    """sha256 of the tokenizer file's bytes: what caches and checkpoints record."""
    return file_sha256(self.path)

  def __repr__(self) -> str:
    return (f'Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, '
            f'bos_id={self.bos_id}, pad_id={self.pad_id})')


# Below this many bytes of corpus, encoding under the single arena costs less than a child process does
# (~0.4 s to start, most of it loading the tokenizer): one batch of data.BATCH_CHARS characters.
OUT_OF_PROCESS_BYTES = 1 << 20


class BatchEncoder:
  """Encodes a stream of batches with a tokenizer file at the tokenizer's own speed (a context manager).

  In a process under host_memory's single arena (where the tokenizer's threads would queue on one malloc
  lock), a corpus of more than OUT_OF_PROCESS_BYTES is encoded by a child process that keeps glibc's
  default arenas (VESPER_SYSTEM_MALLOC=1). It is started here, so that it loads the tokenizer while the
  caller does, and it runs one batch ahead: the caller reads and writes batch k while the child encodes
  batch k + 1. Otherwise the batches are encoded in this process. The ids are the same either way: the
  child loads the same file and calls the same `Tokenizer.encode_batch`.
  """

  def __init__(self, path: str | os.PathLike, eos_token: str, corpus_bytes: int):
    """`path`, `eos_token`: as for `Tokenizer.load`; `corpus_bytes`: the size of what will be encoded."""
    self._child = None
    if host_memory.single_arena() and corpus_bytes > OUT_OF_PROCESS_BYTES:
      self._child = _EncoderProcess(path, eos_token)

  def encode_batches(self, tokenizer: Tokenizer, batches: Iterable[tuple[Any, Sequence[str]]]
                     ) -> Iterator[tuple[Any, list[list[int]]]]:
    """(tag, `tokenizer.encode_batch(texts)`) for each (tag, texts) of `batches`, in order. `tokenizer`
    is the one loaded from the same file, used when the batches are encoded in this process."""
    if self._child is None:
      for tag, texts in batches:
        yield tag, tokenizer.encode_batch(texts)
      return
    in_flight = collections.deque()
    for tag, texts in batches:
      self._child.send(texts)
      in_flight.append(tag)
      if len(in_flight) > 1:
        yield in_flight.popleft(), self._child.receive()
    while in_flight:
      yield in_flight.popleft(), self._child.receive()

  def __enter__(self) -> 'BatchEncoder':
    return self

  def __exit__(self, *exc) -> None:
    if self._child is not None:
      self._child.close(kill=exc[0] is not None)


class _EncoderProcess:
  """A child process (`_serve_encoder`) that encodes batches of texts, in order, with a tokenizer file."""

  def __init__(self, path: str | os.PathLike, eos_token: str):
    package_root = str(pathlib.Path(__file__).resolve().parent.parent)
    env = {**os.environ, **host_memory.SYSTEM_MALLOC_ENV,
           'PYTHONPATH': os.pathsep.join(filter(None, [package_root, os.environ.get('PYTHONPATH')]))}
    command = [sys.executable, '-c', 'from vesper_jax import tokenizer; tokenizer._serve_encoder()',
               str(path), eos_token]
    self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    self.pid = self._process.pid
    self._hello: dict | None = None

  def send(self, texts: Sequence[str]) -> None:
    try:
      pickle.dump(list(texts), self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
      self._process.stdin.flush()
    except BrokenPipeError:
      raise self._died() from None

  def receive(self) -> list[list[int]]:
    if self._hello is None:
      self._hello = self._read()
      if self._hello['single_arena']:
        raise RuntimeError(f'the tokenizer process {self.pid} runs under host_memory\'s single arena')
      logging.info('tokenizing in process %d (glibc\'s malloc arenas; this process has one arena)', self.pid)
    error, encoded = self._read()
    if error:
      raise RuntimeError(f'the tokenizer process failed: {error}')
    return encoded

  def close(self, kill: bool = False) -> None:
    """Ends the child: at once with `kill`, else once it has read the end of its input."""
    try:
      self._process.stdin.close()
    except OSError:
      pass
    if kill:
      self._process.kill()
    try:
      self._process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    self._process.stdout.close()

  def _read(self) -> Any:
    try:
      return pickle.load(self._process.stdout)
    except EOFError:
      raise self._died() from None

  def _died(self) -> RuntimeError:
    return RuntimeError(f'the tokenizer process {self.pid} exited with status {self._process.wait()} '
                        '(its error, if any, is above on stderr)')


def _serve_encoder() -> None:
  """The child side of `_EncoderProcess`: batches (pickled lists of texts) on stdin; a hello, then for
  each batch (error or None, token ids of each text) on stdout, in order. argv: tokenizer file, eos_token."""
  replies = os.fdopen(os.dup(1), 'wb')
  os.dup2(2, 1)  # anything else written to stdout goes to stderr, not into the replies
  pickle.dump({'pid': os.getpid(), 'single_arena': host_memory.single_arena()}, replies)
  replies.flush()
  requests = queue.SimpleQueue()
  threading.Thread(target=_read_requests, args=(sys.stdin.buffer, requests), daemon=True).start()
  try:
    tokenizer, error = Tokenizer.load(sys.argv[1], sys.argv[2]), None
  except Exception as e:  # pylint: disable=broad-except  (the parent, loading the same file, says why first)
    tokenizer, error = None, f'{type(e).__name__}: {e}'
  while (texts := requests.get()) is not None:
    try:
      reply = (error, None) if error else (None, tokenizer.encode_batch(texts))  # lists pickle fast
    except Exception as e:  # pylint: disable=broad-except  (reported to the parent, which raises)
      reply = (f'{type(e).__name__}: {e}', None)
    pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
    replies.flush()


def _read_requests(stream: BinaryIO, requests: queue.SimpleQueue) -> None:
  """Queues every batch as it arrives, so the parent never waits on a full pipe while the child writes."""
  try:
    while True:
      requests.put(pickle.load(stream))
  except (EOFError, OSError):
    requests.put(None)


def _find_eos(tokenizer: tokenizers.Tokenizer, path: str, eos_token: str) -> int:
  """The end-of-text id: `eos_token` if named; else a well-known name (EOS_CANDIDATES); else the special
  token the tokenizer's own post-processor puts at the end of a sequence; else the one special added
  token, or the one whose name says end (eos, eot, end). Raises ValueError listing the special tokens."""
  specials = [t.content for _, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special]
  if eos_token:
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
      raise ValueError(f'{path}: data.eos_token={eos_token!r} is not in the tokenizer '
                       f'(its special tokens: {specials})')
    return token_id
  found = _first_id(tokenizer, EOS_CANDIDATES)
  if found is not None:
    return found
  ending = _post_processor_end(json.loads(tokenizer.to_str()).get('post_processor'))
  named = [t for t in specials if any(w in t.lower() for w in ('eos', 'eot', 'end'))]
  for candidate in ([ending] if ending else []) + (named if len(named) == 1 else []) + (
      specials if len(specials) == 1 else []):
    if tokenizer.token_to_id(candidate) is not None:
      return tokenizer.token_to_id(candidate)
  raise ValueError(f'{path}: cannot tell which token ends a text: none of {list(EOS_CANDIDATES)}, and '
                   f'its special tokens {specials} do not say; name it with --config.data.eos_token=...')


def _post_processor_end(processor: dict | None) -> str | None:
  """The special token a post-processor appends to a single sequence (`$A </s>` -> '</s>'), if any."""
  if not processor:
    return None
  kind = processor.get('type')
  if kind == 'Sequence':
    ends = [_post_processor_end(p) for p in processor.get('processors', [])]
    return next((e for e in reversed(ends) if e), None)
  if kind == 'TemplateProcessing' and processor.get('single'):
    last = processor['single'][-1]
    return last['SpecialToken']['id'] if 'SpecialToken' in last else None
  if kind in ('RobertaProcessing', 'BertProcessing') and processor.get('sep'):
    return processor['sep'][0]
  return None


def _first_id(tokenizer: tokenizers.Tokenizer, candidates: Sequence[str]) -> int | None:
  for token in candidates:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id
  return None


def file_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike, *,
              length: int | None = None, progress: bool = False) -> Tokenizer:
  """Trains a byte-level BPE (GPT-2 style) with `<|endoftext|>` as EOS and saves it atomically.

  Deterministic: the same texts and vocab_size give a byte-identical file. The vocabulary has exactly
  `vocab_size` entries unless the corpus is too small to learn that many merges (then it is logged).

  Args:
    texts: the training documents (or pieces of them).
    vocab_size: the target vocabulary, special token and the 256 byte symbols included.
    path: where to write `tokenizer.json` (a temporary name is renamed onto it when complete).
    length: the number of texts, for the progress bar.
    progress: show the `tokenizers` progress bar (on a terminal only: elsewhere it prints blank lines).
  """
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise ValueError(f'model.vocab_size={vocab_size} is too small for a byte-level BPE '
                     f'(needs at least {len(alphabet) + 1}: 256 byte symbols and {BPE_EOS})')
  tokenizer = tokenizers.Tokenizer(models.BPE())
  # add_prefix_space=False keeps decode(encode(s)) == s exactly.
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(rf'[^\s]{{{MAX_PRETOKEN_CHARS}}}'), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], initial_alphabet=alphabet,
                                show_progress=progress and sys.stdout.isatty())
  tokenizer.train_from_iterator(texts, trainer, length=length)
  got = tokenizer.get_vocab_size(with_added_tokens=True)
  if got < vocab_size:
    logging.warning('the corpus only supports %d BPE tokens (asked for %d); the model keeps %d rows',
                    got, vocab_size, vocab_size)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  tokenizer.save(str(tmp))
  os.replace(tmp, path)
  return Tokenizer(tokenizer, str(path))
