"""A scaling law fitted to our own runs: L(N, D) = E + A/N^α + B/D^β (Chinchilla's approach 3).

    python experiments/scaling_law.py --quick     # 4 tiny sizes × 3 budgets on this CPU, minutes
    python experiments/scaling_law.py             # full settings below (a GPU)

1. Learning rate per size: a sweep (vesper_jax.sweep) over `--lrs` at the smallest token budget, seed 0;
   each size keeps its best learning rate for the grid.
2. The grid: every size × every budget (train.num_steps; the cosine schedule ends at the budget, as in
   Chinchilla), `--seeds` seeds, final validation loss on held-out TinyStories text. N = non-embedding
   parameters (the embedding and head of these tiny models would otherwise dominate N), D = tokens seen.
3. The fit (vesper_jax.scaling_fit: Huber on log L, L-BFGS from the paper's grid) with bootstrap intervals
   over runs, and a prediction of a held-out larger model's loss, written to results.json *before* that
   run trains; then the run, and the prediction's error.
4. The compute-optimal tokens per parameter of the fit at the held-out run's compute, against the
   20 tokens per parameter that vesper_jax.scale assumes.

Full settings (not run here): sizes d_model 128/192/256/384 with 2/4/4/6 layers, budgets 1000/2000/4000
steps of 16×128 tokens, 3 seeds, the held-out model d_model 512 × 8 layers at 4000 steps.
Writes results.json, results.md and fit.png to --out; the runs live in <out>/sweeps/ (re-running skips
finished ones).
"""

import json
import pathlib
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import config as base_config  # noqa: E402
from vesper_jax import scaling, scaling_fit, sweep  # noqa: E402

_QUICK = flags.DEFINE_bool('quick', False, 'Tiny sizes and budgets: minutes on a CPU.')
_DATA = flags.DEFINE_string('data', 'download:tinystories',
                            'Training text, a data.sources value (its validation split is the held-out text).')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds per (size, budget) (default: 1 with --quick, else 3).')
_LRS = flags.DEFINE_list('lrs', ['3e-3', '1e-2'], 'Peak learning rates tried per size.')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 100, 'Bootstrap resamples for the intervals.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: experiments/results/scaling_law[_quick]).')

# (name, num_layers, num_heads, d_model, d_ff)
SIZES_QUICK = [('d32', 1, 2, 32, 96), ('d64', 2, 2, 64, 192), ('d96', 2, 3, 96, 288), ('d128', 3, 4, 128, 384)]
HELD_OUT_QUICK = ('d192', 3, 6, 192, 576)
STEPS_QUICK = [60, 120, 240]
SIZES_FULL = [('d128', 2, 4, 128, 384), ('d192', 4, 6, 192, 576), ('d256', 4, 8, 256, 768),
              ('d384', 6, 6, 384, 1024)]
HELD_OUT_FULL = ('d512', 8, 8, 512, 1536)
STEPS_FULL = [1000, 2000, 4000]


def _common(quick: bool, out: pathlib.Path) -> dict[str, str]:
  """Train overrides shared by every run: data, budget-independent cadences, evaluation."""
  reference = base_config.load_config_file('tiny')
  config = base_config.short_run(base_config.load_config_file('tiny'), 1000, evaluations=0)
  config.data.sources = _DATA.value
  config.data.cache_dir = str(out / 'cache')
  config.model.vocab_size = 1024 if quick else 4096
  config.data.seq_len = 64 if quick else 128
  config.train.batch_size = 8 if quick else 16
  config.train.eval_tokens = 16384 if quick else 262144
  config.train.eval_every = 100000  # only at the start and the end (whatever the budget)
  config.checkpoint.every_steps = 100000  # only at the end
  config.opt.warmup_steps = 10 if quick else 100
  config.logging.every_steps = 10
  return sweep.config_overrides(config, reference)


def _size(name: str, layers: int, heads: int, d_model: int, d_ff: int) -> dict[str, str]:
  return {'model.num_layers': str(layers), 'model.num_heads': str(heads), 'model.d_model': str(d_model),
          'model.d_ff': str(d_ff)}


def _non_embedding_params(common: dict[str, str], size: tuple) -> int:
  from vesper_jax.model import ModelConfig, abstract_param_counts  # pylint: disable=g-import-not-at-top
  config = base_config.load_config_file('tiny')
  config.model.vocab_size = int(common['model.vocab_size'])
  _, layers, heads, d_model, d_ff = size
  config.model.update(num_layers=layers, num_heads=heads, d_model=d_model, d_ff=d_ff)
  return abstract_param_counts(ModelConfig(**config.model))['non_embedding']


