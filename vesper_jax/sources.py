"""Data sources (SPEC §6): resolving `data.sources`, reading documents from each kind of file, downloads.

A source entry is a file, a glob, a directory (searched recursively), `builtin:pydoc` (the CPython
documentation topics, so the quickstart needs no data and no network), an `hf://` path on the Hugging
Face Hub (hub.py: a file or glob of a dataset repo at a commit, through huggingface_hub's cache; its
files are read like local ones) or `download:NAME` (a built-in name, `DOWNLOADS`: those on the Hub are
`hf://` specs pinned to a commit, the others files fetched once into the cache dir and checked by
sha256). Files are read by suffix, with an optional `.gz`:
  .txt/.md (and any unknown suffix named explicitly): one document per file, split on data.doc_separator;
  .jsonl: one record per line, a text field (data.text_keys) or a chat record rendered by `render_chat`;
  .json: SQuAD format, one document per paragraph: the context, then each question with its first answer;
  .parquet (no .gz): one document per row of the first data.text_keys column present, streamed in record
    batches through pyarrow (the optional extra `vesper_jax[parquet]`).
Bad input is reported through `ErrorLog` under `data.on_error`: 'fail' raises `DataError` naming the
file and line (or JSON path), 'skip' logs it, counts it and goes on.
"""

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import http.client
import io
import json
import os
import pathlib
import socket
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import ml_collections
import tqdm
from absl import logging

from vesper_jax import hub
from vesper_jax import tokenizer as tokenizer_lib

TEXT_SUFFIXES = ('.txt', '.md', '.text')
JSONL_SUFFIXES = ('.jsonl',)
SQUAD_SUFFIXES = ('.json',)
PARQUET_SUFFIXES = ('.parquet',)
PARQUET_EXTRA = "pip install 'vesper_jax[parquet]'"  # how to get pyarrow, named where it is missing
BUILTIN_PYDOC = 'builtin:pydoc'
DOWNLOAD_PREFIX = 'download:'
ON_ERROR_POLICIES = ('skip', 'fail')
# The chat template (SPEC §10): one "Role: content" line per message. chat.py renders prompts the same way.
CHAT_ROLE_NAMES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}
_MAX_LOGGED = 20  # bad records logged one by one; the rest are only counted


class DataError(ValueError):
  """Bad input refused under data.on_error='fail', a failed download, or no documents at all."""


@dataclasses.dataclass(frozen=True)
class Download:
  """A public file that is not on the Hugging Face Hub, fetched by `download:NAME` / `prepare --download=NAME`
  into <cache_dir>/downloads and checked against its sha256. A mirror (data.download_base_url) serves it
  as `<base_url>/<filename>`: <cache_dir>/downloads served over HTTP, or read through a file:// URL, is one.
  """
  url: str              # its public source
  filename: str         # the name in the cache dir and on a mirror
  sha256: str           # checked before the file is renamed into place
  description: str


@dataclasses.dataclass(frozen=True)
class HubDownload:
  """A built-in name for an `hf://` spec pinned to a commit (hub.py fetches it: resumed downloads, retries,
  the Hub's own sha256 for LFS files, HF_ENDPOINT mirrors, HF_HUB_OFFLINE=1 from its cache)."""
  spec: str
  description: str


# Commits taken from public records of these repos (there is no Hub access where this was written): a
# wrong or vanished one fails in one line naming the repo and revision; override with the hf:// spec itself.
_TINYSTORIES = 'hf://datasets/roneneldan/TinyStories@f54c09fd23315a6f9c86f9dc80f725de7d8f9c64'
_FINEWEB_EDU = 'hf://datasets/HuggingFaceFW/fineweb-edu@87f09149ef4734204d70ed1d046ddc9ca3f2b8f9'

