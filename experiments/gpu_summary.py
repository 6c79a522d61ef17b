"""The GPU suite's results, failures first, then its numbers against issue 12's targets
(experiments/gpu_suite.sh).

    python experiments/gpu_summary.py --dir=$OUT        # reads what the suite wrote, writes summary.json

Leads with what failed: correctness checks that said FAIL or never reported (checks.json from
experiments/gpu_checks.py; a check missing from it ran out of time or crashed), and suite steps that
exited non-zero or timed out (--steps, the suite's step log). Then reads bench_velvet.json (update GB/s
per path against the device copy measured in the same run) and the bench_train*.json files (the medium
train step: AdamW and each Velvet kernel, the torch.compile anchor, XLA against cuDNN attention, the
first step cold and from the persistent compilation cache), prints one table and writes summary.json
(the device line, checks, steps and the table together). A number the suite did not produce is
reported as missing, never filled in.
"""

import json
import pathlib

from absl import app
from absl import flags

_DIR = flags.DEFINE_string('dir', '.', 'The directory the suite wrote its JSON files into ($OUT).')
_STEPS = flags.DEFINE_string('steps', '', 'The suite\'s step log: lines of name, limit s, exit status, s.')
_DEVICE_FILE = flags.DEFINE_string('device_file', '', 'The suite\'s device description (gpu.txt).')

# Issue 12's targets (benchmarks, not tests).
UPDATE_FRACTION_OF_COPY = 0.90
ANCHOR_RATIO = 1.05
MFU_MEDIUM = 0.58
FIRST_STEP_S = 15.0
CACHED_FIRST_STEP_S = 5.0


def _read(path: pathlib.Path):
  return json.loads(path.read_text()) if path.is_file() else None


def summarize(directory: pathlib.Path) -> dict:
  """{'update': [...], 'train': [...], 'checks_timing': [...]} from the suite's JSON files in `directory`."""
  out = {'update': [], 'train': [], 'checks_timing': []}

  def check(name: str, value, target: str, ok) -> None:
    out['checks_timing'].append({'check': name, 'value': value, 'target': target,
                          'status': 'missing' if value is None else ('met' if ok else 'not met')})

  velvet = _read(directory / 'bench_velvet.json')
  for row in (velvet or {}).get('rows', []):
    out['update'].append({k: row.get(k) for k in ('tree', 'params', 'path', 'layout', 'ms', 'gb_per_s',
                                                  'fraction_of_copy', 'skipped')})
  for tree in sorted({r['tree'] for r in out['update']}):
    measured = [r for r in out['update'] if r['tree'] == tree and r['path'] != 'copy'
                and r['path'].startswith('velvet') and r.get('fraction_of_copy')]
    best = max(measured, key=lambda r: r['fraction_of_copy'], default=None)
    check(f'{tree}: best Velvet update / copy' + (f" ({best['path']})" if best else ''),
          best and round(best['fraction_of_copy'], 3), f'>= {UPDATE_FRACTION_OF_COPY}',
          best and best['fraction_of_copy'] >= UPDATE_FRACTION_OF_COPY)

  train = _read(directory / 'bench_train.json') or []
  out['train'] = train
  anchor = next((r for r in train if r['framework'] == 'torch.compile'), None)
  for row in train:
    if row['framework'] != 'vesper_jax':
      continue
    label = f"{row['config']} {row['optimizer']}/{row['kernel']}"
    ratio = anchor and row['tokens_per_s'] / anchor['tokens_per_s']
    check(f'{label}: tokens/s / torch.compile', ratio and round(ratio, 3), f'>= {ANCHOR_RATIO}',
          ratio and ratio >= ANCHOR_RATIO)
    check(f'{label}: MFU', row['mfu'] and round(row['mfu'], 3), f'>= {MFU_MEDIUM}',
          row['mfu'] and row['mfu'] >= MFU_MEDIUM)
    check(f'{label}: first step s (cold)', round(row['first_step_s'], 1), f'<= {FIRST_STEP_S}',
          row['first_step_s'] <= FIRST_STEP_S)
  cached = _read(directory / 'bench_train_cached.json') or []
  cached_s = round(cached[0]['first_step_s'], 1) if cached else None
  check('medium adamw: first step s (compilation cache)', cached_s, f'<= {CACHED_FIRST_STEP_S}',
        cached_s is not None and cached_s <= CACHED_FIRST_STEP_S)
  xla = _read(directory / 'bench_train_xla_attention.json') or []
  auto = next((r for r in train if r['framework'] == 'vesper_jax' and r['optimizer'] == 'adamw'), None)
  ratio = auto['tokens_per_s'] / xla[0]['tokens_per_s'] if (xla and auto) else None
  check(f"medium adamw: auto attention ({auto['attention'] if auto else '?'}) / XLA attention tokens/s",
        ratio and round(ratio, 3), '> 1 (else auto should stay XLA)', ratio is not None and ratio > 1)
  return out


