"""Hugging Face Hub sources (SPEC §6, issue 27): hf:// paths against a local Hub, and offline from a cache.

The local Hub (tests/hub_server.py) serves fake Claire and CamemBERT repos; the CLI tests run in a subprocess
with HF_ENDPOINT and HF_HOME set.
"""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from huggingface_hub import constants

from conftest import FRENCH_TOKENIZER
from hub_server import SHA1, TOKEN, LocalHub, hub_env, point_at
from vesper_jax import config as config_lib
from vesper_jax import data, hub, sources
from vesper_jax.sources import DataError, ErrorLog

REPO = pathlib.Path(__file__).resolve().parent.parent
CLAIRE = 'OpenLLM-France/Claire-Dialogue-French-0.1'
CLAIRE_SPEC = f'hf://datasets/{CLAIRE}/FR/*/train.txt'
CAMEMBERT = 'hf://almanach/camembert-base/tokenizer.json'
SHA2 = 'b' * 40

# Claire's format: dialogues separated by blank lines, one "[Speaker:] text" turn per line.
DIALOGUES_A = ['[Intervenant 1:] Bonjour, vous allez bien ?\n[Intervenant 2:] Très bien, merci.',
               '[Alice:] On se voit demain ?\n[Bob:] Oui, à midi.\n[Alice:] Parfait.',
               '[Speaker 1:] Il pleut encore.\n[Speaker 2:] Comme toujours en novembre.']
DIALOGUES_B = ['[Marie:] Tu as lu le livre ?\n[Paul:] Pas encore, je commence ce soir.',
               '[Prof:] Ouvrez vos cahiers.\n[Élève:] Page combien ?']
CLAIRE_FILES = {'FR/A/train.txt': '\n\n'.join(DIALOGUES_A) + '\n',
                'FR/B/train.txt': '\n\n\n'.join(DIALOGUES_B) + '\n',  # extra blank lines change nothing
                'FR/A/test.txt': '[X:] Une phrase de test.\n[Y:] Une autre.\n',
                'README.md': '# Claire (fake)\n'}


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
  """A LocalHub with fake Claire and CamemBERT repos, huggingface_hub pointed at it, HF_HOME in tmp_path."""
  server = LocalHub()
  server.add('dataset', CLAIRE, CLAIRE_FILES)
  server.add('model', 'almanach/camembert-base', {'tokenizer.json': FRENCH_TOKENIZER.read_bytes(),
                                                  'config.json': '{}'})
  server.add('model', 'spm/only', {'sentencepiece.bpe.model': b'\x00spm', 'config.json': '{}'})
  point_at(monkeypatch, tmp_path / 'hf_home', server.url)
  yield server
  server.close()


def _data_config(tmp_path, **overrides):
  cfg = config_lib.get_config().data
  cfg.update({'cache_dir': str(tmp_path / 'cache'), 'doc_separator': '\n\n', 'seq_len': 4, 'val_fraction': 0.0,
              'tokenizer': str(FRENCH_TOKENIZER), **overrides})
  return cfg


def _resolve(spec: str) -> list[sources.Source]:
  return sources.resolve_sources(spec, ErrorLog('fail'), cache_dir=pathlib.Path('/nonexistent'),
                                 download_base_url='')


# ------------------------------------------------------------------------------------------ parsing


def test_hub_paths_parse():
  p = hub.HubPath.parse('hf://datasets/OWNER/NAME@v1.0/FR/*/train.txt')
  assert (p.repo_type, p.repo_id, p.revision, p.pattern) == ('dataset', 'OWNER/NAME', 'v1.0', 'FR/*/train.txt')
  p = hub.HubPath.parse('hf://almanach/camembert-base/tokenizer.json')
  assert (p.repo_type, p.repo_id, p.revision, p.pattern) == ('model', 'almanach/camembert-base', 'main',
                                                             'tokenizer.json')
  assert p.repo == 'hf://almanach/camembert-base'
  with pytest.raises(hub.HubError, match='expected hf://datasets/OWNER/NAME'):
    hub.HubPath.parse('hf://datasets/only-a-name')


# ------------------------------------------------------------------------------------ the local Hub