DOWNLOADS: dict[str, Download | HubDownload] = {
    'tinyshakespeare': Download(
        'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
        'tinyshakespeare.txt', '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
        'Tiny Shakespeare, 1.1 MB of English plays (one document)'),
    'tinystories': HubDownload(f'{_TINYSTORIES}/TinyStories-valid.txt',
                               'TinyStories validation split, ~19 MB, stories separated by <|endoftext|>'),
    'tinystories_train': HubDownload(f'{_TINYSTORIES}/TinyStories-train.txt',
                                     'TinyStories train split, ~1.9 GB, stories separated by <|endoftext|>'),
    'piaf': Download(
        'https://raw.githubusercontent.com/psorianom/piaf-combo-huggingface/HEAD/data/piaf-v1.1.json',
        'piaf-v1.1.json', '7f5b670ba07fed1ae093d7ff6b3be5529dce189d65e14cf81535ebbc4fcce54c',
        'PIAF v1.1, French question answering in SQuAD format (1,518 paragraphs)'),
    # configs/large.py: FineWeb-Edu (Penedo et al. 2024), the first 8 of the 14 parquet shards of its
    # 10B-GPT-2-token sample (~2 GB and ~0.7B tokens each): about one pass for large's 5.2B-token plan.
    'fineweb_edu_8': HubDownload(f'{_FINEWEB_EDU}/sample/10BT/00[0-7]_00000.parquet',
                                 'FineWeb-Edu sample-10BT, shards 000-007: ~16 GB of parquet, ~5.7B GPT-2 tokens'),
}


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """The `data` settings that change which documents are read (all of them enter the cache key)."""
  doc_separator: str
  text_keys: tuple[str, ...]
  squad_template: str
  on_error: str

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> 'ReadOptions':
    if data_config.on_error not in ON_ERROR_POLICIES:
      raise ValueError(f'data.on_error={data_config.on_error!r}: expected one of {ON_ERROR_POLICIES}')
    text_keys = tuple(k.strip() for k in data_config.text_keys.split(',') if k.strip())
    if not text_keys:
      raise ValueError('data.text_keys is empty: name at least one JSONL text field, e.g. "text,content"')
    try:
      data_config.squad_template.format(question='q', answer='a')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f'data.squad_template={data_config.squad_template!r} must use only {{question}} '
                       f'and {{answer}} ({e!r})') from e
    return cls(data_config.doc_separator, text_keys, data_config.squad_template, data_config.on_error)


class ErrorLog:
  """Applies data.on_error to bad input and keeps what was skipped (and ignored) for the summary."""

  def __init__(self, policy: str, *, quiet: bool = False):
    self.policy = policy
    self.quiet = quiet            # a second pass over the same sources: raise or count, don't log again
    self.skipped: list[str] = []  # bad input, skipped under 'skip'
    self.ignored: list[str] = []  # files in a directory that are not a readable kind (not an error)

  def report(self, where: str, message: str) -> None:
    text = f'{where}: {message}'
    if self.policy == 'fail':
      raise DataError(f"{text}  [data.on_error='fail'; use data.on_error=skip to skip such input]")
    if not self.quiet and len(self.skipped) < _MAX_LOGGED:
      logging.warning('skipped %s', text)
    self.skipped.append(text)

  def ignore(self, where: str, message: str) -> None:
    if not self.quiet:
      logging.info('ignored %s: %s', where, message)
    self.ignored.append(f'{where}: {message}')


@dataclasses.dataclass(frozen=True)
class Source:
  """One concrete input: kind is 'text', 'jsonl', 'squad', 'parquet', 'pydoc' or 'missing'."""
  kind: str
  path: str
  origin: str = ''  # for a Hub file, hf://...@<commit>/<file> (`path` is its copy in the Hub cache)

  @property
  def name(self) -> str:
    """What the cache key and the summary call this source: its Hub origin, else its path."""
    return self.origin or self.path

  def digest(self) -> str:
    """sha256 of what this source reads (file bytes; the topics for pydoc); 'missing' if absent."""
    if self.kind == 'missing':
      return 'missing'
    if self.kind == 'pydoc':
      return hashlib.sha256(json.dumps(_pydoc_topics(), sort_keys=True).encode()).hexdigest()
    try:
      return tokenizer_lib.file_sha256(self.path)
    except OSError as e:  # reading it will report the problem under data.on_error
      return f'unreadable: {e}'

  def size(self) -> int:
    """Bytes that reading this source goes through (on disk: compressed for .gz and .parquet)."""
    if self.kind == 'pydoc':
      return sum(len(t.encode()) for t in _pydoc_topics().values())
    try:
      return os.path.getsize(self.path) if self.kind != 'missing' else 0
    except OSError:
      return 0


