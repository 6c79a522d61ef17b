"""Data: readers, bad input, downloads, the token cache, batches and the prefetcher (SPEC §6, issue 3)."""

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from conftest import FRENCH_TOKENIZER, MISERABLES, PIAF, TINYSHAKESPEARE, TINYSTORIES
from hub_server import LocalHub, add_builtin, hub_env, point_at
from vesper_jax import config as config_lib
from vesper_jax import data, sources
from vesper_jax import tokenizer as tokenizer_lib
from vesper_jax.sources import DataError, ErrorLog, ReadOptions
from vesper_jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent


def data_config(tmp_path, **overrides):
  """The base config's data section, caching under tmp_path, with overrides."""
  cfg = config_lib.get_config().data
  cfg.cache_dir = str(tmp_path / 'cache')
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def read_all(path, policy='skip', **overrides):
  """(documents, ErrorLog) of one source (a file, or builtin:pydoc) read with the base config's options."""
  cfg = config_lib.get_config().data
  for key, value in overrides.items():
    setattr(cfg, key, value)
  errors = ErrorLog(policy)
  found = sources.resolve_sources(str(path), errors, cache_dir=pathlib.Path('/nonexistent'),
                                  download_base_url='')
  documents = [d for s in found for d in sources.read_documents(s, ReadOptions.from_config(cfg), errors)]
  return documents, errors


def final_caches(tmp_path):
  tokens = tmp_path / 'cache' / 'tokens'
  return sorted(p for p in tokens.iterdir() if '.tmp-' not in p.name) if tokens.exists() else []


# ------------------------------------------------------------------ real corpora (excerpts in tests/data)


def test_piaf_gives_one_document_per_paragraph():
  documents, errors = read_all(PIAF)
  assert len(documents) == 37 and not errors.skipped  # the excerpt's 8 articles hold 37 paragraphs
  raw = json.loads(PIAF.read_text(encoding='utf-8'))
  paragraphs = [p for article in raw['data'] for p in article['paragraphs']]
  for document, paragraph in zip(documents, paragraphs):
    assert document.startswith(paragraph['context'].strip())
    for qa in paragraph['qas']:
      assert f'Question: {qa["question"].strip()}\nAnswer: {qa["answers"][0]["text"].strip()}' in document
  # $.data[173].paragraphs[1] of piaf-v1.1.json ($.data[5] of the excerpt), verbatim. Update only if the
  # SQuAD document layout changes on purpose.
  assert documents[22] == (
      "Le lendemain, Drax invite Bond a une partie de chasse, espérant le tuer, il ordonne à un tireur de "
      "l'abattre au loin. Bond parvient cependant à le repérer et manque exprès sa cible afin d'abattre le "
      "tueur. Plus tard, Corinne, inquiète, arrive à son tour. Drax, ayant appris sa trahison, licencie la "
      "jeune femme qui essaie vainement de nier les faits. Il décide de la punir encore bien plus "
      "cruellement et l’exécute en lâchant ses chiens sur elle. Corinne essaie de s'enfuir mais les "
      "dobermans la rattrapent et la malheureuse meurt dévorée vivante.\n\n"
      "Question: Que veut faire Drax à Bond ?\nAnswer: le tuer\n\n"
      "Question: Qui doit tuer Bond ?\nAnswer: Drax\n\n"
      "Question: Par qui est tuée Corinne ?\nAnswer: dobermans\n\n"
      "Question: Que font Drax et Bond ?\nAnswer: une partie de chasse")


def test_squad_template_is_configurable():
  documents, _ = read_all(PIAF, squad_template='Q : {question}\nR : {answer}')
  assert documents[22].endswith('Q : Que font Drax et Bond ?\nR : une partie de chasse')
  with pytest.raises(ValueError, match='data.squad_template'):
    read_all(PIAF, squad_template='{question} {reponse}')


def test_tinystories_splits_into_its_120_stories():
  documents, errors = read_all(TINYSTORIES)
  assert len(documents) == 120 and not errors.skipped
  assert documents[0].startswith('One day, a little girl named Lily found a needle in her room.')
  assert not any('<|endoftext|>' in d or d != d.strip() for d in documents)


def test_text_is_streamed_with_separators_across_blocks(monkeypatch):
  whole, _ = read_all(TINYSTORIES)
  monkeypatch.setattr(sources, '_BLOCK', 997)  # about a hundred blocks: many separators straddle two
  streamed, _ = read_all(TINYSTORIES)
  assert streamed == whole


def test_corrupt_gzip_is_reported(tmp_path):
  path = tmp_path / 'broken.txt.gz'
  path.write_bytes(b'this is not gzip data')
  documents, errors = read_all(path)
  assert documents == [] and errors.skipped[0].startswith(f'{path}: cannot read')
  with pytest.raises(DataError, match=f'{path}: cannot read'):
    read_all(path, policy='fail')


def test_builtin_pydoc_is_one_document_per_topic():
  from pydoc_data import topics
  documents, _ = read_all('builtin:pydoc')
  assert len(documents) == sum(1 for t in topics.topics.values() if t.strip()) > 50
  assert documents[0] == topics.topics[sorted(topics.topics)[0]].strip()


