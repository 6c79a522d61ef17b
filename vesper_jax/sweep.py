"""Sweeps: a grid of training runs, each in its own process and workdir, gathered into one table.

`python experiments/sweep.py --config=configs/tiny.py --grid=opt.learning_rate=1e-3,3e-3 --seeds=3
--workdir=sweeps/NAME` is the command line; the experiments (experiments/*.py) and notebooks call
`run_sweep` and `summarize` here.

One point = one set of grid values and one seed = one `python -m vesper_jax.train` process with its own
workdir `<sweep>/points/<name>/`, so a crash or an out-of-memory kill stays local. A finished point leaves
`result.json` (status 'done' and its final losses); a re-run skips those, and starts the others again in
their workdirs, where train resumes from the latest checkpoint on its own. A point that fails (bad key,
non-finite loss, killed) gets `result.json` with status 'failed' and the reason, and the sweep goes on;
a re-run tries it again. `<sweep>/results.jsonl` gathers every point's result, in grid order.

Lives in the package (not in experiments/) because notebooks read sweep results with `load_results` /
`summarize` too. Nothing here imports jax: the runner must not hold a GPU its children need.
"""

import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

import ml_collections

from vesper_jax import sources

RESULT_FILE = 'result.json'
RESULTS_FILE = 'results.jsonl'
SEED_KEY = 'train.seed'
TRAIN_PROGRAM = ('-m', 'vesper_jax.train')
_TERMINATE_GRACE_S = 60.0  # SIGTERM makes train save a checkpoint before it exits


@dataclasses.dataclass(frozen=True)
class Point:
  """One training run of a sweep: grid values (as typed on the command line) and a seed."""
  values: tuple[tuple[str, str], ...]   # ((key, value), ...) in grid order
  seed: int

  @property
  def name(self) -> str:
    """The point's directory name: `key=value` pairs and the seed, made safe for a path."""
    parts = [f'{key}={value}' for key, value in self.values] + [f'seed={self.seed}']
    return re.sub(r'[^A-Za-z0-9._=+-]', '_', ','.join(parts))


def parse_grid(specs: Iterable[str]) -> dict[str, list[str]]:
  """`['opt.name=adamw,velvet', ...]` -> {'opt.name': ['adamw', 'velvet'], ...}; names the bad spec."""
  grid: dict[str, list[str]] = {}
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not key or not values:
      raise ValueError(f'--grid={spec!r}: expected key=value1,value2,...')
    if key in grid:
      raise ValueError(f'--grid: {key} given twice')
    if key == SEED_KEY:
      raise ValueError(f'--grid: {SEED_KEY} is set by --seeds (0 .. seeds-1)')
    grid[key] = values.split(',')
  return grid


def parse_overrides(specs: Iterable[str]) -> dict[str, str]:
  """`['data.seq_len=64', ...]` -> {'data.seq_len': '64', ...} (the value may contain commas)."""
  overrides = {}
  for spec in specs:
    key, sep, value = spec.partition('=')
    if not sep or not key:
      raise ValueError(f'--set={spec!r}: expected key=value')
    overrides[key] = value
  return overrides


def expand(grid: dict[str, list[str]], seeds: int) -> list[Point]:
  """Every combination of the grid's values, times seeds 0 .. seeds-1 (the seed varies fastest)."""
  if seeds < 1:
    raise ValueError(f'seeds={seeds} must be at least 1')
  keys = list(grid)
  return [Point(tuple(zip(keys, combo)), seed)
          for combo in itertools.product(*(grid[k] for k in keys)) for seed in range(seeds)]


def config_overrides(config: ml_collections.ConfigDict,
                     reference: ml_collections.ConfigDict) -> dict[str, str]:
  """The `section.key -> value` strings that turn `reference` into `config` on train's command line.

  Lets an experiment build its runs' config in Python (config.short_run and friends) and hand the
  difference to the sweep as fixed overrides.
  """
  overrides = {}
  for section, values in config.items():
    for key, value in values.items():
      if value != reference[section][key] and value is not None:
        overrides[f'{section}.{key}'] = str(value)
  return overrides