def test_claire_through_hf_reads_every_dialogue_at_a_commit(tmp_path, local_hub):
  found = _resolve(CLAIRE_SPEC)
  assert [s.origin for s in found] == [f'hf://datasets/{CLAIRE}@{SHA1}/FR/A/train.txt',
                                       f'hf://datasets/{CLAIRE}@{SHA1}/FR/B/train.txt']
  assert all(s.kind == 'text' and str(tmp_path / 'hf_home' / 'hub') in s.path for s in found)
  cache = data.build_or_load_cache(_data_config(tmp_path, sources=CLAIRE_SPEC), 1024, progress=False)
  per_source = cache.meta['sources']
  assert [s['documents'] for s in per_source] == [3, 2]  # one document per dialogue, speaker tags kept
  assert per_source[0]['origin'].endswith(f'@{SHA1}/FR/A/train.txt')
  assert cache.tokenizer.decode(cache.train[:40]).startswith('[Intervenant 1:] Bonjour')
  # Cached: the second run asks the Hub one question (the revision), downloads nothing.
  local_hub.requests.clear()
  again = data.build_or_load_cache(_data_config(tmp_path, sources=CLAIRE_SPEC), 1024, progress=False)
  assert not again.built and [r[1].split('?')[0] for r in local_hub.requests] == [
      f'/api/datasets/{CLAIRE}/revision/main']


def test_every_reader_kind_through_hf(tmp_path, local_hub):
  local_hub.add('dataset', 'me/mixed', {'a.jsonl': '{"text": "une ligne"}\n{"text": "deux"}\n',
                                        'b.json': json.dumps({'data': [{'paragraphs': [
                                            {'context': 'Paris.', 'qas': [{'question': 'Où ?', 'answers': [
                                                {'text': 'Paris'}]}]}]}]}),
                                        'c.txt': 'du texte'})
  found = _resolve('hf://datasets/me/mixed/*')
  assert [s.kind for s in found] == ['jsonl', 'squad', 'text']


def test_revision_pinning(tmp_path, local_hub):
  pinned = f'hf://datasets/{CLAIRE}@{SHA1}/FR/A/train.txt'
  first = data.build_or_load_cache(_data_config(tmp_path, sources=pinned), 1024, progress=False)
  local_hub.add('dataset', CLAIRE, {**CLAIRE_FILES, 'FR/A/train.txt': '[Z:] Tout autre chose.\n'}, sha=SHA2)
  again = data.build_or_load_cache(_data_config(tmp_path, sources=pinned), 1024, progress=False)
  assert not again.built and again.directory == first.directory  # the new commit changes nothing pinned
  moved = data.build_or_load_cache(_data_config(tmp_path, sources=pinned.replace(f'@{SHA1}', '')), 1024,
                                   progress=False)
  assert moved.built and moved.meta['sources'][0]['origin'] == f'hf://datasets/{CLAIRE}@{SHA2}/FR/A/train.txt'
  assert moved.meta['train_documents'] == 1


def test_a_runs_config_names_the_commit_it_read(tmp_path, local_hub):
  # train.load_data pins every hf:// entry (sources and tokenizer) to the commit read, so the run's
  # config.json names exactly what it trained on, and a resume reads the same files after the repo moves.
  from vesper_jax import train
  config = config_lib.get_config()
  config.data.update(_data_config(tmp_path, sources=f'{CLAIRE_SPEC},{FRENCH_TOKENIZER.parent / "piaf_excerpt.json"}',
                                  tokenizer='hf://almanach/camembert-base/tokenizer.json'))
  config.model.vocab_size = 1024
  _, pinned = train.load_data(config)
  assert pinned.data.sources == (f'{CLAIRE_SPEC.replace(CLAIRE, CLAIRE + "@" + SHA1)},'
                                 f'{FRENCH_TOKENIZER.parent / "piaf_excerpt.json"}')
  assert pinned.data.tokenizer.startswith('hf://almanach/camembert-base@') and len(
      pinned.data.tokenizer.split('@')[1].split('/')[0]) == 40
  assert config.data.sources.startswith(CLAIRE_SPEC)  # the caller's config is left as it was
  assert hub.pin('hf://datasets/other/repo/x.txt', [f'hf://datasets/{CLAIRE}@{SHA1}/FR/A/train.txt']) == \
      'hf://datasets/other/repo/x.txt'  # another repo's commit is not taken


def test_missing_file_names_what_exists(local_hub):
  with pytest.raises(DataError, match=r"no file matches 'FR/\*/valid.txt'; its files: FR/A/test.txt, "
                                      r'FR/A/train.txt, FR/B/train.txt, README.md'):
    _resolve(f'hf://datasets/{CLAIRE}/FR/*/valid.txt')
  with pytest.raises(DataError, match='hf://datasets/nobody/nothing@main: no such repo, or it is private'):
    _resolve('hf://datasets/nobody/nothing/x.txt')
  with pytest.raises(DataError, match="no revision 'v9'"):
    _resolve(f'hf://datasets/{CLAIRE}@v9/FR/*/train.txt')


