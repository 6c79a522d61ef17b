"""Data at the size configs' scale (issue 17): corpora fetched from a (local) Hub, folders of
shards, a BPE trained on a bounded sample, the guards before training, and bounded memory."""

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_config
from hub_server import LocalHub, add_builtin, point_at
from vesper_jax import config as config_lib
from vesper_jax import data, sources, train
from vesper_jax.sources import DataError

REPO = pathlib.Path(__file__).resolve().parent.parent
WORDS = ('the a little girl boy dog cat sun tree house ball red big happy sad ran saw found played with '
         'her his friend mom dad park day night sky water went home and then said to in on was').split()


def stories(n: int, seed: int = 0, words=WORDS) -> str:
  """n short generated 'stories' separated by <|endoftext|>, TinyStories-style."""
  rng = random.Random(seed)
  return '\n<|endoftext|>\n'.join(
      ' '.join(' '.join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + '.'
               for _ in range(rng.randint(3, 8))) for _ in range(n))


def fineweb_shards(rows_per_shard: int = 40) -> dict[str, bytes]:
  """The 8 FineWeb-Edu shards configs/large.py downloads (sample/10BT/000-007), as small generated files,
  and one more shard (008) that the pinned pattern must not read."""
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  shards = {}
  for i in range(9):
    texts = stories(rows_per_shard, seed=100 + i).split('\n<|endoftext|>\n')
    out = pa.BufferOutputStream()
    pq.write_table(pa.table({'text': texts, 'url': [f'https://example.org/{i}/{j}' for j in range(len(texts))]}),
                   out, row_group_size=16)
    shards[f'sample/10BT/{i:03d}_00000.parquet'] = out.getvalue().to_pybytes()
  return shards


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
  """A local Hub, huggingface_hub pointed at it, its cache in tmp_path/hf_home."""
  server = LocalHub()
  point_at(monkeypatch, tmp_path / 'hf_home', server.url)
  yield server
  server.close()


def _fetched(server: LocalHub) -> list[str]:
  """The files the Hub served (GET .../resolve/<commit>/<path>), as repo paths."""
  return [path.split('/resolve/', 1)[1].split('/', 1)[1] for verb, path, _ in server.requests
          if verb == 'GET' and '/resolve/' in path]


def shrunk(name: str, cache_dir: pathlib.Path):
  """configs/<name>.py as a CPU test runs it: its data section untouched but the cache, a tiny model
  (vocab 512), 32-token windows, batch 8, 2 steps."""
  config = config_lib.short_run(load_config(name), 2, evaluations=0)
  config.model.update(num_layers=1, num_heads=2, num_kv_heads=None, d_model=32, d_ff=64, vocab_size=512,
                      max_seq_len=64, dtype='float32', remat=False)
  config.data.update(cache_dir=str(cache_dir), seq_len=32, bpe_sample_bytes=20_000)
  config.train.update(batch_size=8, eval_tokens=256)
  return config


# ---------------------------------------------------------------------------------- the size configs


def test_medium_trains_from_the_hub_bpe_on_a_sample_cache_two_steps(tmp_path, hub_server, monkeypatch):
  add_builtin(hub_server, 'tinystories_train', {'TinyStories-train.txt': stories(1500)})
  config = shrunk('medium', tmp_path / 'cache')
  assert config.data.sources == 'download:tinystories_train'
  summary = train.train_and_evaluate(config, tmp_path / 'run')
  assert summary['step'] == 2 and np.isfinite(summary['loss'])
  assert _fetched(hub_server) == ['TinyStories-train.txt']
  bpe, = (tmp_path / 'cache' / 'tokenizers').glob('bpe512-*/tokenizer.json')
  # Offline now (a compute node): the Hub's cache answers, the BPE and the token cache are reused.
  point_at(monkeypatch, tmp_path / 'hf_home', None)
  cache, _ = train.load_data(config)
  assert not cache.built and len(list((tmp_path / 'cache' / 'tokenizers').glob('*'))) == 1
  assert bpe.exists() and _fetched(hub_server) == ['TinyStories-train.txt']


