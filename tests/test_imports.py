"""Imports point one way (STYLE.md): no circle among the package's modules, counting every import —
module-level, inside functions, under `if TYPE_CHECKING:` — and the model layer loads no I/O.

The graph is read from the source with `ast`, so an import that only runs later (a function-level one)
still counts: it closes the circle as soon as it runs.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = 'vesper_jax'
# kernels/ is installed as vesper_jax.kernels (pyproject.toml).
SOURCE_DIRS = {PACKAGE: REPO / 'vesper_jax', f'{PACKAGE}.kernels': REPO / 'kernels'}
# The model and its layers: no checkpoint, export, file or data module may be reachable from them.
MODEL_LAYER = ('model', 'era', 'flylora', 'metacog', 'quantize', 'pytree', 'sampling', 'decode', 'losses')
IO_MODULES = ('checkpoint', 'export', 'finetune', 'data', 'sources', 'hub', 'tokenizer', 'prepare', 'train',
              'evaluate', 'generate', 'chat', 'metrics_writer', 'cli', 'scale')
IO_LIBRARIES = ('orbax', 'safetensors', 'huggingface_hub')


def _module_files() -> dict[str, pathlib.Path]:
  """Dotted module name → file, for the package and kernels/."""
  files = {}
  for package, directory in SOURCE_DIRS.items():
    for path in sorted(directory.glob('*.py')):
      files[package if path.stem == '__init__' else f'{package}.{path.stem}'] = path
  return files


def _imports(path: pathlib.Path, module: str, known: set[str]):
  """(imported module, line) for every import statement anywhere in the file, relative ones resolved."""
  is_package = path.stem == '__init__'
  package = module if is_package else module.rpartition('.')[0]
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), filename=str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: resolved against this module's package
        parts = package.split('.')
        parts = parts[:len(parts) - (node.level - 1)]
        base = '.'.join(parts + ([node.module] if node.module else []))
      for alias in node.names:
        candidate = f'{base}.{alias.name}'
        yield (candidate if candidate in known else base), node.lineno


def _graph() -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
  """(module → {package module it imports: line}, module → third-party top-level names it imports).

  Importing a.b.c runs a/__init__ and a/b/__init__ first: an edge to a module is also an edge to each
  package above it.
  """
  files = _module_files()
  known = set(files)
  edges, libraries = {m: {} for m in files}, {m: set() for m in files}
  for module, path in files.items():
    for target, line in _imports(path, module, known):
      if target.split('.')[0] != PACKAGE:
        libraries[module].add(target.split('.')[0])
        continue
      while target and target not in known:  # `import vesper_jax.model.x` names an attribute path
        target = target.rpartition('.')[0]
      while target:
        if target != module:
          edges[module].setdefault(target, line)
        target = target.rpartition('.')[0]
  return edges, libraries


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
  """One cycle of the graph as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(edges.get(node, {})):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def _reachable(edges: dict[str, dict[str, int]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo += list(edges.get(node, {}))
  return seen


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({'a': {'b': 1}, 'b': {'c': 1}, 'c': {}}) is None
  assert find_cycle({'a': {'b': 1}, 'b': {'c': 1}, 'c': {'a': 1}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'x': {'y': 1}, 'y': {'y': 1}}) == ['y', 'y']


def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch):
  pkg = tmp_path / 'vesper_jax'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from vesper_jax import b\n')
  (pkg / 'b.py').write_text('def f():\n  from . import c\n')  # function-level, relative
  (pkg / 'c.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  import vesper_jax.a\n')
  monkeypatch.setitem(SOURCE_DIRS, PACKAGE, pkg)
  monkeypatch.setitem(SOURCE_DIRS, f'{PACKAGE}.kernels', tmp_path / 'none')
  edges, libraries = _graph()
  assert edges['vesper_jax.b'] == {'vesper_jax.c': 2, 'vesper_jax': 2}
  assert find_cycle(edges) == ['vesper_jax.a', 'vesper_jax.b', 'vesper_jax.c', 'vesper_jax.a']
  assert libraries['vesper_jax.c'] == {'typing'}


def test_no_import_cycle_among_the_package_modules():
  edges, _ = _graph()
  assert len(edges) > 20 and 'vesper_jax.kernels.velvet_pallas' in edges
  assert 'vesper_jax.model' in edges['vesper_jax.decode']  # the graph really holds the imports
  cycle = find_cycle(edges)
  if cycle:
    files = _module_files()
    steps = [f'{a} ({files[a].relative_to(REPO)}:{edges[a][b]}) imports {b}' for a, b in zip(cycle, cycle[1:])]
    pytest.fail('import cycle: ' + ' -> '.join(cycle) + '\n  ' + '\n  '.join(steps))


@pytest.mark.parametrize('name', MODEL_LAYER)
def test_the_model_layer_reaches_no_io_module(name):
  edges, libraries = _graph()
  reachable = _reachable(edges, f'{PACKAGE}.{name}')
  assert not reachable & {f'{PACKAGE}.{m}' for m in IO_MODULES}, sorted(reachable)
  used = set().union(*(libraries[m] for m in reachable))
  assert not used & set(IO_LIBRARIES), sorted(used)


def test_importing_the_model_loads_no_checkpoint_export_orbax_or_safetensors():
  """The real interpreter's view (sys.modules), after importing each module of the model layer in turn."""
  watched = [f'{PACKAGE}.checkpoint', f'{PACKAGE}.export', *IO_LIBRARIES]
  code = f'''
import json, sys
loaded = {{}}
for name in {[f'{PACKAGE}.{m}' for m in MODEL_LAYER]!r}:
  __import__(name)
  loaded[name] = sorted(m for m in sys.modules if m.split('.')[0] in {list(IO_LIBRARIES)!r}
                        or m in {watched!r})
print(json.dumps(loaded))
'''
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  loaded = json.loads(out.stdout.strip().splitlines()[-1])
  assert list(loaded) == [f'{PACKAGE}.{m}' for m in MODEL_LAYER]
  assert loaded == {name: [] for name in loaded}, loaded