def run_sweep(config_file: str | os.PathLike, grid: dict[str, list[str]], seeds: int,
              workdir: str | os.PathLike, *, overrides: dict[str, str] | None = None, parallel: int = 1,
              devices: list[str] | None = None, program: tuple[str, ...] = TRAIN_PROGRAM,
              on_point: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
  """Runs the points of `grid` × `seeds` that have not finished yet; returns every point's result.

  Args:
    config_file: train's --config (a configs/*.py path).
    grid: key -> values (strings, as on the command line), from `parse_grid`.
    seeds: seeds per cell, 0 .. seeds-1 (train.seed).
    workdir: the sweep's directory (points/<name>/ per point, results.jsonl).
    overrides: fixed `key -> value` for every point (the grid's values win over them).
    parallel: points run at once. With `devices`, point slots take them in turn as CUDA_VISIBLE_DEVICES.
    devices: accelerator ids to place runs on (one run per device), or None (CPU: no placement).
    program: the Python program each point runs (after `python`); the default is train's CLI.
    on_point: called with each result as it lands (the CLI prints a line).

  Returns:
    One dict per point in grid order, as in results.jsonl: point, params, seed, status ('done' |
    'failed'), reason, eval_loss, train_loss, step, seconds, ran (whether this call ran it).
  """
  workdir = pathlib.Path(workdir)
  points = expand(grid, seeds)
  (workdir / 'points').mkdir(parents=True, exist_ok=True)
  (workdir / 'sweep.json').write_text(json.dumps(
      {'config': str(config_file), 'grid': grid, 'seeds': seeds, 'overrides': overrides or {}}, indent=1))
  results: dict[Point, dict[str, Any]] = {}
  todo = []
  for point in points:
    previous = _read_result(workdir / 'points' / point.name)
    if previous is not None and previous['status'] == 'done':
      results[point] = {**previous, 'ran': False}
    else:
      todo.append(point)
  if parallel < 1:
    raise ValueError(f'parallel={parallel} must be at least 1')
  slots = list(range(parallel))
  running: dict[int, tuple[Point, subprocess.Popen, float]] = {}
  try:
    while todo or running:
      while todo and slots:
        slot, point = slots.pop(0), todo.pop(0)
        env = dict(os.environ)
        if devices:
          env['CUDA_VISIBLE_DEVICES'] = devices[slot % len(devices)]
        proc = _start(point, config_file, workdir, overrides or {}, program, env)
        running[slot] = (point, proc, time.perf_counter())
      time.sleep(0.2)
      for slot, (point, proc, started) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[slot]
        slots.append(slot)
        result = _finish(point, workdir / 'points' / point.name, proc.returncode,
                         time.perf_counter() - started)
        results[point] = {**result, 'ran': True}
        if on_point is not None:
          on_point(results[point])
  finally:
    _terminate([proc for _, proc, _ in running.values()])
    gathered = [results[p] for p in points if p in results]
    _write_jsonl(workdir / RESULTS_FILE, gathered)
  return gathered


def _start(point: Point, config_file, workdir: pathlib.Path, overrides: dict[str, str],
           program: tuple[str, ...], env: dict[str, str]) -> subprocess.Popen:
  point_dir = workdir / 'points' / point.name
  point_dir.mkdir(parents=True, exist_ok=True)
  (point_dir / RESULT_FILE).unlink(missing_ok=True)  # a failure of an earlier attempt is retried
  settings = {**overrides, **dict(point.values), SEED_KEY: str(point.seed)}
  cmd = [sys.executable, *program, f'--config={config_file}', f'--workdir={point_dir}']
  cmd += [f'--config.{key}={value}' for key, value in settings.items()]
  (point_dir / 'command.txt').write_text(' '.join(cmd) + '\n')
  log = open(point_dir / 'train.log', 'ab')  # appended: an interrupted attempt's log stays above
  try:
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  finally:
    log.close()  # the child holds its own copy


def _terminate(procs: list[subprocess.Popen]) -> None:
  """SIGTERM (train saves a checkpoint and exits), then SIGKILL whatever is still running."""
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + _TERMINATE_GRACE_S
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _finish(point: Point, point_dir: pathlib.Path, returncode: int, seconds: float) -> dict[str, Any]:
  """The point's result from its exit status and workdir, written to its result.json."""
  result: dict[str, Any] = {'point': point.name, 'params': dict(point.values), 'seed': point.seed,
                            'status': 'failed', 'reason': '', 'seconds': seconds}
  if returncode != 0:
    result['reason'] = _failure_reason(point_dir / 'train.log', returncode)
  else:
    final = read_final_metrics(point_dir)
    if final is None:
      result['reason'] = 'exited without reaching train.num_steps (stopped by a signal?)'
    else:
      result.update(final, status='done')
  tmp = point_dir / (RESULT_FILE + '.tmp')
  tmp.write_text(json.dumps(result, indent=1))
  tmp.replace(point_dir / RESULT_FILE)
  return result


def experiment_output(out: str | os.PathLike, *data_sources: str | os.PathLike) -> pathlib.Path:
  """An experiment's output directory, created once its data is at hand.

  Each of data_sources is a data.sources value. Its local entries must exist: FileNotFoundError names the
  first missing one and nothing is created. Its `download:NAME` entries are then fetched once (into
  <out>/cache, the data.cache_dir every run of an experiment shares, or for the names on the Hub into its
  cache, HF_HOME), so that the runs (in parallel on a GPU sweep) find them there instead of each fetching
  them; a failed download raises sources.DataError naming the URL or repo and what to do without network.
  `builtin:` entries need nothing.
  """
  entries = [e.strip() for spec in map(str, data_sources) for e in spec.split(',') if e.strip()]
  downloads = [e[len(sources.DOWNLOAD_PREFIX):] for e in entries if e.startswith(sources.DOWNLOAD_PREFIX)]
  for entry in entries:
    if not entry.startswith((sources.DOWNLOAD_PREFIX, 'builtin:')) and not pathlib.Path(entry).exists():
      raise FileNotFoundError(f'{entry} does not exist (pass a corpus with --data, or a download:NAME source: '
                              f'{", ".join(sorted(sources.DOWNLOADS))})')
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name in downloads:
    sources.download(name, out / 'cache')
  return out


def read_final_metrics(point_dir: str | os.PathLike) -> dict[str, Any] | None:
  """{'step', 'eval_loss', 'train_loss', 'tokens_per_s'} of a training workdir that reached
  train.num_steps (tokens_per_s: the median over the run's log lines), else None."""
  point_dir = pathlib.Path(point_dir)
  try:
    num_steps = json.loads((point_dir / 'config.json').read_text())['train']['num_steps']
    rows = [json.loads(line) for line in (point_dir / 'metrics.jsonl').read_text().splitlines() if line]
  except (OSError, ValueError, KeyError):
    return None
  evals = [r for r in rows if 'eval_loss' in r]
  trains = [r for r in rows if 'loss' in r]
  if not evals or evals[-1]['step'] != num_steps:
    return None
  speeds = [r['tokens_per_s'] for r in trains if 'tokens_per_s' in r]
  return {'step': num_steps, 'eval_loss': evals[-1]['eval_loss'],
          'train_loss': trains[-1]['loss'] if trains else math.nan,
          'tokens_per_s': statistics.median(speeds) if speeds else math.nan}


def _failure_reason(log_path: pathlib.Path, returncode: int) -> str:
  """train's one-line `error:` message if it wrote one, else the log's last line and the exit status."""
  try:
    lines = [l.strip() for l in log_path.read_text(errors='replace').splitlines() if l.strip()]
  except OSError:
    lines = []
  errors = [l for l in lines if ': error: ' in l]
  if errors:
    return errors[-1]
  if returncode < 0:
    hint = ' (out of memory?)' if -returncode == 9 else ''
    return f'killed by signal {-returncode}{hint}'
  return f"exit status {returncode}: {lines[-1] if lines else 'no output'}"


def _read_result(point_dir: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads((point_dir / RESULT_FILE).read_text())
  except (OSError, ValueError):
    return None


def _write_jsonl(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(json.dumps({k: v for k, v in r.items() if k != 'ran'}) + '\n' for r in rows))
  tmp.replace(path)


def load_results(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a sweep's results.jsonl."""
  path = pathlib.Path(workdir) / RESULTS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line]


# ------------------------------------------------------------------------------------------ gathering

def summarize(results: list[dict[str, Any]], group_by: Iterable[str] = (),
              metric: str = 'eval_loss') -> list[dict[str, Any]]:
  """One row per cell (grid values, seeds pooled): mean, std (n−1), n over its finished seeds, the
  number failed, and `best` — the lowest mean among the cells that share the `group_by` values.

  E.g. with a grid over opt.learning_rate and opt.name, group_by=['opt.name'] marks each optimizer's
  best learning rate.
  """
  group_by = list(group_by)
  cells: dict[tuple, dict[str, Any]] = {}
  for r in results:
    key = tuple(r['params'].items())
    cell = cells.setdefault(key, {'params': dict(r['params']), 'values': [], 'failed': 0, 'reasons': []})
    if r['status'] == 'done':
      cell['values'].append(r[metric])
    else:
      cell['failed'] += 1
      cell['reasons'].append(r['reason'])
  rows = []
  for cell in cells.values():
    xs = cell.pop('values')
    mean = statistics.mean(xs) if xs else math.nan
    std = statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else math.nan)
    rows.append({**cell, 'mean': mean, 'std': std, 'n': len(xs), 'seed_values': xs, 'best': False})
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row['params'].get(k) for k in group_by), []).append(row)
  for members in groups.values():
    finished = [m for m in members if m['n']]
    if finished:
      min(finished, key=lambda m: m['mean'])['best'] = True
  return rows