# ----------------------------------------------------------------------------------- readers and sources


def test_jsonl_text_and_chat_records(tmp_path):
  path = tmp_path / 'chat.jsonl'
  records = [
      {'text': 'first doc'},
      {'content': 'second doc', 'id': 7},
      {'user': 'Bonjour ?', 'assistant': 'Salut !'},
      {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                    {'role': 'assistant', 'content': 'Hello'}]},
      {'text': ''},
  ]
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n\n')
  documents, errors = read_all(path)
  assert documents == ['first doc', 'second doc', 'User: Bonjour ?\nAssistant: Salut !',
                       'System: Be brief.\nUser: Hi\nAssistant: Hello']
  assert not errors.skipped
  documents, errors = read_all(path, text_keys='content')  # 'text' is no longer a text field
  assert documents[0] == 'second doc' and f'{path}:1' in errors.skipped[0]


def test_directories_globs_and_gzip(tmp_path):
  root = tmp_path / 'corpus'
  (root / 'sub').mkdir(parents=True)
  (root / 'a.txt').write_text('alpha<|endoftext|>beta')
  (root / 'sub' / 'b.jsonl').write_text('{"text": "gamma"}\n')
  (root / 'c.json').write_text(json.dumps({'data': [{'paragraphs': [{'context': 'delta', 'qas': []}]}]}))
  with gzip.open(root / 'd.txt.gz', 'wt') as f:
    f.write('epsilon')
  (root / 'notes.csv').write_text('x,y')
  (root / '.hidden.txt').write_text('hidden')
  errors = ErrorLog('fail')
  found = sources.resolve_sources(str(root), errors, cache_dir=tmp_path, download_base_url='')
  assert [(s.kind, pathlib.Path(s.path).relative_to(root).as_posix()) for s in found] == [
      ('text', 'a.txt'), ('squad', 'c.json'), ('text', 'd.txt.gz'), ('jsonl', 'sub/b.jsonl')]
  assert len(errors.ignored) == 1 and 'notes.csv' in errors.ignored[0]  # ignored, not an error
  options = ReadOptions.from_config(config_lib.get_config().data)
  documents = [d for s in found for d in sources.read_documents(s, options, errors)]
  assert documents == ['alpha', 'beta', 'delta', 'epsilon', 'gamma']
  globbed = sources.resolve_sources(f'{root}/*.txt, {root}/**/*.jsonl', errors, cache_dir=tmp_path,
                                    download_base_url='')
  assert [pathlib.Path(s.path).name for s in globbed] == ['a.txt', 'b.jsonl']


def test_squad_question_without_answers_is_a_bad_record(tmp_path):
  path = tmp_path / 'q.json'
  path.write_text(json.dumps({'data': [{'paragraphs': [{'context': 'Paris est en France.', 'qas': [
      {'question': 'Où est Paris ?', 'answers': [{'text': 'en France'}]},
      {'question': 'Sans réponse ?'},
      {'question': 'Impossible ?', 'answers': [], 'is_impossible': True}]}]}]}))
  docs, errors = read_all(path)
  assert len(docs) == 1 and 'Où est Paris' in docs[0] and 'Sans réponse' not in docs[0]
  assert errors.skipped == [f'{path}: $.data[0].paragraphs[0].qas[1] has no answer (and is not marked '
                            '"is_impossible")']
  with pytest.raises(DataError, match=r'qas\[1\]'):
    read_all(path, policy='fail')


def test_recursive_glob_through_a_symlinked_directory_reads_each_file_once(tmp_path):
  (tmp_path / 'real').mkdir()
  (tmp_path / 'real' / 'a.txt').write_text('one document')
  os.symlink(tmp_path / 'real', tmp_path / 'real' / 'loop')  # a symlink back into itself
  os.symlink(tmp_path / 'real', tmp_path / 'alias')
  found = sources.resolve_sources(f'{tmp_path}/**/*.txt', ErrorLog('skip'), cache_dir=tmp_path, download_base_url='')
  assert len(found) == 1 and os.path.realpath(found[0].path) == str(tmp_path / 'real' / 'a.txt')


@pytest.mark.parametrize('name,content', [('bin.txt', b'\xff\xfe\x00garbage\xff'), ('list.json', b'[1, 2]')])
def test_a_bad_file_counts_one_skip(name, content, tmp_path):
  path = tmp_path / name
  path.write_bytes(content)
  _, errors = read_all(path)
  assert len(errors.skipped) == 1, errors.skipped


# ------------------------------------------------------------------------------------------- bad input


def test_malformed_jsonl_line_skip_counts_and_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "broken"\n["a list"]\n{"text": "five"}\n')
  documents, errors = read_all(path)
  assert documents == ['one', 'two', 'five']
  assert len(errors.skipped) == 2
  assert errors.skipped[0].startswith(f'{path}:3: malformed JSON')
  assert errors.skipped[1].startswith(f'{path}:4: expected a JSON object')
  cache = data.build_or_load_cache(data_config(tmp_path, sources=str(path), seq_len=2, val_fraction=0.0),
                                   512, progress=False)
  assert cache.meta['skipped_count'] == 2 and cache.meta['train_documents'] == 3
  assert f'{path}:3' in cache.meta['skipped'][0]