def test_large_trains_on_parquet_shards_from_the_hub(tmp_path, hub_server):
  commit = add_builtin(hub_server, 'fineweb_edu_8', fineweb_shards())
  config = shrunk('large', tmp_path / 'cache')
  assert config.data.sources == 'download:fineweb_edu_8'
  summary = train.train_and_evaluate(config, tmp_path / 'run')
  assert summary['step'] == 2
  assert _fetched(hub_server) == [f'sample/10BT/{i:03d}_00000.parquet' for i in range(8)]  # not 008
  cache, _ = train.load_data(config)
  assert [s['kind'] for s in cache.meta['sources']] == ['parquet'] * 8
  assert all(s['documents'] == 40 for s in cache.meta['sources'])
  assert cache.meta['sources'][0]['origin'] == (f'hf://datasets/HuggingFaceFW/fineweb-edu@{commit}/'
                                                'sample/10BT/000_00000.parquet')


# --------------------------------------------------------------------------------------- downloads


def test_download_of_several_hub_files_is_their_folder(tmp_path, hub_server):
  add_builtin(hub_server, 'fineweb_edu_8', fineweb_shards(rows_per_shard=4))
  folder = sources.download('fineweb_edu_8', tmp_path / 'cache', progress=False)
  assert folder.name == '10BT' and (tmp_path / 'hf_home') in folder.parents
  assert sorted(p.name for p in folder.iterdir()) == [f'{i:03d}_00000.parquet' for i in range(8)]


def test_file_url_mirror_of_a_cache_downloads_folder(tmp_path, monkeypatch):
  mirror = tmp_path / 'mirror'
  mirror.mkdir()
  (mirror / 'tinyshakespeare.txt').write_text(stories(10))
  monkeypatch.setitem(sources.DOWNLOADS, 'tinyshakespeare', dataclasses.replace(
      sources.DOWNLOADS['tinyshakespeare'], sha256=hashlib.sha256(stories(10).encode()).hexdigest()))
  path = sources.download('tinyshakespeare', tmp_path / 'compute_node_cache', base_url=mirror.as_uri(),
                          progress=False)
  assert path.read_text() == stories(10)


def test_failed_download_says_how_to_work_offline(tmp_path):
  with pytest.raises(DataError, match=r'download piaf from http://127.0.0.1:9/piaf-v1.1.json '
                                      r'failed: .*Without network here: run `python -m vesper_jax.prepare`'):
    sources.download('piaf', tmp_path, base_url='http://127.0.0.1:9', progress=False)
  assert list((tmp_path / 'downloads').iterdir()) == []


# ------------------------------------------------------------------------------------ BPE on a sample


