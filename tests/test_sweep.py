"""The sweep runner (vesper_jax/sweep.py, experiments/sweep.py): a grid of real tiny training runs, one
process each; a killed sweep resumes with only the missing points; a failing point is recorded."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, load_config, short_run_config
from vesper_jax import sources, sweep

TINY = str(REPO / 'configs' / 'tiny.py')


@pytest.fixture(scope='module')
def settings(tmp_path_factory) -> dict[str, str]:
  """The tests' seconds-long run (conftest.short_run_config), as train command-line overrides."""
  cache = tmp_path_factory.mktemp('cache')
  return sweep.config_overrides(short_run_config(cache, **{'train.num_steps': 3}), load_config('tiny'))


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
  # The points are separate processes: one CPU device each, not conftest's 8 simulated ones.
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')


def _done(workdir) -> dict[str, float]:
  """point name -> mtime of its result.json, for the finished points."""
  done = {}
  for path in (workdir / 'points').glob(f'*/{sweep.RESULT_FILE}'):
    try:
      if json.loads(path.read_text())['status'] == 'done':
        done[path.parent.name] = path.stat().st_mtime
    except (OSError, ValueError):
      pass  # being written
  return done


def test_killed_sweep_resumes_only_missing_points(tmp_path, settings):
  """A 2 × 2 grid × 2 seeds: kill the CLI (and its running point) after two points, re-run, all 8 finish
  and the two finished before the kill are not run again."""
  workdir = tmp_path / 'sweep'
  grid = ['--grid=opt.learning_rate=1e-3,3e-3', '--grid=opt.name=adamw,velvet']
  cmd = [sys.executable, str(REPO / 'experiments' / 'sweep.py'), f'--config={TINY}', *grid, '--seeds=2',
         f'--workdir={workdir}'] + [f'--set={k}={v}' for k, v in settings.items()]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
  try:
    deadline = time.monotonic() + 300
    while len(_done(workdir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the point it is running, mid-way
    proc.wait()
  before = _done(workdir)
  assert 2 <= len(before) < 8, proc.stderr.read().decode()[-2000:]

  results = sweep.run_sweep(TINY, sweep.parse_grid(a.split('=', 1)[1] for a in grid), 2, workdir,
                            overrides=settings)
  assert len(results) == 8 and all(r['status'] == 'done' for r in results), results
  assert {r['point'] for r in results if not r['ran']} == set(before)
  assert sum(r['ran'] for r in results) == 8 - len(before)
  assert {k: v for k, v in _done(workdir).items() if k in before} == before  # not rewritten
  assert all(math.isfinite(r['eval_loss']) and r['step'] == 3 for r in results)
  assert len(sweep.load_results(workdir)) == 8

  cells = sweep.summarize(results, group_by=['opt.name'])
  assert [c['n'] for c in cells] == [2, 2, 2, 2]
  assert sum(c['best'] for c in cells) == 2  # one learning rate per optimizer
  assert {c['params']['opt.name'] for c in cells if c['best']} == {'adamw', 'velvet'}
  assert sweep.run_sweep(TINY, sweep.parse_grid(a.split('=', 1)[1] for a in grid), 2, workdir,
                         overrides=settings)[0]['ran'] is False  # a third run has nothing to do


def test_failing_point_is_recorded_and_others_run(tmp_path, settings):
  workdir = tmp_path / 'sweep'
  # The good point is the first point of the test above: its compilation is in the shared cache.
  results = sweep.run_sweep(TINY, {'model.norm': ['bogus', 'layernorm']}, 1, workdir,
                            overrides={**settings, 'opt.learning_rate': '1e-3'})
  bad, good = results
  assert bad['status'] == 'failed' and 'model.norm' in bad['reason'], bad
  assert good['status'] == 'done' and math.isfinite(good['eval_loss'])
  cells = sweep.summarize(sweep.load_results(workdir))
  table = sweep.markdown_table(cells)
  assert 'Failures:' in table and "model.norm='bogus'" in table
  assert sweep.plot(cells, workdir / 'sweep.png') is not None and (workdir / 'sweep.png').stat().st_size


def test_grid_parsing_and_errors():
  grid = sweep.parse_grid(['opt.learning_rate=1e-3,3e-3', 'opt.name=adamw,velvet'])
  points = sweep.expand(grid, seeds=3)
  assert len(points) == 12 and points[0].seed == 0 and points[1].seed == 1
  assert points[0].name == 'opt.learning_rate=1e-3_opt.name=adamw_seed=0'
  assert len({p.name for p in points}) == 12
  with pytest.raises(ValueError, match='key=value1'):
    sweep.parse_grid(['opt.name'])
  with pytest.raises(ValueError, match='--seeds'):
    sweep.parse_grid(['train.seed=1,2'])
  assert sweep.parse_overrides(['data.sources=a.txt,b.txt']) == {'data.sources': 'a.txt,b.txt'}


def test_welch_t_test_matches_scipy():
  from scipy import stats
  a, b = [3.1, 3.3, 3.2, 3.25], [3.0, 2.9, 3.05]
  ours = sweep.welch_t_test(a, b)
  ref = stats.ttest_ind(b, a, equal_var=False)
  assert ours['t'] == pytest.approx(ref.statistic) and ours['p'] == pytest.approx(ref.pvalue)


FAKE_TRAIN = '''
import json, os, pathlib, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
workdir = pathlib.Path(args['workdir'])
steps = int(args.get('config.train.num_steps', 4))
(workdir / 'config.json').write_text(json.dumps({'train': {'num_steps': steps}}))
time.sleep(0.5)  # long enough for two points to overlap
lr = float(args['config.opt.learning_rate'])
with open(workdir / 'metrics.jsonl', 'w') as f:
  f.write(json.dumps({'step': steps, 'loss': lr, 'tokens_per_s': 1.0}) + '\\n')
  f.write(json.dumps({'step': steps, 'eval_loss': lr + int(args['config.train.seed'])}) + '\\n')
print('CUDA_VISIBLE_DEVICES=' + os.environ.get('CUDA_VISIBLE_DEVICES', ''), time.time())
'''


def test_parallel_points_get_one_device_each(tmp_path):
  """--parallel with devices: points run side by side, each seeing one device (a stand-in trainer)."""
  program = tmp_path / 'fake_train.py'
  program.write_text(FAKE_TRAIN)
  results = sweep.run_sweep(TINY, {'opt.learning_rate': ['1', '2']}, 2, tmp_path / 'sweep', parallel=2,
                            devices=['0', '1'], program=(str(program),))
  assert [r['eval_loss'] for r in results] == [1.0, 2.0, 2.0, 3.0]
  logs = [(tmp_path / 'sweep' / 'points' / r['point'] / 'train.log').read_text().split() for r in results]
  assert sorted(line[0] for line in logs) == ['CUDA_VISIBLE_DEVICES=0'] * 2 + ['CUDA_VISIBLE_DEVICES=1'] * 2
  assert logs[0][0] != logs[1][0]  # the first two points ran at once, on different devices
  cells = sweep.summarize(results)
  assert [round(c['mean'], 6) for c in cells] == [1.5, 2.5] and [c['best'] for c in cells] == [True, False]


def test_experiment_output_checks_inputs_before_creating_anything(tmp_path):
  out = tmp_path / 'results' / 'exp'
  data = tmp_path / 'corpus.txt'
  with pytest.raises(FileNotFoundError, match='corpus.txt does not exist'):
    sweep.experiment_output(out, data)
  assert not out.exists()
  data.write_text('text')
  assert sweep.experiment_output(out, data) == out and out.is_dir()


def test_experiment_output_fetches_downloads_once_into_the_runs_cache(tmp_path, monkeypatch):
  fetched = []
  monkeypatch.setattr(sources, 'download', lambda name, cache_dir, **_: fetched.append((name, cache_dir)))
  out = tmp_path / 'exp'
  with pytest.raises(FileNotFoundError, match='missing.txt does not exist .*--data.*download:NAME'):
    sweep.experiment_output(out, 'download:piaf', f'download:tinystories,{tmp_path / "missing.txt"}')
  assert not out.exists() and fetched == []  # nothing fetched before every local file is known to exist
  assert sweep.experiment_output(out, 'download:tinystories', 'builtin:pydoc,download:piaf') == out
  assert fetched == [('tinystories', out / 'cache'), ('piaf', out / 'cache')]  # the runs' data.cache_dir
