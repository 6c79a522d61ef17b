"""A resumable grid of training runs, gathered into a table and a plot (SPEC §2, §13).

    python experiments/sweep.py --config=configs/tiny.py \
        --grid=opt.learning_rate=1e-3,3e-3 --grid=opt.name=adamw,velvet --seeds=3 \
        --workdir=sweeps/NAME [--parallel=N] [--set=key=value ...] [--group_by=opt.name]

Each point (grid values × seed) is its own `python -m vesper_jax.train` process and workdir
(`<workdir>/points/<name>/`); a re-run skips finished points and resumes the others; a failed point is
recorded with its reason and the others go on. Writes `<workdir>/results.jsonl`, `results.md` (mean ±
std over seeds per cell, the best of each group in bold) and `sweep.png`.

Placement: with GPUs (CUDA_VISIBLE_DEVICES or nvidia-smi), `--parallel` defaults to one run per GPU and
each run sees one GPU; on a CPU the points run one after another unless `--parallel` says otherwise.
Random or Bayesian searches are not built in: drive `vesper_jax.sweep.run_sweep` from Optuna if needed.
The logic lives in `vesper_jax/sweep.py` (notebooks read sweeps with it); this file only parses flags.
"""

import pathlib
import signal
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import sweep  # noqa: E402

_CONFIG = flags.DEFINE_string('config', None, 'Config file of every point, e.g. configs/tiny.py.')
_GRID = flags.DEFINE_multi_string('grid', [], 'key=v1,v2,...: a grid axis (repeat for more axes).')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per cell (train.seed = 0 .. seeds-1).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep directory, e.g. sweeps/NAME.')
_PARALLEL = flags.DEFINE_integer('parallel', 0, 'Points at once (0 = one per GPU, or 1 on a CPU).')
_SET = flags.DEFINE_multi_string('set', [], 'key=value for every point (e.g. train.num_steps=200).')
_GROUP_BY = flags.DEFINE_list('group_by', None, 'Keys whose cells compete for "best" separately '
                              '(default: every grid key but the first, i.e. the first is the one tuned).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    grid = sweep.parse_grid(_GRID.value)
    overrides = sweep.parse_overrides(_SET.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  gpus = sweep.visible_gpus()
  parallel = _PARALLEL.value or max(1, len(gpus))
  # SIGTERM (a scheduler's preemption) stops the sweep like Ctrl-C: running points save and stop.
  signal.signal(signal.SIGTERM, signal.default_int_handler)
  workdir = pathlib.Path(_WORKDIR.value)
  n = len(sweep.expand(grid, _SEEDS.value))
  print(f'sweep: {n} points in {workdir}, {parallel} at a time'
        + (f' on GPUs {",".join(gpus)}' if gpus else ' (CPU)'), flush=True)

  def report(r):
    what = f"eval loss {r['eval_loss']:.4f}" if r['status'] == 'done' else f"FAILED: {r['reason']}"
    print(f"{r['point']}: {what} ({r['seconds']:.0f} s)", flush=True)

  results = sweep.run_sweep(_CONFIG.value, grid, _SEEDS.value, workdir, overrides=overrides,
                            parallel=parallel, devices=gpus or None, on_point=report)
  skipped = sum(not r['ran'] for r in results)
  if skipped:
    print(f'({skipped} finished points skipped)')
  group_by = _GROUP_BY.value if _GROUP_BY.value is not None else list(grid)[1:]
  cells = sweep.summarize(results, group_by)
  table = sweep.markdown_table(cells)
  (workdir / 'results.md').write_text(table + '\n')
  if any(c['n'] for c in cells):
    sweep.plot(cells, workdir / 'sweep.png')
  print('\n' + table)
  print(f'\nwrote {workdir}/results.jsonl, results.md, sweep.png')
  if any(r['status'] != 'done' for r in results):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
