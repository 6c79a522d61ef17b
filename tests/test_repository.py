"""The repository stands alone: no code reads files from beside the checkout, every test fixture is in
tests/data and listed in its README, and every "SPEC §N" the code cites is a section of vesper_jax/SPEC.md."""

import hashlib
import re

from conftest import REPO, TEST_DATA

FOLDERS = ('vesper_jax', 'configs', 'kernels', 'experiments', 'tests', 'notebooks')
SKIPPED_DIRS = {'__pycache__', '.ipynb_checkpoints', 'results'}  # generated (experiments/results is ignored)
# A path out of the checkout: '../shared', or a REPO.parent / 'shared' built in code.
OUTSIDE = re.compile(r"\.\./shared\b|parent\s*/\s*['\"]shared['\"]")
# Files that may mention the folder beside the development checkouts, each with the reason. None reads it.
ALLOWED = {
    'vesper_jax/host_memory.py': 'a comment naming where a measurement was taken; nothing reads the file',
    'experiments/gpu_suite.sh': 'a comment on preparing the lent GPU machines; the suite reads no data there',
    'experiments/gpu_reference.py': 'its docstring says that it does not use that folder',
    'tests/test_repository.py': 'this test names the pattern it looks for',
}
FIXTURE_BUDGET_BYTES = 1_000_000


def _text_files():
  for folder in FOLDERS:
    for path in sorted((REPO / folder).rglob('*')):
      if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(REPO).parts):
        try:
          yield path, path.read_text(encoding='utf-8')
        except UnicodeDecodeError:  # compiled kernels and other binaries
          continue


def test_nothing_reads_from_beside_the_checkout():
  found = []
  for path, text in _text_files():
    name = path.relative_to(REPO).as_posix()
    if name not in ALLOWED:
      found += [f'{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}' for m in OUTSIDE.finditer(text)]
  assert not found, ('paths outside the repository (use tests/data for tests, a download: source or a flag '
                     'for experiments; or add the file to ALLOWED with the reason):\n' + '\n'.join(found))
  pyproject = (REPO / 'pyproject.toml').read_text()
  assert not OUTSIDE.search(pyproject)


def test_every_fixture_is_listed_with_its_size_and_hash():
  readme = (TEST_DATA / 'README.md').read_text(encoding='utf-8')
  # The first table: | `file` | bytes | sha256 | what |
  rows = {m.group(1): (m.group(2).replace(',', ''), m.group(3))
          for m in re.finditer(r'^\| `([^`]+)` \| *([\d,]*) *\| *`?([0-9a-f]*)`? *\|', readme, re.MULTILINE)}
  files = sorted(p.name for p in TEST_DATA.iterdir() if p.is_file() and p.name != 'README.md')
  assert sorted(rows) == files, 'tests/data/README.md must list exactly the files in tests/data'
  total = 0
  for name, (size, sha256) in rows.items():
    data = (TEST_DATA / name).read_bytes()
    total += len(data)
    if sha256:  # the fixtures; the script that makes them is listed without
      assert (len(data), hashlib.sha256(data).hexdigest()) == (int(size), sha256), name
  assert total <= FIXTURE_BUDGET_BYTES


def test_spec_citations_resolve():
  spec = (REPO / 'vesper_jax' / 'SPEC.md').read_text(encoding='utf-8')
  sections = set(re.findall(r'^## (\d+)\. ', spec, re.MULTILINE))
  cited = {}
  for path, text in _text_files():
    for m in re.finditer(r'SPEC (§\d+(?:, §\d+)*)', text):
      for number in re.findall(r'\d+', m.group(1)):
        cited.setdefault(number, path.relative_to(REPO).as_posix())
  for m in re.finditer(r'SPEC §(\d+)', (REPO / 'pyproject.toml').read_text()):
    cited.setdefault(m.group(1), 'pyproject.toml')
  assert cited, 'no citation found: the pattern is wrong'
  missing = {n: where for n, where in cited.items() if n not in sections}
  assert not missing, f'cited sections absent from vesper_jax/SPEC.md (section: first file citing it): {missing}'