def test_malformed_jsonl_line_fail_stops_before_anything_is_built(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "broken"\n')
  with pytest.raises(DataError, match=f"{path}:3: malformed JSON.*data.on_error='fail'"):
    data.build_or_load_cache(data_config(tmp_path, sources=str(path), on_error='fail'), 512, progress=False)
  assert final_caches(tmp_path) == []
  assert not list((tmp_path / 'cache' / 'tokenizers').rglob('tokenizer.json'))  # no BPE trained either


def test_squad_structure_errors_name_the_json_path(tmp_path):
  path = tmp_path / 'squad.json'
  path.write_text(json.dumps({'data': [
      {'title': 'no paragraphs'},
      {'paragraphs': [{'context': 'kept', 'qas': [{'question': 'Q?', 'answers': [{'text': 'A'}]}]},
                      {'qas': []}, {'context': 'qas is null', 'qas': None}]}]}))
  documents, errors = read_all(path)
  assert documents == ['kept\n\nQuestion: Q?\nAnswer: A']
  assert errors.skipped == [f'{path}: $.data[0].paragraphs is missing or not a list',
                            f'{path}: $.data[1].paragraphs[1].context is missing or not a string',
                            f'{path}: $.data[1].paragraphs[2].qas is not a list']
  with pytest.raises(DataError, match=r'\$\.data\[0\]\.paragraphs is missing'):
    read_all(path, policy='fail')
  path.write_text(json.dumps({'version': '1.1'}))
  with pytest.raises(DataError, match=r'\$\.data is missing'):
    read_all(path, policy='fail')


def test_undecodable_bytes_name_file_and_line(tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes(b'good one\n<|endoftext|>\nsecond line\nbad \xe9t\xe9 here\n<|endoftext|>good two')
  documents, errors = read_all(path)
  assert documents == ['good one', 'good two']  # one bad byte loses its document, not the file
  assert len(errors.skipped) == 1 and errors.skipped[0].startswith(f'{path}:4: undecodable bytes')
  with pytest.raises(DataError, match=f'{path}:4: undecodable'):
    read_all(path, policy='fail')
  jsonl = tmp_path / 'latin1.jsonl'
  jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  documents, errors = read_all(jsonl)
  assert documents == ['ok'] and errors.skipped[0].startswith(f'{jsonl}:2: undecodable')


def test_empty_source(tmp_path):
  empty, blank, good = tmp_path / 'empty.txt', tmp_path / 'blank.jsonl', tmp_path / 'good.txt'
  empty.write_text('')
  blank.write_text('\n  \n')
  good.write_text('some text ' * 20)
  for path in (empty, blank):
    documents, errors = read_all(path)
    assert documents == [] and errors.skipped == [f'{path}: empty source: the file has no text']
    with pytest.raises(DataError, match=f'{path}: empty source'):
      read_all(path, policy='fail')
  cache = data.build_or_load_cache(data_config(tmp_path, sources=f'{empty},{good}', seq_len=8, val_fraction=0.0), 512,
                                   progress=False)
  assert cache.meta['skipped_count'] == 1 and cache.meta['sources'][1]['documents'] == 1
  with pytest.raises(DataError, match='no documents could be read'):
    data.build_or_load_cache(data_config(tmp_path, sources=str(empty)), 512, progress=False)


def test_missing_file(tmp_path):
  good = tmp_path / 'good.txt'
  good.write_text('some text ' * 20)
  missing = tmp_path / 'missing.txt'
  cfg = data_config(tmp_path, sources=f'{good},{missing},{tmp_path}/nothing*.txt', seq_len=8, val_fraction=0.0)
  cache = data.build_or_load_cache(cfg, 512, progress=False)
  assert cache.meta['skipped'] == [f'{missing}: no such file or directory',
                                   f'{tmp_path}/nothing*.txt: no file matches this glob']
  cfg.on_error = 'fail'
  with pytest.raises(DataError, match=f'{missing}: no such file or directory'):
    data.build_or_load_cache(cfg, 512, progress=False)
  # The missing file is part of the key: when it appears, the cache is rebuilt with it.
  missing.write_text('now it exists ' * 10)
  cfg.on_error = 'skip'
  cfg.sources = f'{good},{missing}'
  rebuilt = data.build_or_load_cache(cfg, 512, progress=False)
  assert rebuilt.built and rebuilt.meta['sources'][1]['documents'] == 1


def test_invalid_tokenizer_file_is_refused_naming_it(tmp_path):
  bad = tmp_path / 'tokenizer.json'
  bad.write_text('{"not": "a tokenizer"}')
  good = tmp_path / 'good.txt'
  good.write_text('text')
  with pytest.raises(ValueError, match=f'{bad}: not a valid Hugging Face tokenizer.json'):
    data.build_or_load_cache(data_config(tmp_path, sources=str(good), tokenizer=str(bad)), 512, progress=False)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'absent.json')):
    data.build_or_load_cache(data_config(tmp_path, sources=str(good), tokenizer=str(tmp_path / 'absent.json')),
                             512, progress=False)


