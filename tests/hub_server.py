"""A local Hugging Face Hub for the tests (hf:// sources, the built-in names on the Hub, tokenizers).

`LocalHub` is a threaded HTTP server speaking the part of the Hub's protocol huggingface_hub uses:
GET /api/{datasets/,}OWNER/NAME/revision/REV (the commit sha and the file list) and HEAD/GET
/{datasets/,}OWNER/NAME/resolve/REV/PATH (X-Repo-Commit, ETag, Content-Length, Range), with the error
headers the Hub sends (X-Error-Code: GatedRepo, RepoNotFound, EntryNotFound). In-process tests point
huggingface_hub's constants at it (`point_at`); CLI tests run in a subprocess with HF_ENDPOINT and
HF_HOME set.
"""

import base64
import hashlib
import http.server
import json
import os
import pathlib
import re
import threading

from huggingface_hub import constants

from vesper_jax import hub, sources

TOKEN = 'hf_testTOKENdoNotLeak0123456789'
SHA1 = 'a' * 40


class LocalHub:
  """Repos (type, 'OWNER/NAME') -> {'commits': {sha: {path: bytes}}, 'refs': {name: sha}, 'gated': bool}."""

  def __init__(self):
    self.repos: dict[tuple[str, str], dict] = {}
    self.cut: set[str] = set()        # files whose next GET is cut half-way (then served with Range)
    self.requests: list[tuple[str, str, dict]] = []
    hub_ = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_HEAD(self):
        hub_._answer(self, body=False)

      def do_GET(self):
        hub_._answer(self, body=True)

      def do_POST(self):
        hub_._receive(self)

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def add(self, repo_type: str, repo_id: str, files: dict[str, str | bytes], *, sha: str = SHA1,
          gated: bool = False) -> None:
    repo = self.repos.setdefault((repo_type, repo_id), {'commits': {}, 'refs': {}, 'gated': gated})
    repo['commits'][sha] = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    repo['refs']['main'] = sha

  def close(self):
    self.server.shutdown()
    self.server.server_close()

  def _answer(self, handler, body: bool) -> None:
    self.requests.append((handler.command, handler.path, handler.headers))  # case-insensitive
    path = handler.path.split('?')[0]
    api = path.startswith('/api/')
    parts = path.removeprefix('/api/').lstrip('/').split('/')
    repo_type = 'model'
    if parts[0] in ('datasets', 'models'):
      repo_type = 'dataset' if parts.pop(0) == 'datasets' else 'model'
    repo = self.repos.get((repo_type, '/'.join(parts[:2])))
    if repo is None:
      return self._error(handler, 404, 'RepoNotFound')
    if repo['gated'] and handler.headers.get('Authorization') != f'Bearer {TOKEN}':
      return self._error(handler, 401, 'GatedRepo')
    verb, revision, file = parts[2], parts[3], '/'.join(parts[4:])
    sha = revision if revision in repo['commits'] else repo['refs'].get(revision)
    if sha is None:
      return self._error(handler, 404, 'RevisionNotFound')
    files = repo['commits'][sha]
    if api and verb == 'revision':
      payload = json.dumps({'id': '/'.join(parts[:2]), 'sha': sha, 'private': False,
                            'siblings': [{'rfilename': name} for name in sorted(files)]}).encode()
      return self._send(handler, 200, {'Content-Type': 'application/json'}, payload, body)
    if verb != 'resolve' or file not in files:
      return self._error(handler, 404, 'EntryNotFound', {'X-Repo-Commit': sha})
    content = files[file]
    headers = {'X-Repo-Commit': sha, 'ETag': f'"{hashlib.sha256(content).hexdigest()}"',
               'Accept-Ranges': 'bytes'}
    start = int(m.group(1)) if (m := re.match(r'bytes=(\d+)-', handler.headers.get('Range', ''))) else 0
    if body and file in self.cut:  # send the headers of the whole file, half of it, then hang up
      self.cut.discard(file)
      handler.send_response(200)
      for k, v in {**headers, 'Content-Length': str(len(content))}.items():
        handler.send_header(k, v)
      handler.end_headers()
      handler.wfile.write(content[:len(content) // 2])
      handler.wfile.flush()
      handler.close_connection = True
      return
    if start:
      headers['Content-Range'] = f'bytes {start}-{len(content) - 1}/{len(content)}'
    self._send(handler, 206 if start else 200, headers, content[start:], body)

  def _receive(self, handler) -> None:
    """The upload side: POST /api/repos/create, /api/models/OWNER/NAME/preupload/REV (every file 'regular',
    sent inline) and /api/models/OWNER/NAME/commit/REV (NDJSON: a header, then base64 files): a new commit
    on top of the branch, with the files it adds."""
    body = handler.rfile.read(int(handler.headers.get('Content-Length') or 0))
    self.requests.append((handler.command, handler.path, handler.headers))
    if handler.headers.get('Authorization') != f'Bearer {TOKEN}':
      return self._error(handler, 401, 'Unauthorized')
    parts = handler.path.split('?')[0].removeprefix('/api/').split('/')
    if parts[:2] == ['repos', 'create']:
      request = json.loads(body)
      repo_id = f"{request['organization']}/{request['name']}" if request.get('organization') else request['name']
      if ('model', repo_id) in self.repos:
        return self._error(handler, 409, 'RepoExists')
      self.repos[('model', repo_id)] = {'commits': {}, 'refs': {}, 'gated': False}
      return self._send(handler, 200, {'Content-Type': 'application/json'},
                        json.dumps({'url': f'{self.url}/{repo_id}'}).encode(), True)
    repo_type = {'models': 'model', 'datasets': 'dataset'}[parts[0]]
    repo_id, verb, revision = '/'.join(parts[1:3]), parts[3], parts[4]
    repo = self.repos.get((repo_type, repo_id))
    if repo is None:
      return self._error(handler, 404, 'RepoNotFound')
    if verb == 'preupload':
      files = [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None}
               for f in json.loads(body)['files']]
      return self._send(handler, 200, {'Content-Type': 'application/json'},
                        json.dumps({'files': files}).encode(), True)
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    files = dict(repo['commits'].get(repo['refs'].get(revision), {}))
    for line in lines:
      if line['key'] == 'file':
        files[line['value']['path']] = base64.b64decode(line['value']['content'])
    sha = hashlib.sha1(body).hexdigest()
    self.add(repo_type, repo_id, files, sha=sha)
    return self._send(handler, 200, {'Content-Type': 'application/json'},
                      json.dumps({'commitUrl': f'{self.url}/{repo_id}/commit/{sha}', 'commitOid': sha,
                                  'success': True}).encode(), True)

  @staticmethod
  def _send(handler, status: int, headers: dict, payload: bytes, body: bool) -> None:
    handler.send_response(status)
    for k, v in {**headers, 'Content-Length': str(len(payload))}.items():
      handler.send_header(k, v)
    handler.end_headers()
    if body:
      handler.wfile.write(payload)

  def _error(self, handler, status: int, code: str, headers: dict | None = None) -> None:
    self._send(handler, status, {'X-Error-Code': code, 'X-Error-Message': code, **(headers or {})},
               b'{"error": "' + code.encode() + b'"}', handler.command != 'HEAD')


def point_at(monkeypatch, hf_home: pathlib.Path, endpoint: str | None) -> None:
  """What HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE set at import would give (constants are read then)."""
  if endpoint:
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', endpoint is None)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(hf_home / 'hub'))
  monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(hf_home / 'token'))
  monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(hf_home / 'stored_tokens'))
  monkeypatch.delenv('HF_TOKEN', raising=False)


def add_builtin(server: LocalHub, name: str, files: dict[str, str | bytes]) -> str:
  """Serves `files` as the repo of the built-in download `name` (sources.DOWNLOADS) at the commit its spec
  pins; returns that commit."""
  spec = hub.HubPath.parse(sources.DOWNLOADS[name].spec)
  server.add(spec.repo_type, spec.repo_id, files, sha=spec.revision)
  return spec.revision


def hub_env(hf_home: pathlib.Path, endpoint: str) -> dict[str, str]:
  """The environment of a subprocess that talks to `endpoint` as its Hub, with its cache in `hf_home`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
  return {**env, 'HF_HOME': str(hf_home), 'HF_ENDPOINT': endpoint}