def test_gated_repo_needs_a_token(tmp_path, local_hub, monkeypatch):
  local_hub.repos[('dataset', CLAIRE)]['gated'] = True
  with pytest.raises(DataError) as refused:
    _resolve(CLAIRE_SPEC)
  message = str(refused.value)
  assert '\n' not in message and f'hf://datasets/{CLAIRE}' in message and 'gated' in message
  assert 'HF_TOKEN' in message and 'hf auth login' in message and f'/datasets/{CLAIRE}' in message
  monkeypatch.setenv('HF_TOKEN', TOKEN)
  assert len(_resolve(CLAIRE_SPEC)) == 2
  assert any(h.get('Authorization') == f'Bearer {TOKEN}' for _, _, h in local_hub.requests)


def test_interrupted_download_resumes_with_a_range(local_hub, monkeypatch):
  # huggingface_hub resumes from the last whole chunk it wrote (10 MB on the real Hub); small chunks here.
  monkeypatch.setattr(constants, 'DOWNLOAD_CHUNK_SIZE', 1 << 14)
  big = ''.join(f'[A:] ligne {i}\n' for i in range(20_000))
  local_hub.add('dataset', 'me/big', {'big.txt': big})
  local_hub.cut.add('big.txt')
  (source,) = _resolve('hf://datasets/me/big/big.txt')
  assert pathlib.Path(source.path).read_text() == big
  ranges = [h.get('Range') for verb, path, h in local_hub.requests if verb == 'GET' and 'big.txt' in path]
  assert len(ranges) == 2 and ranges[0] is None
  assert 0 < int(re.fullmatch(r'bytes=(\d+)-', ranges[1])[1]) <= len(big) // 2  # the second half only


def test_tokenizer_from_the_hub(tmp_path, local_hub):
  cache = data.build_or_load_cache(_data_config(tmp_path, sources=CLAIRE_SPEC, tokenizer=CAMEMBERT), 1024,
                                   progress=False)
  assert cache.meta['tokenizer_origin'] == f'{CAMEMBERT.replace("/tokenizer.json", "")}@{SHA1}/tokenizer.json'
  assert cache.meta['tokenizer_sha256'] == hashlib.sha256(FRENCH_TOKENIZER.read_bytes()).hexdigest()
  with pytest.raises(DataError, match=r'data.tokenizer: hf://spm/only@\w+: no tokenizer.json in the repo, '
                                      r'only a SentencePiece model \(sentencepiece.bpe.model\)'):
    data.build_or_load_cache(_data_config(tmp_path, tokenizer='hf://spm/only/tokenizer.json'), 1024)


# ----------------------------------------------------------------------------------------- offline


def make_hub_cache(hf_home: pathlib.Path, repo_type: str, repo_id: str, files: dict[str, str | bytes],
                   sha: str = SHA1) -> None:
  """A Hub cache as huggingface_hub leaves it: refs/main, blobs/<hash>, snapshots/<sha>/<path> -> blob."""
  root = hf_home / 'hub' / f'{repo_type}s--{repo_id.replace("/", "--")}'
  (root / 'refs').mkdir(parents=True, exist_ok=True)
  (root / 'refs' / 'main').write_text(sha)
  for name, content in files.items():
    content = content.encode() if isinstance(content, str) else content
    blob = root / 'blobs' / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = root / 'snapshots' / sha / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def test_offline_from_a_hand_made_cache(tmp_path, monkeypatch):
  make_hub_cache(tmp_path / 'hf_home', 'dataset', CLAIRE, CLAIRE_FILES)
  point_at(monkeypatch, tmp_path / 'hf_home', None)  # HF_HUB_OFFLINE, no server at all
  found = _resolve(CLAIRE_SPEC)
  assert [s.origin for s in found] == [f'hf://datasets/{CLAIRE}@{SHA1}/FR/A/train.txt',
                                       f'hf://datasets/{CLAIRE}@{SHA1}/FR/B/train.txt']
  with pytest.raises(DataError, match=r'HF_HUB_OFFLINE is set, and nothing of it is cached'):
    _resolve('hf://datasets/someone/else/x.txt')


# ------------------------------------------------------------------------------------ the CLI (the bar)