def markdown_table(cells: list[dict[str, Any]], metric: str = 'eval_loss') -> str:
  """The cells as a Markdown table: grid values, mean ± std over seeds, seeds, failures; best in bold."""
  if not cells:
    return '(no points)'
  keys = list(cells[0]['params'])
  lines = ['| ' + ' | '.join(keys + [f'{metric} (mean ± std)', 'seeds', 'failed']) + ' |',
           '|' + '---|' * len(keys) + '---:|---:|---:|']
  for c in cells:
    value = f"{c['mean']:.4f} ± {c['std']:.4f}" if c['n'] else '—'
    if c['best']:
      value = f'**{value}** (best)'
    lines.append('| ' + ' | '.join([c['params'][k] for k in keys] + [value, str(c['n']), str(c['failed'])])
                 + ' |')
  reasons = sorted({r for c in cells for r in c['reasons']})
  if reasons:
    lines += ['', 'Failures:'] + [f'- {r}' for r in reasons]
  return '\n'.join(lines)


def plot(cells: list[dict[str, Any]], path: str | os.PathLike, x_key: str | None = None,
         metric: str = 'eval_loss'):
  """The metric against one grid key (default: the first), a line per combination of the others, with
  ±std error bars; saved to `path` (PNG). Returns the matplotlib figure."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (an optional extra)
  if 'ipykernel' not in sys.modules:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = list(cells[0]['params'])
  x_key = x_key or keys[0]
  others = [k for k in keys if k != x_key]
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  lines: dict[tuple, list[dict]] = {}
  for c in cells:
    if c['n']:
      lines.setdefault(tuple(c['params'][k] for k in others), []).append(c)
  numeric = all(_is_number(c['params'][x_key]) for c in cells)
  for label, members in lines.items():
    members.sort(key=lambda c: float(c['params'][x_key]) if numeric else c['params'][x_key])
    xs = [float(c['params'][x_key]) if numeric else c['params'][x_key] for c in members]
    ax.errorbar(xs, [c['mean'] for c in members], yerr=[c['std'] for c in members], marker='o',
                capsize=3, label=', '.join(f'{k}={v}' for k, v in zip(others, label)) or None)
  if numeric and all(float(c['params'][x_key]) > 0 for c in cells):
    values = [float(c['params'][x_key]) for c in cells]
    if max(values) / min(values) >= 10:
      ax.set_xscale('log')
  ax.set_xlabel(x_key)
  ax.set_ylabel(f'{metric} (mean ± std over seeds)')
  if others:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return fig


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def welch_t_test(a: list[float], b: list[float]) -> dict[str, float]:
  """Welch's unequal-variance t-test of mean(b) − mean(a): t, degrees of freedom, two-sided p."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a dependency of jax)
  if len(a) < 2 or len(b) < 2:
    return {'t': math.nan, 'dof': math.nan, 'p': math.nan}
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  diff = statistics.mean(b) - statistics.mean(a)
  if va + vb == 0:
    return {'t': math.copysign(math.inf, diff) if diff else 0.0, 'dof': math.nan,
            'p': 0.0 if diff else 1.0}
  t = diff / math.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return {'t': t, 'dof': dof, 'p': float(2 * stats.t.sf(abs(t), dof))}


def visible_gpus() -> list[str]:
  """GPU ids to place runs on: CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L` lists, else []."""
  if os.environ.get('CUDA_VISIBLE_DEVICES'):
    return [d for d in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if d]
  if shutil.which('nvidia-smi') is None:
    return []
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith('GPU '))]