def _plot(rows: list[dict], law, held: dict, out: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  d_grid = np.geomspace(min(r['D'] for r in rows) / 1.5, max(r['D'] for r in rows) * 1.5, 50)
  for i, n in enumerate(sorted({r['N'] for r in rows} | {held['N']})):
    mine = [r for r in rows if r['N'] == n]
    ax.plot(d_grid, law.predict(n, d_grid), color=f'C{i}', lw=1,
            ls='--' if n == held['N'] else '-', label=f'N = {n:,}' + (' (held out)' if n == held['N'] else ''))
    if mine:
      ax.scatter([r['D'] for r in mine], [r['loss'] for r in mine], color=f'C{i}', s=18)
  ax.scatter([held['D']], [held['loss']], marker='*', s=150, color='k', zorder=5,
             label=f"held-out run (predicted {held['predicted']:.3f}, got {held['loss']:.3f})")
  ax.set_xscale('log')
  ax.set_xlabel('training tokens D')
  ax.set_ylabel('validation loss (nats)')
  ax.set_title(f'L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'fit.png', dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  quick = _QUICK.value
  out = sweep.experiment_output(
      _OUT.value or REPO / 'experiments' / 'results' / f"scaling_law{'_quick' if quick else ''}", _DATA.value)
  sizes, held_out = (SIZES_QUICK, HELD_OUT_QUICK) if quick else (SIZES_FULL, HELD_OUT_FULL)
  steps = STEPS_QUICK if quick else STEPS_FULL
  seeds = _SEEDS.value or (1 if quick else 3)
  common = _common(quick, out)
  tokens_per_step = int(common['train.batch_size']) * int(common['data.seq_len'])
  config_file = REPO / 'configs' / 'tiny.py'
  started = time.perf_counter()

  def report(r):
    what = f"{r['eval_loss']:.4f}" if r['status'] == 'done' else f"FAILED {r['reason']}"
    print(f"  {r['point']}: {what} ({r['seconds']:.0f} s)", flush=True)

  # 1. The learning rate of each size, at the smallest budget.
  best_lr = {}
  for size in sizes:
    results = sweep.run_sweep(config_file, {'opt.learning_rate': _LRS.value}, 1, out / 'sweeps' / f'lr_{size[0]}',
                              overrides={**common, **_size(*size), 'train.num_steps': str(steps[0])},
                              on_point=report)
    best = [c for c in sweep.summarize(results) if c['best']][0]
    best_lr[size[0]] = best['params']['opt.learning_rate']
    print(f"{size[0]}: best lr {best_lr[size[0]]}", flush=True)
  # The held-out model takes the learning rate of the largest fitted size (it is not tuned: not run yet).
  best_lr[held_out[0]] = best_lr[sizes[-1][0]]

  # 2. Sizes × budgets.
  rows = []
  for size in sizes:
    results = sweep.run_sweep(config_file, {'train.num_steps': [str(s) for s in steps]}, seeds,
                              out / 'sweeps' / f'grid_{size[0]}', on_point=report,
                              overrides={**common, **_size(*size), 'opt.learning_rate': best_lr[size[0]]})
    n = _non_embedding_params(common, size)
    for cell in sweep.summarize(results):
      if cell['n']:
        rows.append({'size': size[0], 'N': n, 'steps': int(cell['params']['train.num_steps']),
                     'D': int(cell['params']['train.num_steps']) * tokens_per_step, 'loss': cell['mean'],
                     'std': cell['std'], 'seeds': cell['n'], 'lr': float(best_lr[size[0]])})

  # 3. Fit, intervals, and the prediction for the held-out run, recorded before it runs.
  fit_rows = [(r['N'], r['D'], v) for r in rows for v in [r['loss']]]
  law = scaling_fit.fit(*zip(*fit_rows))
  intervals = scaling_fit.bootstrap(*zip(*fit_rows), samples=_BOOTSTRAP.value)
  held = {'size': held_out[0], 'N': _non_embedding_params(common, held_out), 'steps': steps[-1],
          'D': steps[-1] * tokens_per_step, 'lr': float(best_lr[held_out[0]])}
  held['predicted'] = float(law.predict(held['N'], held['D']))
  (out / 'prediction.json').write_text(json.dumps({'law': law.__dict__, 'held_out': held}, indent=1))
  print(f"fit: {law}\nprediction for {held['size']} (N={held['N']:,}, D={held['D']:,}): "
        f"{held['predicted']:.4f}", flush=True)
  results = sweep.run_sweep(config_file, {'train.num_steps': [str(steps[-1])]}, seeds,
                            out / 'sweeps' / f'held_out_{held_out[0]}', on_point=report,
                            overrides={**common, **_size(*held_out), 'opt.learning_rate': str(held['lr'])})
  cell = sweep.summarize(results)[0]
  held.update(loss=cell['mean'], std=cell['std'], seeds=cell['n'], error=cell['mean'] - held['predicted'])

  ci = lambda k: f'[{intervals[k][0]:.3g}, {intervals[k][1]:.3g}]'  # noqa: E731
  # 4. The compute-optimal split at the held-out run's compute, fitted vs Chinchilla's rule.
  flops = scaling.training_flops(held['N'], held['D'])
  n_chin, d_chin = scaling.optimal_from_flops(flops)
  optimum = {'flops': flops, 'chinchilla_N': n_chin, 'chinchilla_D': d_chin,
             'chinchilla_tokens_per_param': scaling.TOKENS_PER_PARAM}
  try:
    n_opt, d_opt = scaling_fit.compute_optimal(law, flops)
    optimum.update(fit_N=n_opt, fit_D=d_opt, fit_tokens_per_param=d_opt / n_opt)
    fitted = (f'the fit says N = {n_opt:,.0f}, D = {d_opt:,.0f} ({d_opt / n_opt:.1f} tokens per parameter; '
              f"exponent of N_opt in C: {law.beta / (law.alpha + law.beta):.2f}, 95% {ci('n_exponent')})")
  except ValueError as e:  # α = 0: more parameters never lowered the loss at these budgets
    optimum['fit_error'] = str(e)
    fitted = f'the fit has no optimum ({e}): at these budgets a larger model never lowered the loss'

  lines = [f"# Scaling law {'(--quick)' if quick else ''}", '',
           f'{len(sizes)} sizes × {len(steps)} budgets ({", ".join(map(str, steps))} steps of '
           f'{tokens_per_step} tokens), {seeds} seed(s) each, on `{pathlib.Path(_DATA.value).name}`; learning '
           f'rate per size from {_LRS.value} at {steps[0]} steps; validation loss on '
           f"{common['train.eval_tokens']} held-out tokens. N = non-embedding parameters.", '',
           '| size | N | lr | ' + ' | '.join(f'D = {s * tokens_per_step:,}' for s in steps) + ' |',
           '|---|---:|---:|' + '---:|' * len(steps)]
  for size in sizes:
    mine = {r['steps']: r for r in rows if r['size'] == size[0]}
    lines.append(f"| {size[0]} | {_non_embedding_params(common, size):,} | {best_lr[size[0]]} | " +
                 ' | '.join(f"{mine[s]['loss']:.4f}" if s in mine else '—' for s in steps) + ' |')
  lines += ['', f'Fit (Huber δ = 1e-3 on log L, {_BOOTSTRAP.value} bootstrap resamples, 95% intervals):', '',
            '| constant | value | 95% interval |', '|---|---:|---:|']
  for key, value in (('E', law.E), ('A', law.A), ('B', law.B), ('alpha', law.alpha), ('beta', law.beta)):
    lines.append(f'| {key} | {value:.4g} | {ci(key)} |')
  lines += ['', f"Held-out run {held['size']} (N = {held['N']:,}, D = {held['D']:,}): predicted "
            f"{held['predicted']:.4f} before training, measured {held['loss']:.4f} ± {held['std']:.4f} "
            f"({held['seeds']} seed(s)): error {held['error']:+.4f} nats.",
            '', f'Compute-optimal split at C = 6ND = {flops:.3g} FLOPs: {fitted}; vesper_jax.scale (Chinchilla) '
            f'says N = {n_chin:,.0f}, D = {d_chin:,.0f} (20 tokens per parameter, exponent 0.50). Tiny models, '
            'a 2 MB corpus and one learning-rate choice per size: read the fit as a demonstration of the '
            'method, not as a law of these models.', '', f'Total wall time {time.perf_counter() - started:.0f} s.']
  table = '\n'.join(lines)
  (out / 'results.md').write_text(table + '\n')
  _plot(rows, law, held, out)
  (out / 'results.json').write_text(json.dumps(
      {'quick': quick, 'data': _DATA.value, 'seeds': seeds, 'steps': steps, 'tokens_per_step': tokens_per_step,
       'best_lr': best_lr, 'runs': rows, 'fit': law.__dict__, 'intervals': intervals, 'held_out': held,
       'compute_optimal': optimum, 'plots': ['fit.png']}, indent=1))
  print('\n' + table + f'\n\nwrote {out}/results.json, results.md, fit.png', flush=True)


if __name__ == '__main__':
  app.run(main)