def test_tokenizer_larger_than_the_model_is_refused_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setattr(Tokenizer, 'encode_batch', lambda *a: pytest.fail('tokenized before the check'))
  cfg = data_config(tmp_path, sources=str(TINYSHAKESPEARE), tokenizer=str(FRENCH_TOKENIZER))
  with pytest.raises(ValueError, match='has 1000 tokens, more than model.vocab_size=512'):
    data.build_or_load_cache(cfg, 512, progress=False)
  assert final_caches(tmp_path) == []
  # Also when the cache exists already (built for a model with a large enough vocabulary).
  monkeypatch.undo()
  small = tmp_path / 'small.txt'
  small.write_text('Une phrase en français, puis une autre. ' * 10)
  cfg.sources, cfg.seq_len, cfg.val_fraction = str(small), 8, 0.0
  assert data.build_or_load_cache(cfg, 1024, progress=False).built
  with pytest.raises(ValueError, match='has 1000 tokens, more than model.vocab_size=512'):
    data.build_or_load_cache(cfg, 512, progress=False)


# ------------------------------------------------------------------------------------------------ cache


def _naive_tokens(tokenizer, documents, val_fraction):
  """The cache's contract, computed the slow obvious way: whole documents, EOS after each."""
  train, val = [], []
  for i, document in enumerate(documents):
    held_out = int((i + 1) * val_fraction) > int(i * val_fraction)
    (val if held_out else train).extend(tokenizer.encode(document) + [tokenizer.eos_id])
  return np.array(train), np.array(val)


def test_cache_matches_a_naive_whole_document_encoding(tmp_path, monkeypatch):
  # Small pieces and batches so that long documents are cut many times and encoded over many calls.
  monkeypatch.setattr(data, 'PIECE_CHARS', 300)
  monkeypatch.setattr(data, 'BATCH_CHARS', 5000)
  shakespeare = tmp_path / 'shakespeare.txt'
  shakespeare.write_text(TINYSHAKESPEARE.read_text()[:40_000])
  stories = tmp_path / 'stories.txt'
  stories.write_text('<|endoftext|>'.join(TINYSTORIES.read_text().split('<|endoftext|>')[:60]))
  cfg = data_config(tmp_path, sources=f'{shakespeare},{stories}', val_fraction=0.1, seq_len=16)
  cache = data.build_or_load_cache(cfg, 512, progress=False)
  documents = read_all(shakespeare)[0] + read_all(stories)[0]
  assert len(documents) == 61
  train, val = _naive_tokens(cache.tokenizer, documents, 0.1)
  np.testing.assert_array_equal(cache.train, train)
  np.testing.assert_array_equal(cache.val, val)
  assert isinstance(cache.train, np.memmap) and cache.train.dtype == np.uint16
  assert (cache.meta['train_documents'], cache.meta['val_documents'], cache.meta['split']) == (55, 6, 'documents')
  assert [s['documents'] for s in cache.meta['sources']] == [1, 60]
  assert sum(s['tokens'] for s in cache.meta['sources']) == len(train) + len(val)
  # The trained BPE is saved beside the cache, and it is the one the tokens were made with.
  assert cache.tokenizer.path == str(cache.directory / 'tokenizer.json')
  assert cache.tokenizer.sha256() == cache.meta['tokenizer_sha256'] and cache.tokenizer.vocab_size == 512


def test_pieces_encode_exactly_like_whole_text_with_a_sentencepiece_tokenizer():
  # Whitespace split + '▁' word prefix (BARThez's pre-tokenizer): a cut at a lone space must not change
  # how the word after it is encoded.
  tok = Tokenizer.load(FRENCH_TOKENIZER)
  text = MISERABLES.read_text(encoding='utf-8')
  pieces = list(data.split_long(text, 200))
  assert len(pieces) > 300 and ''.join(pieces) == text
  assert sum(tok.encode_batch(pieces), []) == tok.encode(text)


def test_split_long_cuts_only_at_lone_whitespace():
  text = 'a  \nb\n\nc d  e\nf' * 50
  pieces = list(data.split_long(text, 12))
  assert ''.join(pieces) == text and len(pieces) > 10
  for left, right in zip(pieces, pieces[1:]):
    lone_newline = left[-1] == '\n' and not left[-2].isspace() and not right[0].isspace()
    lone_space = right[0] == ' ' and not left[-1].isspace() and not right[1].isspace()
    assert lone_newline or lone_space, (left, right)
  words = list(data.split_long('word ' * 100, 12))
  assert ''.join(words) == 'word ' * 100 and all(6 <= len(p) <= 12 for p in words[:-1])
  assert list(data.split_long('x' * 100, 10)) == ['x' * 100]  # nowhere to cut
  assert list(data.split_long('x' * 30 + ' y' + 'z' * 30 + '\nw', 10)) == ['x' * 30, ' y' + 'z' * 30 + '\n', 'w']