def default_cache_dir(cache_dir: str) -> pathlib.Path:
  """data.cache_dir, else $XDG_CACHE_HOME/vesper_jax, else ~/.cache/vesper_jax."""
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  xdg = os.environ.get('XDG_CACHE_HOME')
  return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / '.cache') / 'vesper_jax'


def resolve_sources(spec: str, errors: ErrorLog, *, cache_dir: pathlib.Path, download_base_url: str,
                    progress: bool = True) -> list[Source]:
  """The concrete sources (absolute paths) named by a comma-separated data.sources, in a fixed order."""
  entries = [e.strip() for e in spec.split(',') if e.strip()]
  if not entries:
    raise ValueError('data.sources is empty: name files, globs, directories, hf:// paths, builtin:pydoc or '
                     'download:NAME')
  sources = []
  for entry in entries:
    if entry == BUILTIN_PYDOC:
      sources.append(Source('pydoc', BUILTIN_PYDOC))
    elif entry.startswith('builtin:'):
      raise ValueError(f'data.sources: unknown built-in {entry!r} (the only one is {BUILTIN_PYDOC})')
    elif hub.is_hub(entry):
      sources.extend(Source(_kind(f.path), f.path, f.origin) for f in hub_files(entry))
    elif entry.startswith(DOWNLOAD_PREFIX):
      name = entry[len(DOWNLOAD_PREFIX):]
      if isinstance(DOWNLOADS.get(name), HubDownload):
        sources.extend(Source(_kind(f.path), f.path, f.origin) for f in hub_files(DOWNLOADS[name].spec))
      else:
        path = download(name, cache_dir, base_url=download_base_url, progress=progress)
        sources.append(Source(_kind(path), str(path)))
    elif glob.has_magic(entry):
      matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
      if not matches:
        errors.report(entry, 'no file matches this glob')
        sources.append(Source('missing', entry))
      for match in map(os.path.abspath, matches):
        sources.extend(_directory(match, errors) if os.path.isdir(match) else [Source(_kind(match), match)])
    elif os.path.isdir(path := os.path.abspath(os.path.expanduser(entry))):
      sources.extend(_directory(path, errors))
    elif os.path.isfile(path):
      sources.append(Source(_kind(path), path))
    else:
      errors.report(entry, 'no such file or directory')
      sources.append(Source('missing', entry))
  if any(s.kind == 'parquet' for s in sources):
    _pyarrow(next(s.path for s in sources if s.kind == 'parquet'))  # before any work, not half-way
  return _once_each(sources)


def hub_files(spec: str) -> list[hub.HubFile]:
  """hub.fetch, its errors as DataError."""
  try:
    return hub.fetch(spec)
  except hub.HubError as e:
    raise DataError(str(e)) from None


def _once_each(sources: list[Source]) -> list[Source]:
  """The sources with each real file once: a recursive glob through a symlinked directory, or a file
  named twice, would otherwise be read (and trained on) several times."""
  seen, unique = set(), []
  for source in sources:
    # Hub files by origin: the cache stores identical files as one blob, but they are two documents' worth.
    real = source.origin or (os.path.realpath(source.path) if source.kind in _FILE_KINDS else source.path)
    if (source.kind, real) in seen:
      logging.info('data.sources: %s is %s again; read once', source.path, real)
      continue
    seen.add((source.kind, real))
    unique.append(source)
  return unique


