"""The Hugging Face Hub as a source of files (SPEC §6): `hf://` paths, pinned to a commit, cached.

    hf://datasets/OWNER/NAME[@REVISION]/PATTERN    a dataset repo (Claire, TinyStories, FineWeb-Edu)
    hf://OWNER/NAME[@REVISION]/PATTERN             a model repo (a tokenizer.json)

and, the other way, `push` uploads an export folder to a model repo (`export --push_to_hub=OWNER/NAME`).

PATTERN is a file path or a glob over the repo's files (`*` and `?` stay within one folder, `**` spans
folders, `[0-7]` a class); REVISION a branch, tag or commit (default `main`). The revision is resolved to a
commit sha once, and every file is then fetched at that commit through `huggingface_hub` into its own
cache (`HF_HOME`, `HF_HUB_CACHE`): resumed downloads, retries, `HF_ENDPOINT` mirrors and `HF_HUB_OFFLINE=1`
come from there. With no network (or offline mode) the files are found in that cache, the revision
through its `refs/`. Tokens are huggingface_hub's business: `HF_TOKEN` or `hf auth login`; this module
never reads, passes or prints one. Every failure is one `HubError` line naming the repo and the fix.
"""

import dataclasses
import fnmatch
import pathlib
import re
import urllib.parse

import huggingface_hub
from absl import logging
from huggingface_hub import constants, errors, file_download


PREFIX = 'hf://'
_REPO_TYPES = {'datasets': 'dataset', 'spaces': 'space'}  # a bare OWNER/NAME is a model repo
_COMMIT = re.compile(r'[0-9a-f]{40}')
_LISTED = 8  # files named in a "no file matches" error


class HubError(ValueError):
  """A Hub source that cannot be read: one line naming the repo and what to do (sources.py re-raises it
  as a HubError)."""


@dataclasses.dataclass(frozen=True)
class HubPath:
  """A parsed `hf://` spec."""
  repo_type: str   # 'dataset', 'model' or 'space'
  repo_id: str     # OWNER/NAME
  revision: str    # as written: a branch, tag or commit sha
  pattern: str     # a path or glob inside the repo

  @classmethod
  def parse(cls, spec: str) -> 'HubPath':
    rest = spec.removeprefix(PREFIX)
    parts = rest.split('/')
    repo_type = 'model'
    if parts[0] in _REPO_TYPES:
      repo_type = _REPO_TYPES[parts.pop(0)]
    if len(parts) < 3 or not all(parts[:2]) or not parts[2]:
      raise HubError(f'{spec}: expected hf://datasets/OWNER/NAME[@REVISION]/PATH (a dataset) or '
                     'hf://OWNER/NAME[@REVISION]/PATH (a model), PATH a file or a glob')
    name, _, revision = parts[1].partition('@')
    return cls(repo_type, f'{parts[0]}/{name}', urllib.parse.unquote(revision) or 'main', '/'.join(parts[2:]))

  @property
  def repo(self) -> str:
    """`hf://datasets/OWNER/NAME`: how errors name the repo."""
    return f'{PREFIX}{self._type_prefix}{self.repo_id}'

  @property
  def page(self) -> str:
    """The repo's page on the Hub (or the mirror HF_ENDPOINT names), where gated terms are accepted."""
    return f'{constants.ENDPOINT}/{self._type_prefix}{self.repo_id}'

  @property
  def _type_prefix(self) -> str:
    return {'dataset': 'datasets/', 'space': 'spaces/', 'model': ''}[self.repo_type]

  def at(self, commit: str, path: str) -> str:
    """The spec of one file at one commit: what caches and summaries record."""
    return f'{self.repo}@{commit}/{path}'


@dataclasses.dataclass(frozen=True)
class HubFile:
  """One file of a resolved spec: where it is in the huggingface_hub cache, and what it is."""
  path: str     # the cached file (a snapshot path)
  origin: str   # hf://...@<commit sha>/<file>
  commit: str   # the commit sha the revision resolved to


def is_hub(spec: str) -> bool:
  return spec.startswith(PREFIX)