def test_one_document_corpus_holds_out_its_last_tokens(tmp_path):
  cfg = data_config(tmp_path, sources=str(TINYSHAKESPEARE), val_fraction=0.1)
  cache = data.build_or_load_cache(cfg, 1024, progress=False)
  assert cache.meta['split'] == 'tail' and cache.meta['val_documents'] == 0
  total = len(cache.train) + len(cache.val)
  assert len(cache.val) == round(total * 0.1)
  text = TINYSHAKESPEARE.read_text().strip()
  full = cache.tokenizer.encode_batch(list(data.split_long(text, data.PIECE_CHARS)))
  np.testing.assert_array_equal(np.concatenate([cache.train, cache.val]), sum(full, []) + [cache.tokenizer.eos_id])
  no_val = data.build_or_load_cache(data_config(tmp_path, sources=cfg.sources, val_fraction=0.0), 1024,
                                    progress=False)
  assert len(no_val.val) == 0 and len(no_val.train) == total


def test_second_open_does_no_tokenization(tmp_path, monkeypatch):
  cfg = data_config(tmp_path)  # builtin:pydoc, trained BPE
  first = data.build_or_load_cache(cfg, 1024, progress=False)
  assert first.built
  first_document = read_all('builtin:pydoc')[0][0]
  monkeypatch.setattr(Tokenizer, 'encode_batch', lambda *a: pytest.fail('tokenized on a cache hit'))
  monkeypatch.setattr(tokenizer_lib, 'train_bpe', lambda *a, **k: pytest.fail('trained on a cache hit'))
  monkeypatch.setattr(sources, 'read_documents', lambda *a: pytest.fail('read documents on a cache hit'))
  original_load = Tokenizer.load
  monkeypatch.setattr(Tokenizer, 'load', lambda *a: pytest.fail('loaded the tokenizer before it was used'))
  cfg.seq_len = 64  # windows are cut at batch time: not part of the cache
  second = data.build_or_load_cache(cfg, 1024, progress=False)
  assert not second.built and second.directory == first.directory
  monkeypatch.setattr(Tokenizer, 'load', original_load)
  # The tokenizer the second open hands out is the BPE the first build trained (hashed here from the
  # trained file's bytes, not through the cache), and it is the one that made the cached tokens.
  trained, = (tmp_path / 'cache' / 'tokenizers').rglob('tokenizer.json')
  assert second.meta['tokenizer_sha256'] == hashlib.sha256(trained.read_bytes()).hexdigest()
  assert second.tokenizer.sha256() == second.meta['tokenizer_sha256']
  assert second.tokenizer.path == str(second.directory / 'tokenizer.json')
  ids = second.tokenizer.encode(first_document) + [second.tokenizer.eos_id]
  assert len(ids) > 10 and second.train[:len(ids)].tolist() == ids
  np.testing.assert_array_equal(second.train, first.train)
  np.testing.assert_array_equal(second.val, first.val)


def test_editing_one_byte_of_one_source_rebuilds(tmp_path):
  a, b = tmp_path / 'a.txt', tmp_path / 'b.txt'
  a.write_text('The cat sat on the mat. ' * 20)
  b.write_text('A dog ran in the park. ' * 20)
  cfg = data_config(tmp_path, sources=f'{a},{b}', seq_len=8, val_fraction=0.5)
  first = data.build_or_load_cache(cfg, 512, progress=False)
  os.utime(b, (time.time() + 10, time.time() + 10))  # a touched file with the same bytes is the same cache
  assert not data.build_or_load_cache(cfg, 512, progress=False).built
  b.write_bytes(b.read_bytes().replace(b'park', b'parK', 1))
  second = data.build_or_load_cache(cfg, 512, progress=False)
  assert second.built and second.directory != first.directory
  assert 'parK' in second.tokenizer.decode(second.val) and 'parK' not in first.tokenizer.decode(first.val)
  cfg.doc_separator = 'mat'  # so does any reading option
  assert data.build_or_load_cache(cfg, 512, progress=False).built


