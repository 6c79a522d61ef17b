"""Tokenizers: load any Hugging Face `tokenizer.json`, or train a byte-level BPE on the corpus (SPEC §6).

`Tokenizer` is a thin wrapper around `tokenizers.Tokenizer` that fixes the special-token ids the rest of
the code needs (EOS always; BOS and PAD when the tokenizer has them) and never adds special tokens
implicitly: the data pipeline places EOS between documents itself, so a tokenizer's post-processor
(BARThez's `<s> ... </s>` template, say) never leaks into the token stream.
"""

import copy
import hashlib
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence

import tokenizers
from absl import logging
from tokenizers import decoders, models, pre_tokenizers, trainers

# Special tokens recognised by name, most specific first. EOS is required: it separates documents.
EOS_CANDIDATES = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>', '<|eos|>', '[SEP]')
BOS_CANDIDATES = ('<s>', '<|begin_of_text|>', '<bos>', '<|bos|>', '[CLS]')
PAD_CANDIDATES = ('<pad>', '<|pad|>', '[PAD]')

# The trained BPE's only special token: GPT-2's end-of-text, which is also TinyStories' separator.
BPE_EOS = '<|endoftext|>'
# Bump when the trainer settings below change, so cached tokenizers trained the old way are not reused.
BPE_TRAINER_VERSION = 1


class Tokenizer:
  """A loaded `tokenizer.json` with its special-token ids resolved."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, path: str):
    self._tokenizer = tokenizer
    self.path = str(path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    # get_vocab_size can undercount when ids have gaps; the model needs max id + 1 rows.
    self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    eos_id = _first_id(tokenizer, EOS_CANDIDATES)
    if eos_id is None:
      raise ValueError(f'{self.path}: the tokenizer has none of the end-of-sequence tokens '
                       f'{list(EOS_CANDIDATES)}; one is needed to separate documents')
    self.eos_id: int = eos_id
    self.bos_id: int | None = _first_id(tokenizer, BOS_CANDIDATES)
    self.pad_id: int | None = _first_id(tokenizer, PAD_CANDIDATES)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Tokenizer':
    """Loads a Hugging Face `tokenizer.json`; the error names the file if it is missing or invalid."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer file not found: {path}')
    try:
      tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for every parse error.
      raise ValueError(f'{path}: not a valid Hugging Face tokenizer.json ({e})') from e
    return cls(tokenizer, str(path))

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
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
