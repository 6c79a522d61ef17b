"""Every notebook under notebooks/ runs top to bottom without an error and draws at least one figure."""

import pathlib

import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: pathlib.Path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  # One simulated device and a private cache keep the kernel quick and the user's cache untouched.
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(REPO)}})
  client.execute()
  figures = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])
             if 'image/png' in o.get('data', {})]
  assert figures, f'{path.name} drew no figure'
