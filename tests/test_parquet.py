"""Parquet sources (issue 17): the text column of files, directories and globs, streamed; bad files."""

import sys

import numpy as np
import pytest

from vesper_jax import config as config_lib
from vesper_jax import data, sources
from vesper_jax.sources import DataError, ErrorLog, ReadOptions, Source

pa = pytest.importorskip('pyarrow')
pq = pytest.importorskip('pyarrow.parquet')

DOCS = [f'Document {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs.' for i in range(300)]


def write_parquet(path, texts, column='text', row_group_size=64, **extra_columns):
  table = pa.table({column: texts, 'id': list(range(len(texts))), **extra_columns})
  pq.write_table(table, path, row_group_size=row_group_size)
  return path


def read_all(path, policy='skip', **overrides):
  cfg = config_lib.get_config().data
  for key, value in overrides.items():
    setattr(cfg, key, value)
  errors, counted = ErrorLog(policy), []
  documents = list(sources.read_documents(Source(sources._kind(path), str(path)), ReadOptions.from_config(cfg),
                                          errors, counted.append))
  return documents, errors, sum(counted)


def test_reads_the_text_column_row_by_row_across_row_groups(tmp_path):
  path = write_parquet(tmp_path / 'shard.parquet', DOCS + ['   '], row_group_size=7)
  documents, errors, counted = read_all(path)
  assert documents == DOCS and not errors.skipped  # a blank row is no document, and no error
  assert counted == path.stat().st_size  # the progress bar reaches the file's size exactly


def test_first_text_key_present_names_the_column(tmp_path):
  path = write_parquet(tmp_path / 'shard.parquet', DOCS[:5], column='content')
  assert read_all(path)[0] == DOCS[:5]
  assert read_all(path, text_keys='body,content')[0] == DOCS[:5]


def test_directories_and_globs_of_shards_in_order(tmp_path):
  (tmp_path / 'shards').mkdir()
  for i in range(3):
    write_parquet(tmp_path / 'shards' / f'{i:03d}_00000.parquet', DOCS[i * 100:(i + 1) * 100])
  (tmp_path / 'shards' / 'README.md').write_text('A dataset card is a text document too.')
  for spec in (str(tmp_path / 'shards'), f'{tmp_path}/shards/*.parquet'):
    found = sources.resolve_sources(spec, ErrorLog('fail'), cache_dir=tmp_path, download_base_url='')
    parquet = [s for s in found if s.kind == 'parquet']
    assert [s.path for s in parquet] == sorted(str(p) for p in (tmp_path / 'shards').glob('*.parquet'))
    options = ReadOptions.from_config(config_lib.get_config().data)
    assert [d for s in parquet for d in sources.read_documents(s, options, ErrorLog('fail'))] == DOCS


def test_a_cache_from_parquet_equals_one_from_the_same_jsonl(tmp_path):
  import json
  write_parquet(tmp_path / 'corpus.parquet', DOCS)
  (tmp_path / 'corpus.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in DOCS))
  tokenizer = tmp_path / 'bpe.json'
  from vesper_jax.tokenizer import train_bpe
  train_bpe(DOCS, 400, tokenizer)
  caches = []
  for name in ('corpus.parquet', 'corpus.jsonl'):
    cfg = config_lib.get_config().data
    cfg.update(sources=str(tmp_path / name), tokenizer=str(tokenizer), cache_dir=str(tmp_path / f'cache_{name}'),
               seq_len=16)
    caches.append(data.build_or_load_cache(cfg, 512, progress=False))
  np.testing.assert_array_equal(caches[0].train, caches[1].train)
  np.testing.assert_array_equal(caches[0].val, caches[1].val)


def test_bad_parquet_files_are_reported_naming_them(tmp_path):
  garbage = tmp_path / 'garbage.parquet'
  garbage.write_bytes(b'PAR1 this is not a parquet file at all')
  documents, errors, _ = read_all(garbage)
  assert documents == [] and errors.skipped[0].startswith(f'{garbage}: cannot read')
  with pytest.raises(DataError, match=f"{garbage}: cannot read .*data.on_error='fail'"):
    read_all(garbage, policy='fail')

  no_text = write_parquet(tmp_path / 'no_text.parquet', DOCS[:3], column='body')
  _, errors, _ = read_all(no_text)
  assert errors.skipped == [f"{no_text}: no text column (data.text_keys=text,content); columns: ['body', 'id']"]

  numbers = tmp_path / 'numbers.parquet'
  pq.write_table(pa.table({'text': [1, 2, 3]}), numbers)
  assert read_all(numbers)[1].skipped == [f'{numbers}: column \'text\' is int64, not a string']

  nulls = write_parquet(tmp_path / 'nulls.parquet', ['first', None, 'third'])
  documents, errors, _ = read_all(nulls)
  assert documents == ['first', 'third'] and errors.skipped == [f"{nulls}: row 2: 'text' is null"]


def test_truncated_shard_is_reported(tmp_path):
  path = write_parquet(tmp_path / 'shard.parquet', DOCS)
  whole = path.read_bytes()
  path.write_bytes(whole[:len(whole) // 2])  # footer gone: unreadable as a whole
  documents, errors, _ = read_all(path)
  assert documents == [] and errors.skipped[0].startswith(f'{path}: cannot read')


def test_missing_pyarrow_names_the_extra_before_any_work(tmp_path, monkeypatch):
  path = write_parquet(tmp_path / 'shard.parquet', DOCS[:3])
  monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)  # import pyarrow.parquet -> ImportError
  with pytest.raises(DataError, match=rf"{path}: reading Parquet files needs pyarrow, an optional "
                                      rf"dependency: pip install 'vesper_jax\[parquet\]'"):
    sources.resolve_sources(str(path), ErrorLog('skip'), cache_dir=tmp_path, download_base_url='')