_FILE_KINDS = ('text', 'jsonl', 'squad', 'parquet')


def _kind(path: str | os.PathLike) -> str:
  suffix = pathlib.Path(str(path).removesuffix('.gz')).suffix.lower()
  if suffix in PARQUET_SUFFIXES:
    return 'parquet'
  if suffix in JSONL_SUFFIXES:
    return 'jsonl'
  if suffix in SQUAD_SUFFIXES:
    return 'squad'
  return 'text'  # .txt/.md, and any other file named explicitly


def _directory(root: str, errors: ErrorLog) -> list[Source]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      suffix = pathlib.Path(name.removesuffix('.gz')).suffix.lower()
      if name.startswith('.'):
        continue
      if suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + SQUAD_SUFFIXES + PARQUET_SUFFIXES:
        found.append(Source(_kind(path), path))
      else:
        errors.ignore(path, f'unsupported file type {suffix or "(no suffix)"!r} in a source directory')
  if not found:
    errors.report(root, 'directory has no .txt/.md/.jsonl/.json/.parquet files')
    found.append(Source('missing', root))
  return found


# ---------------------------------------------------------------------------------------------- readers


def read_documents(source: Source, options: ReadOptions, errors: ErrorLog,
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
  """Yields the documents of one source (stripped, never empty); bad input goes to `errors`.

  Text, JSONL and Parquet files are streamed (a multi-GB corpus is never held in memory whole); a SQuAD
  JSON file is parsed whole. `on_bytes(n)` is called as n more bytes of the source (Source.size) are
  read, for a progress bar.
  """
  if source.kind == 'missing':
    return  # already reported when the sources were resolved
  if source.kind == 'pydoc':
    topics = _pydoc_topics()
    for k in sorted(topics):
      if on_bytes:
        on_bytes(len(topics[k].encode()))
      if topics[k].strip():
        yield topics[k].strip()
    return
  if source.kind == 'parquet':
    yield from _parquet_documents(source.path, options, errors, on_bytes)
    return
  reader = {'text': _text_documents, 'jsonl': _jsonl_documents, 'squad': _squad_documents}[source.kind]
  count, reported = 0, len(errors.skipped)
  try:
    with _open(source.path, on_bytes) as f:
      for document in reader(source.path, f, options, errors):
        count += 1
        yield document
  except (OSError, EOFError, zlib.error) as e:
    errors.report(source.path, f'cannot read ({e})')
    return
  if count == 0 and len(errors.skipped) == reported:  # a reader that already said why counts once
    with _open(source.path) as f:
      blank = all(not block.strip() for block in iter(lambda: f.read(_BLOCK), b''))
    errors.report(source.path, 'empty source: the file has no text' if blank
                  else 'no documents could be read from this file')


_BLOCK = 1 << 24  # bytes read at a time from text files


class _Counted(io.RawIOBase):
  """A raw file that reports how many bytes are read from it (compressed bytes, under a .gz reader)."""

  def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None]):
    super().__init__()
    self._raw, self._on_bytes = raw, on_bytes

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    n = self._raw.readinto(buffer)
    if n:
      self._on_bytes(n)
    return n


@contextlib.contextmanager
def _open(path: str, on_bytes: Callable[[int], None] | None = None) -> Iterator[BinaryIO]:
  with open(path, 'rb', buffering=0 if on_bytes else -1) as raw:
    f = io.BufferedReader(_Counted(raw, on_bytes), buffer_size=1 << 20) if on_bytes else raw
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=f, mode='rb') as unzipped:
        yield unzipped
    else:
      yield f


