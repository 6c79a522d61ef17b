"""Every notebook under notebooks/ runs top to bottom, draws at least one figure, and prints the numbers
it exists to show within ranges (or relations) that its computation, broken, would leave."""

import ast
import math
import pathlib
import re

import numpy as np
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))


def _printed(notebook) -> str:
  """What the code cells printed (stdout) and their results' text, in order."""
  out = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []) if cell.cell_type == 'code' else []:
      if output.get('output_type') == 'stream' and output.get('name') == 'stdout':
        out.append(output['text'])
      elif output.get('output_type') == 'execute_result':
        out.append(output['data'].get('text/plain', '') + '\n')
  return ''.join(out)


def _find(pattern: str, printed: str) -> re.Match:
  match = re.search(pattern, printed, re.MULTILINE)
  assert match, f'nothing printed matches {pattern!r}:\n{printed[-3000:]}'
  return match


def _literal(pattern: str, printed: str):
  """The Python literal (a dict, a list) that group 1 of `pattern` finds in the printed text."""
  return ast.literal_eval(_find(pattern, printed).group(1))


def _number(pattern: str, printed: str) -> float:
  return float(_find(pattern, printed).group(1))


# Each notebook's key numbers. The training runs are seconds long: their losses are checked against the
# untrained model's (ln V for a vocabulary of V tokens), not against golden values.

def _quickstart(printed: str) -> None:
  for name, d_model in (('tiny', 128), ('medium', 768)):
    counts = _literal(rf'^{name} (\{{.*\}})$', printed)
    assert counts['total'] == counts['embedding'] + counts['non_embedding'], name
    assert counts['embedding'] == 2 * 32000 * d_model, name  # the embedding and the untied head
  evals = _literal(r'validation loss by step: (\[.*\])', printed)
  assert [step for step, _ in evals] == [0, 20, 40, 60]
  assert abs(evals[0][1] - math.log(1024)) < 0.3  # untrained: about uniform over 1,024 tokens
  assert evals[-1][1] < evals[0][1] - 0.5


def _velvet(printed: str) -> None:
  summary = _literal(r"^(\{'eval_loss'.*\})$", printed)
  assert summary['eval_loss'] < math.log(512) - 0.5
  assert summary['eval_perplexity'] == pytest.approx(math.exp(summary['eval_loss']), rel=1e-3)
  # Velvet with both flags off is AdamW: the same path to float32 rounding (values around 1 to 17).
  assert _number(r'flags off vs AdamW, largest difference along the path: (\S+)$', printed) < 1e-3


def _flylora(printed: str) -> None:
  assert _number(r'^(\d+\.\d+)$', printed) < math.log(512) - 0.5  # the fine-tuned eval_loss
  report = _literal(r"^(\{'total'.*\})$", printed)
  assert report['trainable'] == 2 * 2 * 8 * 384  # B of rank 8 for gate and up (d_ff 384), 2 layers
  assert report['trainable'] < report['lora_same_rank'] < report['full_finetune']
  assert report['reduction_vs_full'] == pytest.approx(1 - report['trainable'] / report['full_finetune'],
                                                      abs=1e-4)
  assert report['reduction_vs_lora'] == pytest.approx(1 - report['trainable'] / report['lora_same_rank'],
                                                      abs=1e-4)
  assert 'refused: ' in printed  # top-k < rank: no exact merge
  assert _number(r'max \|logits\(merged\) − logits\(adapters\)\|: (\S+)$', printed) < 1e-4


def _era(printed: str) -> None:
  assert 'ERA(λ=0) == SiLU: True' in printed
  losses = _literal(r'final validation loss: (\{.*\})', printed)
  assert set(losses) == {'ERA λ=0.3', 'SiLU'}
  assert all(loss < math.log(512) - 0.5 for loss in losses.values())
  assert abs(losses['ERA λ=0.3'] - losses['SiLU']) < 0.5


def _scaling(printed: str) -> None:
  # Synthetic losses from Chinchilla's constants with 0.5% noise: the fit finds them, inside its interval.
  tolerance = {'E': 0.1, 'alpha': 0.03, 'beta': 0.03}
  for key, close in tolerance.items():
    match = _find(rf'^{key}: true (\S+)  fitted (\S+)  95% \[(\S+), (\S+)\]$', printed)
    true, fitted, lo, hi = map(float, match.groups())
    assert abs(fitted - true) < close and lo <= fitted <= hi and lo <= true <= hi, (key, match.group(0))
  errors = np.array(_find(r'held-out prediction error \(nats\): \[([^\]]*)\]', printed).group(1).split(),
                    float)
  assert len(errors) == 4 and np.all(np.abs(errors) < 0.1)  # the held-out model's losses, predicted
  for n, d in (_literal(r'fit: (\[[^\]]*\])', printed), _literal(r'scale\): (\[[^\]]*\])', printed)):
    assert 6 * float(n) * float(d) == pytest.approx(1e21, rel=0.05)  # C = 6·N·D


def _metacognition(printed: str) -> None:
  summary = _literal(r"^(\{'eval_loss'.*\})$", printed)
  assert summary['eval_loss'] < math.log(512) - 0.5
  match = _find(r'^(\d+) targets, loss (\S+), top-1 accuracy (\S+), mean confidence (\S+)$', printed)
  targets, loss, accuracy, confidence = int(match.group(1)), *map(float, match.groups()[1:])
  assert targets > 1000 and abs(loss - summary['eval_loss']) < 0.2
  assert 0.05 < accuracy < 1  # far above chance (1/512)
  assert abs(confidence - accuracy) < 0.1  # the head is trained to be calibrated
  ece, auroc = map(float, _find(r'^\| metacog head \| (\S+) \| (\S+) \|', printed).groups())
  assert 0 <= ece < 0.15 and 0 <= auroc <= 1
  # The model's own top probability ranks right above wrong predictions, even this early.
  assert float(_find(r'^\| max softmax probability \| \S+ \| (\S+) \|', printed).group(1)) > 0.55
  scores = [float(s) for s in re.findall(r'^candidate \d+: mean confidence (\S+)', printed, re.MULTILINE)]
  chosen = int(_find(r'^chosen: (\d+)', printed).group(1))
  assert len(scores) == 3 and scores[chosen] == max(scores)  # the regulator keeps the most confident


KEY_NUMBERS = {'01_quickstart': _quickstart, '02_velvet': _velvet, '03_flylora': _flylora, '04_era': _era,
               '05_scaling': _scaling, '06_metacognition': _metacognition}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: pathlib.Path, tmp_path, monkeypatch):
  assert path.stem in KEY_NUMBERS, f'{path.name}: add the numbers it prints to KEY_NUMBERS'
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
  KEY_NUMBERS[path.stem](_printed(notebook))