def test_interrupted_build_leaves_nothing_acceptable(tmp_path, monkeypatch):
  monkeypatch.setattr(data, 'BATCH_CHARS', 2000)
  original, calls = Tokenizer.encode_batch, []

  def interrupted(self, texts):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # as Ctrl-C would, after two batches were written
    return original(self, texts)

  monkeypatch.setattr(Tokenizer, 'encode_batch', interrupted)
  cfg = data_config(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    data.build_or_load_cache(cfg, 512, progress=False)
  assert list((tmp_path / 'cache' / 'tokens').iterdir()) == []  # the partial build was removed
  monkeypatch.setattr(Tokenizer, 'encode_batch', original)
  assert data.build_or_load_cache(cfg, 512, progress=False).built


def test_killed_build_leaves_nothing_acceptable(tmp_path):
  """SIGKILL mid-write: no cleanup runs, and still no later run accepts the partial cache."""
  marker = tmp_path / 'writing'
  script = f'''
import pathlib, sys, time
sys.path.insert(0, {str(REPO)!r})
from vesper_jax import config, data
from vesper_jax.tokenizer import Tokenizer
original, calls = Tokenizer.encode_batch, []
def slow(self, texts):
  calls.append(1)
  if len(calls) == 3:
    pathlib.Path({str(marker)!r}).write_text('two batches written')
    time.sleep(120)
  return original(self, texts)
Tokenizer.encode_batch = slow
data.BATCH_CHARS = 2000
cfg = config.get_config().data
cfg.cache_dir = {str(tmp_path / 'cache')!r}
data.build_or_load_cache(cfg, 512, progress=False)
'''
  process = subprocess.Popen([sys.executable, '-c', script])
  try:
    deadline = time.time() + 60
    while not marker.exists():
      assert process.poll() is None and time.time() < deadline, 'the build did not start'
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  partial = list((tmp_path / 'cache' / 'tokens').iterdir())
  assert len(partial) == 1 and '.tmp-' in partial[0].name and (partial[0] / 'train.bin').stat().st_size > 0
  cache = data.build_or_load_cache(data_config(tmp_path), 512, progress=False)
  assert cache.built  # tokenized again: the partial directory was not accepted
  assert list((tmp_path / 'cache' / 'tokens').iterdir()) == [cache.directory]  # and it was cleaned up


def test_damaged_cache_is_rebuilt(tmp_path):
  cfg = data_config(tmp_path)
  first = data.build_or_load_cache(cfg, 512, progress=False)
  expected = np.array(first.train)
  os.truncate(first.directory / 'train.bin', 1000)
  second = data.build_or_load_cache(cfg, 512, progress=False)
  assert second.built
  np.testing.assert_array_equal(second.train, expected)


def test_large_vocabulary_uses_uint32(tmp_path):
  vocab = {f'w{i}': i for i in range(70_000)}
  vocab.update({'<unk>': 70_000, '<|endoftext|>': 70_001})
  raw = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok_path = tmp_path / 'words.json'
  raw.save(str(tok_path))
  corpus = tmp_path / 'words.txt'
  corpus.write_text('w69999 w1 w65536 w3\nw42 ' * 5)
  cache = data.build_or_load_cache(
      data_config(tmp_path, sources=str(corpus), tokenizer=str(tok_path), val_fraction=0.0, seq_len=4),
      70_144, progress=False)
  assert cache.meta['dtype'] == 'uint32'
  assert list(cache.train[:5]) == [69999, 1, 65536, 3, 42] and cache.train[-1] == 70_001


def test_corpus_smaller_than_one_window_is_a_clear_error(tmp_path):
  tiny = tmp_path / 'tiny.txt'
  tiny.write_text('hello world')
  with pytest.raises(DataError, match=r'training split .* fewer than one window of data.seq_len \+ 1 = 129'):
    data.build_or_load_cache(data_config(tmp_path, sources=str(tiny), val_fraction=0.0), 512, progress=False)
  with pytest.raises(DataError, match='fewer than one window'):
    data.get_batch(np.arange(10), seed=0, step=0, batch_size=2, seq_len=10)
  # Evaluation scores partial windows too: only a split with no target at all is an error.
  with pytest.raises(DataError, match='1 tokens hold no next-token target'):
    data.eval_batch(np.arange(1), index=0, batch_size=2, seq_len=10)


def test_real_cache_batches_stay_below_the_vocabulary(tmp_path):
  cache = data.build_or_load_cache(data_config(tmp_path), 4096, progress=False)
  vocab = cache.tokenizer.vocab_size
  assert vocab == 4096 and int(cache.train.max()) < vocab and int(cache.val.max()) < vocab
  assert int(np.sum(cache.train == cache.tokenizer.eos_id)) == cache.meta['train_documents']
  for step in range(5):
    batch = data.get_batch(cache.train, seed=1, step=step, batch_size=8, seq_len=128)
    assert batch.shape == (8, 129) and batch.dtype == np.int32 and batch.min() >= 0 and batch.max() < vocab
  assert data.eval_batch(cache.val, index=0, batch_size=4, seq_len=128)[0].max() < vocab


# ---------------------------------------------------------------------------------------------- batches


def test_get_batch_is_a_pure_function_of_seed_step_process():
  tokens = np.arange(100_000, dtype=np.uint32)
  kwargs = dict(batch_size=8, seq_len=32)
  a = data.get_batch(tokens, seed=3, step=7, **kwargs)
  np.testing.assert_array_equal(a, data.get_batch(tokens, seed=3, step=7, **kwargs))
  assert not np.array_equal(a, data.get_batch(tokens, seed=3, step=8, **kwargs))
  assert not np.array_equal(a, data.get_batch(tokens, seed=4, step=7, **kwargs))
  # Each row is a contiguous window of seq_len + 1 tokens inside the array.
  np.testing.assert_array_equal(a - a[:, :1], np.broadcast_to(np.arange(33), (8, 33)))
  assert a.min() >= 0 and a.max() < len(tokens)


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_get_disjoint_slices_of_the_global_batch(process_count):
  tokens = np.arange(50_000, dtype=np.uint32)
  whole = data.get_batch(tokens, seed=0, step=11, batch_size=16, seq_len=8)
  parts = [data.get_batch(tokens, seed=0, step=11, batch_size=16, seq_len=8, process_index=p,
                          process_count=process_count) for p in range(process_count)]
  assert all(p.shape == (16 // process_count, 9) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  starts = [set(p[:, 0].tolist()) for p in parts]
  assert all(starts[i].isdisjoint(starts[j]) for i in range(process_count) for j in range(i + 1, process_count))
  with pytest.raises(ValueError, match='not divisible by process_count=3'):
    data.get_batch(tokens, seed=0, step=0, batch_size=16, seq_len=8, process_count=3)


def test_get_batch_reads_the_memmap_only_at_its_rows(tmp_path):
  tokens = np.memmap(tmp_path / 't.bin', dtype=np.uint16, mode='w+', shape=(20_000,))
  tokens[:] = np.arange(20_000) % 60_000
  tokens.flush()
  opened = np.memmap(tmp_path / 't.bin', dtype=np.uint16, mode='r', shape=(20_000,))
  batch = data.get_batch(opened, seed=5, step=2, batch_size=4, seq_len=16, process_index=1, process_count=2)
  np.testing.assert_array_equal(batch, data.get_batch(tokens, seed=5, step=2, batch_size=4, seq_len=16)[2:])


def test_eval_batches_walk_the_windows_in_order_and_pad_the_last():
  tokens = np.arange(1001)  # 1000 targets: 100 windows of 10 (+1) tokens
  assert data.num_eval_batches(tokens, seq_len=10, batch_size=8) == 13
  first, weights = data.eval_batch(tokens, index=0, batch_size=8, seq_len=10)
  np.testing.assert_array_equal(first[:, 0], np.arange(8) * 10)
  np.testing.assert_array_equal(first[0], np.arange(11))
  assert weights.shape == (8, 10) and weights.min() == 1.0
  last, weights = data.eval_batch(tokens, index=12, batch_size=8, seq_len=10)  # windows 96..103
  np.testing.assert_array_equal(last[:4, 0], [960, 970, 980, 990])
  np.testing.assert_array_equal(weights.sum(axis=1), [10, 10, 10, 10, 0, 0, 0, 0])  # 100..103 only pad
  assert not last[4:, 1:].any()  # past the split's end: id 0
  # A budget of 25 targets: two full windows and half of the third.
  assert data.num_eval_batches(tokens, seq_len=10, batch_size=8, max_tokens=25) == 1
  _, weights = data.eval_batch(tokens, index=0, batch_size=8, seq_len=10, max_tokens=25)
  np.testing.assert_array_equal(weights.sum(axis=1), [10, 10, 5, 0, 0, 0, 0, 0])


def _prefetch_threads() -> list[threading.Thread]:
  return [t for t in threading.enumerate() if t.name == 'prefetch']


def test_prefetcher_yields_in_order_on_another_thread():
  threads = set()

  def fn(step):
    threads.add(threading.current_thread().name)
    return step * step

  with data.Prefetcher(fn, start_step=5, depth=2) as prefetcher:
    got = [next(prefetcher) for _ in range(4)]
  assert got == [25, 36, 49, 64]
  assert threads == {'prefetch'}
  assert not _prefetch_threads()


def test_prefetcher_reraises_in_the_consumer():
  def fn(step):
    if step == 3:
      raise ValueError(f'boom at step {step}')
    return step

  prefetcher = data.Prefetcher(fn, start_step=0)
  assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(ValueError, match='boom at step 3'):
    next(prefetcher)
  assert not _prefetch_threads()


def test_prefetcher_close_stops_a_thread_blocked_on_a_full_queue():
  calls = []
  prefetcher = data.Prefetcher(lambda step: calls.append(step) or step, start_step=0, depth=1)
  time.sleep(0.3)  # the worker fills the queue and blocks
  prefetcher.close()
  assert not _prefetch_threads()
  assert len(calls) <= 3
  with pytest.raises(StopIteration):
    next(prefetcher)


# -------------------------------------------------------------------------------------------- downloads


def _mirror(tmp_path, **files) -> pathlib.Path:
  """A folder laid out as a download mirror: DOWNLOADS[name].filename → the fixture file, for each name
  (the downloads not on the Hub)."""
  mirror = tmp_path / 'mirror'
  mirror.mkdir()
  for name, fixture in files.items():
    (mirror / sources.DOWNLOADS[name].filename).symlink_to(fixture)
  return mirror


def _sha256(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_download_over_http_checks_sha256(tmp_path, serve, monkeypatch):
  # The mirror serves the excerpts in tests/data, so the recorded hashes are set to theirs: the check is
  # the same code path (test_download_with_wrong_sha256_is_discarded: a mismatch against the real hash).
  for name, fixture in (('tinyshakespeare', TINYSHAKESPEARE), ('piaf', PIAF)):
    monkeypatch.setitem(sources.DOWNLOADS, name,
                        dataclasses.replace(sources.DOWNLOADS[name], sha256=_sha256(fixture)))
  base_url = serve(_mirror(tmp_path, tinyshakespeare=TINYSHAKESPEARE, piaf=PIAF))
  path = sources.download('tinyshakespeare', tmp_path, base_url=base_url, progress=False)
  assert path == tmp_path / 'downloads' / 'tinyshakespeare.txt'
  assert path.read_bytes() == TINYSHAKESPEARE.read_bytes()
  assert base_url.requested == ['/tinyshakespeare.txt']
  # Cached: a second call needs no server.
  assert sources.download('tinyshakespeare', tmp_path, base_url='http://127.0.0.1:9', progress=False) == path
  # download:NAME as a source, through build_or_load_cache.
  cfg = data_config(tmp_path, sources='download:piaf', download_base_url=base_url, cache_dir=str(tmp_path))
  cache = data.build_or_load_cache(cfg, 1024, progress=False)
  assert cache.meta['sources'][0]['documents'] == 37
  assert cache.meta['sources'][0]['sha256'] == _sha256(PIAF)


def test_download_with_wrong_sha256_is_discarded(tmp_path, serve):
  mirror = tmp_path / 'mirror'
  mirror.mkdir()
  (mirror / 'tinyshakespeare.txt').write_text('not the real file')
  got = hashlib.sha256(b'not the real file').hexdigest()
  with pytest.raises(DataError, match=f'sha256 mismatch .*expected 86c4e6aa.*got {got}'):
    sources.download('tinyshakespeare', tmp_path / 'cache', base_url=serve(mirror), progress=False)
  assert list((tmp_path / 'cache' / 'downloads').iterdir()) == []


def test_builtin_names_on_the_hub_read_their_pinned_commit(tmp_path, monkeypatch, caplog):
  server = LocalHub()
  try:
    commit = add_builtin(server, 'tinystories', {'TinyStories-valid.txt': TINYSTORIES.read_bytes()})
    server.add('dataset', 'roneneldan/TinyStories', {'TinyStories-valid.txt': 'moved on\n'}, sha='c' * 40)
    point_at(monkeypatch, tmp_path / 'hf_home', server.url)  # main is now the later commit: not read
    cache = data.build_or_load_cache(data_config(tmp_path, sources='download:tinystories'), 1024, progress=False)
    source, = cache.meta['sources']
    assert source['documents'] == 120
    assert source['origin'] == f'hf://datasets/roneneldan/TinyStories@{commit}/TinyStories-valid.txt'
    # download() gives the file in the Hub's cache; the mirror setting for the other downloads is ignored.
    path = sources.download('tinystories', tmp_path, base_url='http://127.0.0.1:9', progress=False)
    assert path.read_bytes() == TINYSTORIES.read_bytes() and (tmp_path / 'hf_home') in path.parents
    assert 'data.download_base_url does not apply' in caplog.text and 'HF_ENDPOINT' in caplog.text
    assert not (tmp_path / 'downloads').exists()
  finally:
    server.close()


def test_download_errors_name_the_url(tmp_path, serve):
  base_url = serve(tmp_path)  # serves an empty directory: 404
  with pytest.raises(DataError, match=f'download piaf from {base_url}/piaf-v1.1.json failed'):
    sources.download('piaf', tmp_path / 'cache', base_url=base_url, progress=False)
  with pytest.raises(ValueError, match="unknown download 'wikipedia'"):
    sources.download('wikipedia', tmp_path)


def test_prepare_cli_downloads_builds_and_summarizes(tmp_path):
  server = LocalHub()
  try:
    commit = add_builtin(server, 'tinystories', {'TinyStories-valid.txt': TINYSTORIES.read_bytes()})
    cache_dir = tmp_path / 'cache'
    command = [sys.executable, '-m', 'vesper_jax.prepare', '--download=tinystories',
               f'--config.data.cache_dir={cache_dir}', '--config.model.vocab_size=1024']
    env = hub_env(tmp_path / 'hf_home', server.url)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f'tinystories: {sources.DOWNLOADS["tinystories"].spec}' in out
    assert f'hf://datasets/roneneldan/TinyStories@{commit}/TinyStories-valid.txt  [text]  120 documents' in out
    assert 'token cache ready: built in' in out and 'skipped     nothing' in out
    assert 'tokens/s' in out and str(cache_dir / 'tokens') in out
    assert '--config.data.sources=download:tinystories' in out
    downloads = [path for verb, path, _ in server.requests if verb == 'GET' and '/resolve/' in path]
    env['HF_HUB_OFFLINE'] = '1'  # the second run needs no Hub at all
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and 'token cache ready: opened in' in again.stdout, again.stderr
    assert len(downloads) == 1
  finally:
    server.close()


def test_prepare_cli_reports_bad_input_without_a_traceback(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "fine"}\n{oops\n')
  command = [sys.executable, '-m', 'vesper_jax.prepare', f'--config.data.sources={bad}',
             '--config.data.on_error=fail', f'--config.data.cache_dir={tmp_path}']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert f'vesper_jax.prepare: error: {bad}:2: malformed JSON' in result.stderr
  assert 'Traceback' not in result.stderr


def test_relative_and_absolute_paths_share_a_cache(tmp_path, monkeypatch):
  (tmp_path / 'corpus.txt').write_text('The same words, read from two spellings of one path. ' * 20)
  monkeypatch.chdir(tmp_path)
  first = data.build_or_load_cache(data_config(tmp_path, sources='corpus.txt', seq_len=8, val_fraction=0.0),
                                   512, progress=False)
  assert first.meta['sources'][0]['path'] == str(tmp_path / 'corpus.txt')
  again = data.build_or_load_cache(data_config(tmp_path, sources=str(tmp_path / 'corpus.txt'), seq_len=8,
                                               val_fraction=0.0), 512, progress=False)
  assert not again.built and again.directory == first.directory