def _pydoc_topics() -> dict[str, str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return topics.topics


def _decode(raw: bytes, path: str, errors: ErrorLog, *, first_line: int = 1) -> str | None:
  """UTF-8 text of `raw` (a leading BOM dropped), or None after reporting where it is not UTF-8."""
  try:
    return raw.decode('utf-8').removeprefix('\ufeff')
  except UnicodeDecodeError as e:
    line = first_line + raw.count(b'\n', 0, e.start)
    errors.report(f'{path}:{line}', f'undecodable bytes (not UTF-8) {raw[e.start:e.end]!r}: {e.reason}')
    return None


def _text_documents(path: str, f: BinaryIO, options: ReadOptions, errors: ErrorLog) -> Iterator[str]:
  # Documents are split as bytes and decoded one by one, so one bad byte loses one document, not the
  # file. Splitting UTF-8 on an encoded separator is safe: no multi-byte character contains an ASCII byte.
  sep = options.doc_separator.encode()
  line = 1
  for chunk in _split_stream(f, sep):
    text = _decode(chunk, path, errors, first_line=line)
    line += chunk.count(b'\n') + sep.count(b'\n')
    if text is not None and text.strip():
      yield text.strip()


def _split_stream(f: BinaryIO, sep: bytes) -> Iterator[bytes]:
  """The bytes of a stream between occurrences of `sep` (all of it when sep is empty), read in blocks."""
  if not sep:
    yield f.read()
    return
  buffer, start = bytearray(), 0
  while True:
    block = f.read(_BLOCK)
    buffer += block
    while (i := buffer.find(sep, start)) != -1:
      yield bytes(buffer[:i])
      del buffer[:i + len(sep)]  # cheap: CPython drops a bytearray's head without moving the rest
      start = 0
    if not block:
      yield bytes(buffer)
      return
    start = max(0, len(buffer) - len(sep) + 1)  # a separator may straddle the next block


def render_chat(messages: list[dict]) -> str:
  """The chat template: one 'Role: content' line per message (System/User/Assistant)."""
  return '\n'.join(f'{CHAT_ROLE_NAMES[m["role"]]}: {m["content"]}' for m in messages)


def _jsonl_documents(path: str, f: BinaryIO, options: ReadOptions, errors: ErrorLog) -> Iterator[str]:
  for lineno, line in enumerate(f, 1):
    if not line.strip():
      continue
    text = _decode(line, path, errors, first_line=lineno)
    if text is None:
      continue
    where = f'{path}:{lineno}'
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      errors.report(where, f'malformed JSON ({e.msg} at column {e.colno})')
      continue
    document = _jsonl_record(record, options.text_keys, where, errors)
    if document is not None and document.strip():
      yield document.strip()


def _jsonl_record(record, text_keys: tuple[str, ...], where: str, errors: ErrorLog) -> str | None:
  if not isinstance(record, dict):
    errors.report(where, f'expected a JSON object, got {type(record).__name__}')
    return None
  if 'messages' in record:
    messages = record['messages']
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get('role') in CHAT_ROLE_NAMES and isinstance(m.get('content'), str)
        for m in messages):
      errors.report(where, f'"messages" must be a list of {{"role": one of {list(CHAT_ROLE_NAMES)}, '
                           '"content": string}')
      return None
    return render_chat(messages)
  if 'user' in record or 'assistant' in record:
    if not (isinstance(record.get('user'), str) and isinstance(record.get('assistant'), str)):
      errors.report(where, 'a chat record needs string "user" and "assistant" fields')
      return None
    messages = [{'role': 'user', 'content': record['user']}, {'role': 'assistant', 'content': record['assistant']}]
    if isinstance(record.get('system'), str):
      messages.insert(0, {'role': 'system', 'content': record['system']})
    return render_chat(messages)
  for key in text_keys:
    if key in record:
      if not isinstance(record[key], str):
        errors.report(where, f'field {key!r} is {type(record[key]).__name__}, not a string')
        return None
      return record[key]
  errors.report(where, f'no text field (data.text_keys={",".join(text_keys)}) and not a chat record; '
                       f'keys: {sorted(record)[:10]}')
  return None