def _prepare(tmp_path, env: dict, *extra: str) -> subprocess.CompletedProcess:
  command = [sys.executable, '-m', 'vesper_jax.prepare', '--config=configs/french.py',
             f'--config.data.sources={CLAIRE_SPEC}', f'--config.data.tokenizer={CAMEMBERT}',
             f'--config.data.cache_dir={tmp_path / "cache"}', '--config.data.seq_len=4',
             '--config.data.val_fraction=0.4', *extra]
  env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')} | {
      'HF_HOME': str(tmp_path / 'hf_home'), **env}
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_prepare_french_offline_from_a_hub_cache(tmp_path):
  make_hub_cache(tmp_path / 'hf_home', 'dataset', CLAIRE, CLAIRE_FILES)
  make_hub_cache(tmp_path / 'hf_home', 'model', 'almanach/camembert-base',
                 {'tokenizer.json': FRENCH_TOKENIZER.read_bytes()})
  result = _prepare(tmp_path, {'HF_HUB_OFFLINE': '1'})
  assert result.returncode == 0, result.stderr
  counts = [int(n) for n in re.findall(r'\[text\]  (\d+) documents', result.stdout)]
  assert counts == [len(DIALOGUES_A), len(DIALOGUES_B)]
  totals = re.search(r'documents   train ([\d,]+)   validation ([\d,]+)', result.stdout)
  assert int(totals[1]) + int(totals[2]) == sum(counts)
  assert f'hf://datasets/{CLAIRE}@{SHA1}/FR/A/train.txt' in result.stdout
  assert f'hf://almanach/camembert-base@{SHA1}/tokenizer.json' in result.stdout


def test_prepare_behind_a_gated_hub_is_one_line_and_the_token_stays_secret(tmp_path):
  server = LocalHub()
  try:
    server.add('dataset', CLAIRE, CLAIRE_FILES, gated=True)
    server.add('model', 'almanach/camembert-base', {'tokenizer.json': FRENCH_TOKENIZER.read_bytes()})
    refused = _prepare(tmp_path, {'HF_ENDPOINT': server.url})
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if 'error' in line.lower()]
    assert len(lines) == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert lines[0].startswith('vesper_jax.prepare: error: ') and f'datasets/{CLAIRE}' in lines[0]
    assert 'HF_TOKEN' in lines[0] and 'hf auth login' in lines[0]
    served = _prepare(tmp_path, {'HF_ENDPOINT': server.url, 'HF_TOKEN': TOKEN})
    assert served.returncode == 0, served.stderr
    assert any(h.get('Authorization') == f'Bearer {TOKEN}' for _, _, h in server.requests)
  finally:
    server.close()
  assert TOKEN not in served.stdout + served.stderr + refused.stdout + refused.stderr
  leaks = [p for p in tmp_path.rglob('*') if p.is_file() and TOKEN.encode() in p.read_bytes()]
  assert leaks == []


# ------------------------------------------------------------------------------------- push to the Hub


def test_export_pushes_to_the_hub_and_reads_back(tmp_path, inference_workdir, monkeypatch):
  server = LocalHub()
  try:
    out = tmp_path / 'export'
    command = [sys.executable, '-m', 'vesper_jax.export', f'--workdir={inference_workdir}', f'--out={out}',
               '--push_to_hub=me/vesper-tiny']
    env = hub_env(tmp_path / 'hf_home', server.url)
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr, refused.stderr
    assert 'vesper_jax.export: error: hf://me/vesper-tiny: the Hub refused the upload (HTTP 401)' in refused.stderr
    assert 'HF_TOKEN' in refused.stderr
    pushed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env | {'HF_TOKEN': TOKEN})
    assert pushed.returncode == 0, pushed.stderr
    commit = re.search(r'pushed .* to hf://me/vesper-tiny@([0-9a-f]{40})', pushed.stdout)[1]
    local = sorted(p.name for p in out.iterdir())
    assert sorted(server.repos[('model', 'me/vesper-tiny')]['commits'][commit]) == local
    # Read back through hf:// at that commit: the same bytes.
    point_at(monkeypatch, tmp_path / 'reader', server.url)
    for name in local:
      file = hub.fetch_one(f'hf://me/vesper-tiny@{commit}/{name}', what='test')
      assert pathlib.Path(file.path).read_bytes() == (out / name).read_bytes()
  finally:
    server.close()
  assert TOKEN not in pushed.stdout + pushed.stderr + refused.stdout + refused.stderr
  assert [p for p in tmp_path.rglob('*') if p.is_file() and TOKEN.encode() in p.read_bytes()] == []


def test_push_refusals_are_one_line(tmp_path, monkeypatch):
  with pytest.raises(hub.HubError, match='expected OWNER/NAME'):
    hub.push(tmp_path, 'no-owner')
  point_at(monkeypatch, tmp_path / 'hf_home', None)  # offline
  with pytest.raises(hub.HubError, match='hf://me/x: HF_HUB_OFFLINE is set'):
    hub.push(tmp_path, 'me/x')