def test_bpe_learns_only_from_its_sample_and_is_shared(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  first = stories(200, seed=1)
  later = stories(200, seed=2, words=[w.upper() + 'QX' for w in WORDS])  # words only the later half has
  corpus.write_text(first + '\n<|endoftext|>\n' + later)
  cfg = config_lib.get_config().data
  cfg.update(sources=str(corpus), cache_dir=str(tmp_path / 'cache'), seq_len=16)
  cfg.bpe_sample_bytes = len(first.encode()) // 2
  learned = lambda tok: {tok.id_to_token(i) for i in range(tok.vocab_size)} - {None}  # noqa: E731
  sampled = learned(data.build_or_load_cache(cfg, 600, progress=False).tokenizer)
  assert 'Ġhappy' in sampled and not any('qx' in t.lower() for t in sampled)
  cfg.bpe_sample_bytes = 0  # the whole corpus: a different BPE, cached beside the first
  whole = learned(data.build_or_load_cache(cfg, 600, progress=False).tokenizer)
  assert any('qx' in t.lower() for t in whole)
  assert len(list((tmp_path / 'cache' / 'tokenizers').iterdir())) == 2
  with pytest.raises(ValueError, match='data.bpe_sample_bytes=-1 must be >= 0'):
    config = load_config('tiny')
    config.data.bpe_sample_bytes = -1
    config_lib.validate(config)


# ------------------------------------------------------------------------------------------ guards


def _cache(train_tokens: int, val_tokens: int) -> data.TokenCache:
  return data.TokenCache(pathlib.Path('/nowhere'), {}, np.zeros(train_tokens, np.uint16),
                         np.zeros(val_tokens, np.uint16))


def test_vocabulary_guard_refuses_a_bpe_too_large_for_the_corpus():
  config = load_config('medium')  # vocab 32,000 with a trained BPE
  with pytest.raises(DataError) as refused:
    data.check_scale(_cache(101_950, 60_000), config)
  assert str(refused.value) == (
      'a trained BPE of model.vocab_size=32,000 tokens is 31% of the 101,950-token train split (at most 10%): '
      'most tokens would be seen a handful of times. Use more data (data.sources; configs/small.py and '
      'medium.py default to download:tinystories_train), model.vocab_size <= 10,195, or a tokenizer.json '
      '(data.tokenizer)')
  config.data.tokenizer = '/some/tokenizer.json'  # a given tokenizer is the user's choice: not refused
  data.check_scale(_cache(101_950, 60_000), config)
  config.data.tokenizer = ''
  data.check_scale(_cache(320_000, 60_000), config)  # exactly 10%: accepted


def test_epoch_guard_warns_naming_both_numbers_and_what_fits(caplog):
  config = load_config('medium')
  warnings = data.check_scale(_cache(10_000_000, 60_000), config)
  assert warnings == [
      'train.num_steps=20,000 × train.batch_size=64 × data.seq_len=1024 = 1,310,720,000 tokens is 131.1 '
      'epochs of the 10,000,000-token train split (more than 4): the model will mostly memorise it. Fits '
      'this data: configs/tiny.py; --config.train.auto_scale=True (at most one epoch), '
      '--config.train.num_steps=610 (4 epochs), or more data (data.sources)']
  assert data.check_scale(_cache(400_000_000, 60_000), config) == []  # TinyStories-sized: < 4 epochs
  # 45M tokens: small's 41M-token plan fits too.
  assert 'Fits this data: configs/tiny.py, configs/small.py; ' in data.check_scale(
      _cache(11_000_000, 60_000), config)[0]


def test_validation_guard_warns_and_says_how_to_enlarge_the_split():
  config = load_config('tiny')
  config.train.num_steps = 1
  warning, = data.check_scale(_cache(1_000_000, 20_000), config)
  assert warning.endswith('For about 50,000 use --config.data.val_fraction=0.12')
  warning, = data.check_scale(_cache(1_000_000, 1_206), config)  # the quickstart's split
  assert warning == ('the validation split has 1,206 tokens (fewer than 50,000): its evaluation noise is '
                     'larger than most differences it could show. For about 50,000 use a larger corpus '
                     '(data.sources; this one is too small for such a split)')
  config.data.val_fraction = 0.0  # no validation asked for: nothing to say
  assert data.check_scale(_cache(1_000_000, 0), config) == []


def test_medium_on_the_builtin_corpus_is_refused_before_training(tmp_path):
  command = [sys.executable, '-m', 'vesper_jax.train', '--config=configs/medium.py',
             '--config.data.sources=builtin:pydoc', f'--config.data.cache_dir={tmp_path}',
             f'--workdir={tmp_path / "run"}']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('vesper_jax.train: error: a trained BPE of model.vocab_size=32,000 tokens is ')
  assert 'Traceback' not in result.stderr and not (tmp_path / 'run' / 'checkpoints').exists()


# ------------------------------------------------------------------------------------- bounded memory


def _prepare_peak_rss_mb(corpus: pathlib.Path, cache_dir: pathlib.Path) -> float:
  command = [sys.executable, '-m', 'vesper_jax.prepare', f'--config.data.sources={corpus}',
             f'--config.data.cache_dir={cache_dir}', '--config.model.vocab_size=2048',
             '--config.data.bpe_sample_bytes=1000000']
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(process.pid, 0)
  assert status == 0
  return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_prepare_peak_memory_does_not_grow_with_the_corpus(tmp_path):
  small, large = tmp_path / 'small.txt', tmp_path / 'large.txt'
  small.write_text(stories(9_000, seed=3))  # ~2 MB
  with open(large, 'w') as f:  # ten times as much, different stories
    for seed in range(10):
      f.write(stories(9_000, seed=10 + seed) + '\n<|endoftext|>\n')
  assert 9 < large.stat().st_size / small.stat().st_size < 11
  rss_small = _prepare_peak_rss_mb(small, tmp_path / 'cache_small')
  rss_large = _prepare_peak_rss_mb(large, tmp_path / 'cache_large')
  assert rss_large < 1.2 * rss_small, (rss_small, rss_large)
  meta = json.loads(next((tmp_path / 'cache_large' / 'tokens').glob('*/meta.json')).read_text())
  assert meta['train_tokens'] > 5 * json.loads(
      next((tmp_path / 'cache_small' / 'tokens').glob('*/meta.json')).read_text())['train_tokens']