def _squad_documents(path: str, f: BinaryIO, options: ReadOptions, errors: ErrorLog) -> Iterator[str]:
  """One document per paragraph: context, a blank line, then one template block per answered question."""
  text = _decode(f.read(), path, errors)
  if text is None:
    return
  try:
    root = json.loads(text)
  except json.JSONDecodeError as e:
    errors.report(f'{path}:{e.lineno}', f'malformed JSON ({e.msg} at column {e.colno})')
    return
  if not isinstance(root, dict) or not isinstance(root.get('data'), list):
    errors.report(path, '$.data is missing or not a list (expected SQuAD format: '
                        '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]})')
    return
  for i, article in enumerate(root['data']):
    paragraphs = article.get('paragraphs') if isinstance(article, dict) else None
    if not isinstance(paragraphs, list):
      errors.report(path, f'$.data[{i}].paragraphs is missing or not a list')
      continue
    for j, paragraph in enumerate(paragraphs):
      where = f'$.data[{i}].paragraphs[{j}]'
      context = paragraph.get('context') if isinstance(paragraph, dict) else None
      if not isinstance(context, str):
        errors.report(path, f'{where}.context is missing or not a string')
        continue
      qas = paragraph.get('qas', [])  # a paragraph without questions is still a document
      if not isinstance(qas, list):
        errors.report(path, f'{where}.qas is not a list')
        continue
      blocks, ok = [], True
      for k, qa in enumerate(qas):
        question = qa.get('question') if isinstance(qa, dict) else None
        answers = qa.get('answers', []) if isinstance(qa, dict) else None
        if not isinstance(question, str) or not isinstance(answers, list):
          errors.report(path, f'{where}.qas[{k}] needs a string "question" and a list "answers"')
          ok = False
          break
        if not answers and not qa.get('is_impossible', False):  # SQuAD 2 marks unanswerable ones
          # The question is the bad record: skipped and counted (or refused), its paragraph kept.
          errors.report(path, f'{where}.qas[{k}] has no answer (and is not marked "is_impossible")')
          continue
        answer = answers[0].get('text') if answers and isinstance(answers[0], dict) else None
        if isinstance(answer, str):  # unanswerable questions (SQuAD 2) have nothing to learn from
          blocks.append(options.squad_template.format(question=question.strip(), answer=answer.strip()))
      if ok and context.strip():
        yield '\n\n'.join([context.strip()] + blocks)


_PARQUET_ROWS = 1024  # rows per record batch: memory is bounded by a batch, not a row group or a file