def fetch(spec: str) -> list[HubFile]:
  """The files an `hf://` spec names, at the commit its revision resolves to, in the local cache.

  Online: one request resolves the revision and lists the repo's files, then each matching file is
  downloaded at that commit unless cached. Offline (HF_HUB_OFFLINE=1) or with the Hub unreachable: the
  cache alone answers (the revision through refs/, the files through the commit's snapshot).

  Args:
    spec: `hf://datasets/OWNER/NAME[@REVISION]/PATTERN` or `hf://OWNER/NAME[@REVISION]/PATTERN`.

  Returns:
    The files, sorted by their path in the repo. Raises HubError (one line) when the repo is gated,
    missing or private, the revision unknown, nothing matches, or the Hub is unreachable and nothing is
    cached.
  """
  hub = HubPath.parse(spec)
  if constants.is_offline_mode():
    return _from_cache(hub, 'HF_HUB_OFFLINE is set')
  try:
    info = huggingface_hub.HfApi().repo_info(hub.repo_id, repo_type=hub.repo_type, revision=hub.revision)
  except errors.HfHubHTTPError as e:
    raise _access_error(hub, e) from None
  except Exception as e:  # pylint: disable=broad-except  (no network, DNS, proxy, timeout: try the cache)
    return _from_cache(hub, f'cannot reach {constants.ENDPOINT}: {type(e).__name__}')
  commit = info.sha
  files = _matching(hub, [s.rfilename for s in info.siblings or []], commit)
  _record_ref(hub, commit)
  found = []
  for name in files:  # by commit sha: a cached file costs no request
    try:
      path = huggingface_hub.hf_hub_download(hub.repo_id, name, repo_type=hub.repo_type, revision=commit)
    except errors.HfHubHTTPError as e:
      raise _access_error(hub, e, name) from None
    except errors.LocalEntryNotFoundError as e:  # the connection dropped between listing and download
      raise HubError(f'{hub.at(commit, name)}: the download failed and the file is not cached '
                     f'({str(e).splitlines()[0]}); run again') from None
    found.append(HubFile(path, hub.at(commit, name), commit))
  return found


def fetch_one(spec: str, *, what: str) -> HubFile:
  """The single file an `hf://` spec names (a tokenizer.json); `what` names the setting in errors."""
  if any(c in spec for c in '*?['):
    raise HubError(f'{what}={spec}: name one file, not a glob')
  (file,) = fetch(spec)
  return file


def pin(spec: str, origins: list[str]) -> str:
  """`spec` at the commit its files were read at: its revision replaced by the commit that `origins` (the
  `HubFile.origin`s a run read) record for the same repo and a file the pattern matches; unchanged when
  none does. A run's config then names exactly what it read, and a resumed run reads the same files."""
  hub = HubPath.parse(spec)
  for origin in origins:
    if not is_hub(origin):
      continue
    read = HubPath.parse(origin)
    if ((read.repo_type, read.repo_id) == (hub.repo_type, hub.repo_id) and _COMMIT.fullmatch(read.revision)
        and _matches_file(hub.pattern, read.pattern)):
      return f'{hub.repo}@{read.revision}/{hub.pattern}'
  return spec


def push(folder: str | pathlib.Path, repo_id: str, *, private: bool = False, message: str = '') -> str:
  """Uploads every file of `folder` (an export) to the model repo `repo_id` (OWNER/NAME), creating the repo
  if it does not exist; returns `hf://OWNER/NAME@<commit>` of the new commit.

  The token is huggingface_hub's (HF_TOKEN or `hf auth login`), as for downloads; it needs write access.
  Raises HubError (one line) when the Hub refuses or cannot be reached."""
  where = f'{PREFIX}{repo_id}'
  if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id):
    raise HubError(f'--push_to_hub={repo_id}: expected OWNER/NAME (a model repo on the Hub)')
  if constants.is_offline_mode():
    raise HubError(f'{where}: HF_HUB_OFFLINE is set: nothing can be uploaded; unset it to push')
  login = '`hf auth login` or set HF_TOKEN with a token that can write to it'
  api = huggingface_hub.HfApi()
  try:
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type='model',
                             commit_message=message or f'vesper_jax export of {pathlib.Path(folder).name}')
  except errors.HfHubHTTPError as e:
    status = getattr(getattr(e, 'response', None), 'status_code', '?')
    if status in (401, 403):
      raise HubError(f'{where}: the Hub refused the upload (HTTP {status}): {login}') from None
    raise HubError(f'{where}: the upload failed: the Hub ({constants.ENDPOINT}) answered HTTP {status}; '
                   'run again (files already uploaded are not sent twice)') from None
  except Exception as e:  # pylint: disable=broad-except  (no network, DNS, proxy, a dropped connection)
    raise HubError(f'{where}: cannot reach {constants.ENDPOINT} ({type(e).__name__}); run again with network '
                   'or point HF_ENDPOINT at the Hub') from None
  return f'{where}@{info.oid}'


def _matches_file(pattern: str, name: str) -> bool:
  """Whether `name` is among the files `pattern` names (a file, a glob, or a folder and all below it)."""
  pattern = pattern.strip('/')
  return _match(pattern.split('/'), name.split('/')) or name.startswith(pattern + '/')