def correctness(directory: pathlib.Path, steps_file: str) -> dict:
  """{'checks': [...], 'steps': [...], 'failures': [lines]} from checks.json and the step log."""
  report = _read(directory / 'checks.json')
  if report is None:
    checks = [{'name': 'checks', 'status': 'MISSING', 'detail': 'no checks.json: experiments/gpu_checks.py '
               'did not start (steps.log)', 'seconds': None}]
  else:
    checks = [{k: c.get(k) for k in ('name', 'status', 'detail', 'seconds')} for c in report['checks']]
    done = {c['name'] for c in checks}
    checks += [{'name': name, 'status': 'MISSING', 'detail': 'no result: the check ran out of time or '
                'crashed (steps.log)', 'seconds': None} for name in report['planned'] if name not in done]
  steps = []
  if steps_file and pathlib.Path(steps_file).is_file():
    for line in pathlib.Path(steps_file).read_text().splitlines():
      name, limit, rc, seconds = line.split('\t')
      steps.append({'step': name, 'limit_s': int(limit), 'exit': int(rc), 'seconds': int(seconds)})
  failures = [f"FAIL {s['step']}" for s in steps if s['step'].startswith('setup')]  # before any step ran
  failures += [f"{c['status']} {c['name']}: {c['detail']}" for c in checks if c['status'] in ('FAIL', 'MISSING')]
  for s in steps:
    if s['step'].startswith('setup'):
      continue
    if s['exit'] == 124:
      failures.append(f"STEP {s['step']}: timed out after {s['limit_s']} s (steps.log)")
    # The checks step exits 1 when a check failed: listed above.
    elif s['exit'] and not (s['step'] == 'checks' and s['exit'] == 1):
      failures.append(f"STEP {s['step']}: exit status {s['exit']} after {s['seconds']} s (steps.log)")
  return {'checks': checks, 'steps': steps, 'failures': failures}


def main(argv):
  del argv
  directory = pathlib.Path(_DIR.value)
  device = pathlib.Path(_DEVICE_FILE.value) if _DEVICE_FILE.value else directory / 'gpu.txt'
  result = {'device': device.read_text().strip().splitlines() if device.is_file() else [],
            **correctness(directory, _STEPS.value), **summarize(directory)}
  (directory / 'summary.json').write_text(json.dumps(result, indent=2))
  counts = {s: sum(c['status'] == s for c in result['checks']) for s in ('FAIL', 'MISSING', 'PASS', 'SKIP')}
  print(f"FAILURES: {len(result['failures'])}" + ''.join(f'\n  {line}' for line in result['failures']))
  print('correctness: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n))
  for c in result['checks']:
    if c['status'] not in ('FAIL', 'MISSING'):
      print(f"  {c['status']} {c['name']}: {c['detail']}")
  if not any(r for r in (result['update'], result['train'])):
    print('timing: no results (skipped without a GPU, or every timing step failed)')
  print('| check | value | target | status |\n|---|---:|---|---|')
  for c in result['checks_timing']:
    print(f"| {c['check']} | {c['value'] if c['value'] is not None else '-'} | {c['target']} | {c['status']} |")
  print(f"wrote {directory / 'summary.json'}")


if __name__ == '__main__':
  app.run(main)