def _pyarrow(path: str):
  """pyarrow.parquet, or a DataError naming the file and the extra that provides it."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (optional: only for .parquet)
  except ImportError as e:
    raise DataError(f'{path}: reading Parquet files needs pyarrow, an optional dependency: '
                    f'{PARQUET_EXTRA}') from e
  return pq


def _parquet_documents(path: str, options: ReadOptions, errors: ErrorLog,
                       on_bytes: Callable[[int], None] | None) -> Iterator[str]:
  """One document per row of the first data.text_keys column the file has, read batch by batch."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  pq = _pyarrow(path)
  if path.endswith('.gz'):
    errors.report(path, 'a gzipped Parquet file cannot be streamed (Parquet compresses its own pages)')
    return
  count, reported, row = 0, len(errors.skipped), 0
  try:
    # buffer_size > 0: column chunks are read in slices, not whole (a row group can be gigabytes).
    parquet = pq.ParquetFile(path, buffer_size=1 << 22)
    schema = parquet.schema_arrow
    column = next((k for k in options.text_keys if k in schema.names), None)
    if column is None:
      errors.report(path, f'no text column (data.text_keys={",".join(options.text_keys)}); '
                          f'columns: {schema.names[:10]}')
      return
    if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
      errors.report(path, f'column {column!r} is {schema.field(column).type}, not a string')
      return
    size, rows = os.path.getsize(path), max(1, parquet.metadata.num_rows)
    for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS, columns=[column], use_threads=False):
      for value in batch.column(0).to_pylist():
        row += 1
        if value is None:
          errors.report(f'{path}: row {row}', f'{column!r} is null')
        elif value.strip():
          count += 1
          yield value.strip()
      if on_bytes:  # the file's share of this batch: row groups have no byte offsets per row
        on_bytes(size * row // rows - size * (row - batch.num_rows) // rows)
  except (pa.ArrowException, OSError) as e:
    errors.report(path, f'cannot read ({e})' + (f' after row {row}' if row else ''))
    return
  if count == 0 and len(errors.skipped) == reported:
    errors.report(path, f'empty source: no text in column {column!r}')


# -------------------------------------------------------------------------------------------- downloads


def download(name: str, cache_dir: pathlib.Path, *, base_url: str = '', progress: bool = True) -> pathlib.Path:
  """Fetches DOWNLOADS[name] once; returns its path (for a spec of several files, their folder).

  A `Download` goes to <cache_dir>/downloads, checked by sha256; what is already there is used as it is,
  with no network. A `HubDownload` goes through hub.py into huggingface_hub's cache (HF_HOME), at its
  pinned commit: `base_url` does not apply to it (HF_ENDPOINT names a Hub mirror).

  Args:
    name: a key of DOWNLOADS.
    cache_dir: the vesper_jax cache directory.
    base_url: '' for the public source, else a mirror serving `<base_url>/<filename>`: an http(s):// or
      file:// URL.
    progress: show a progress bar.
  """
  if name not in DOWNLOADS:
    raise ValueError(f'unknown download {name!r}: expected one of {sorted(DOWNLOADS)}')
  item = DOWNLOADS[name]
  if isinstance(item, HubDownload):
    if base_url:
      logging.warning('download %s is on the Hugging Face Hub: data.download_base_url does not apply to it '
                      '(set HF_ENDPOINT to use a Hub mirror)', name)
    paths = [pathlib.Path(f.path) for f in hub_files(item.spec)]
    return paths[0] if len(paths) == 1 else pathlib.Path(os.path.commonpath(paths))
  path = pathlib.Path(cache_dir) / 'downloads' / item.filename
  if not path.exists():  # only a file whose hash was checked is ever renamed into place
    _fetch(name, f'{base_url.rstrip("/")}/{item.filename}' if base_url else item.url, path, item.sha256,
           progress)
  return path


def _fetch(label: str, url: str, path: pathlib.Path, sha256: str, progress: bool) -> None:
  """Downloads `url` to `path` through a temporary file, renamed into place once its sha256 matches."""
  path.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_parts(path)
  tmp = path.with_name(f'.{path.name}.part-{socket.gethostname()}-{os.getpid()}')
  digest = hashlib.sha256()
  logging.info('downloading %s from %s', label, url)
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, 'wb') as out:
      total = int(response.headers.get('Content-Length') or 0) or None
      with tqdm.tqdm(total=total, unit='B', unit_scale=True, desc=f'download {label}',
                     disable=not progress) as bar:
        while block := response.read(1 << 20):
          digest.update(block)
          out.write(block)
          bar.update(len(block))
    got = digest.hexdigest()
    if got != sha256:
      raise DataError(f'download {label} from {url}: sha256 mismatch (expected {sha256}, got {got}); '
                      'the file was discarded')
    os.replace(tmp, path)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise DataError(f'download {label} from {url} failed: {e}. Without network here: run `python -m '
                    'vesper_jax.prepare` with the same config where there is network and share its '
                    'data.cache_dir, or copy <cache_dir>/downloads to a folder and set '
                    'data.download_base_url=file:///that/folder') from e
  finally:
    tmp.unlink(missing_ok=True)


def _remove_stale_parts(path: pathlib.Path) -> None:
  """Deletes partial downloads of `path` left by dead processes on this host."""
  for part in path.parent.glob(f'.{path.name}.part-{socket.gethostname()}-*'):
    try:
      os.kill(int(part.name.rsplit('-', 1)[-1]), 0)
    except ProcessLookupError:
      part.unlink(missing_ok=True)
    except (ValueError, PermissionError):
      pass