def _matching(hub: HubPath, names: list[str], commit: str) -> list[str]:
  """The repo's files that match the pattern (a file, a glob, or a folder and all below it)."""
  pattern = hub.pattern.strip('/')
  matches = sorted(n for n in names if _match(pattern.split('/'), n.split('/')))
  if not matches and not any(c in pattern for c in '*?['):  # a folder: everything below it
    matches = sorted(n for n in names if n.startswith(pattern + '/'))
  sentencepiece = [n for n in names if n.endswith('.model')]
  if not matches and pattern.endswith('tokenizer.json') and sentencepiece:
    raise HubError(f'{hub.repo}@{commit[:12]}: no {pattern} in the repo, only a SentencePiece model '
                   f'({", ".join(sentencepiece[:3])}): convert it to a tokenizer.json (transformers: '
                   'AutoTokenizer.from_pretrained(REPO).save_pretrained(DIR)) and name that file')
  if not matches:
    listed = sorted(names)
    shown = ', '.join(listed[:_LISTED]) + (f', ... ({len(listed)} files)' if len(listed) > _LISTED else '')
    raise HubError(f'{hub.repo}@{commit[:12]}: no file matches {hub.pattern!r}; '
                    + (f'its files: {shown}' if listed else 'the repo has no files'))
  return matches


def _match(pattern: list[str], parts: list[str]) -> bool:
  """Glob match of path segments: `*`/`?`/`[..]` within a segment, `**` for any number of segments."""
  if not pattern:
    return not parts
  if pattern[0] == '**':
    return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
  return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def _storage(hub: HubPath) -> pathlib.Path:
  """The repo's folder in the huggingface_hub cache (datasets--OWNER--NAME, with refs/ snapshots/ blobs/)."""
  return pathlib.Path(constants.HF_HUB_CACHE) / file_download.repo_folder_name(
      repo_id=hub.repo_id, repo_type=hub.repo_type)


def _record_ref(hub: HubPath, commit: str) -> None:
  """Writes refs/<revision> as huggingface_hub does, so an offline run resolves the revision the same way.

  (hf_hub_download only records a ref when it is asked by branch name; files are fetched here by sha so
  that every file of one spec comes from one commit.)"""
  if hub.revision == commit:
    return
  ref = _storage(hub) / 'refs' / hub.revision
  try:
    if not ref.is_file() or ref.read_text() != commit:
      ref.parent.mkdir(parents=True, exist_ok=True)
      ref.write_text(commit)
  except OSError as e:  # a read-only cache still serves this run
    logging.warning('cannot record %s -> %s in the Hub cache: %s', hub.revision, commit, e)


def _from_cache(hub: HubPath, why: str) -> list[HubFile]:
  """The spec answered from the huggingface_hub cache alone (offline)."""
  storage = _storage(hub)
  commit = hub.revision if _COMMIT.fullmatch(hub.revision) else None
  ref = storage / 'refs' / hub.revision
  if commit is None and ref.is_file():
    commit = ref.read_text().strip()
  snapshot = storage / 'snapshots' / commit if commit else None
  if snapshot is None or not snapshot.is_dir():
    raise HubError(f'{hub.repo}@{hub.revision}: {why}, and nothing of it is cached in '
                   f'{constants.HF_HUB_CACHE}: run once with network and the same HF_HOME (or point HF_ENDPOINT at a mirror)')
  names = [str(p.relative_to(snapshot).as_posix()) for p in sorted(snapshot.rglob('*'))
           if p.is_file() and not p.name.startswith('.')]
  try:
    files = _matching(hub, names, commit)
  except HubError as e:
    raise HubError(f'{e} (offline: only cached files are listed; {why})') from None
  logging.info('%s: %s; read %d cached files at %s', hub.repo, why, len(files), commit)
  return [HubFile(str(snapshot / name), hub.at(commit, name), commit) for name in files]


def _access_error(hub: HubPath, e: Exception, name: str | None = None) -> HubError:
  """One line naming the repo and what to do. Never includes a token (huggingface_hub's messages do not
  either, but only the status and error kind are taken from them)."""
  where = f'{hub.repo}@{hub.revision}' + (f'/{name}' if name else '')
  login = '`hf auth login` or set HF_TOKEN'
  if isinstance(e, errors.GatedRepoError):
    sent = ' (the token in use has no access yet)' if huggingface_hub.get_token() else ''
    return HubError(f'{where}: gated repo{sent}: accept its terms on {hub.page} with your Hub account, '
                    f'then {login}')
  if isinstance(e, errors.RepositoryNotFoundError):
    return HubError(f'{where}: no such repo, or it is private: check the name on {hub.page}; for a '
                    f'private repo, {login} with a token that can read it')
  if isinstance(e, errors.RevisionNotFoundError):
    return HubError(f'{where}: no revision {hub.revision!r} (a branch, tag or commit sha of the repo)')
  if isinstance(e, errors.EntryNotFoundError):
    return HubError(f'{where}: no such file in the repo')
  status = getattr(getattr(e, 'response', None), 'status_code', '?')
  return HubError(f'{where}: the Hub ({constants.ENDPOINT}) answered HTTP {status}; try again later, or '
                  'point HF_ENDPOINT at a mirror')

