"""ERA vs SiLU vs GELU: the same model and budget with each FFN activation; learning rate tuned per arm.

    python experiments/era_vs_silu.py --quick     # tiny, 150 steps, 3 seeds, this CPU: ~10 minutes
    python experiments/era_vs_silu.py             # tiny and small, 2000 steps, 3 seeds (a GPU)

Arms: ERA at λ ∈ {0.05, 0.1, 0.3} (T = 1), SiLU (= ERA at λ = 0) and GELU. Each arm is one sweep
(vesper_jax.sweep, a process per run) over `--lrs` × `--seeds` seeds on TinyStories; each arm is read at
its best learning rate (lowest mean final validation loss on held-out text) and compared with SiLU's best
by Welch's t-test over seeds. The cost per step: the median training throughput of each arm's runs (a
shared CPU makes it noisy), and a microbenchmark of the activation alone, forward and backward, on a
[tokens, d_ff] array in this process.

Full settings (not run here): configs tiny and small, 2000 steps of 16×128 (tiny) / 32×256 (small)
tokens, lrs 1e-3,3e-3,1e-2 (tiny) / 3e-4,1e-3,3e-3 (small), 3 seeds.
Writes results.json, results.md and lr_sweep.png, step_cost.png to --out (the runs: <out>/sweeps/).
"""

import json
import pathlib
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import config as base_config  # noqa: E402
from vesper_jax import sweep  # noqa: E402

_QUICK = flags.DEFINE_bool('quick', False, 'The tiny model, 150 steps: minutes on a CPU.')
_CONFIGS = flags.DEFINE_list('configs', None, 'Size configs (default: tiny with --quick, else tiny,small).')
_DATA = flags.DEFINE_string('data', 'download:tinystories',
                            'Training text, a data.sources value (its validation split is the held-out text).')
_STEPS = flags.DEFINE_integer('num_steps', None, 'Steps per run (default: 150 with --quick, else 2000).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per (arm, learning rate).')
_LRS = flags.DEFINE_list('lrs', None, 'Learning rates per arm (default: 3e-3,1e-2 with --quick; else per '
                         'config, see the docstring).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: experiments/results/era_vs_silu[_quick]).')

ARMS = {'era λ=0.05': {'model.activation': 'era', 'model.era_entropy_weight': '0.05'},
        'era λ=0.1': {'model.activation': 'era', 'model.era_entropy_weight': '0.1'},
        'era λ=0.3': {'model.activation': 'era', 'model.era_entropy_weight': '0.3'},
        'silu': {'model.activation': 'silu'},
        'gelu': {'model.activation': 'gelu'}}
DEFAULT_LRS = {'tiny': ['1e-3', '3e-3', '1e-2'], 'small': ['3e-4', '1e-3', '3e-3']}


def _common(name: str, quick: bool, steps: int, out: pathlib.Path) -> dict[str, str]:
  reference = base_config.load_config_file(name)
  config = base_config.short_run(base_config.load_config_file(name), steps, evaluations=4)
  config.data.sources = _DATA.value
  config.data.cache_dir = str(out / 'cache')
  if quick:
    config.model.vocab_size = 1024
    config.data.seq_len = 64
    config.train.batch_size = 8
    config.train.eval_tokens = 16384
  elif name == 'tiny':
    config.data.seq_len, config.train.batch_size, config.train.eval_tokens = 128, 16, 262144
  return sweep.config_overrides(config, reference)


def activation_cost(activations: dict[str, dict], tokens: int = 8 * 64, d_ff: int = 384,
                    repeats: int = 50) -> dict[str, float]:
  """Median seconds of one forward + backward of each activation alone on a [tokens, d_ff] array."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vesper_jax import era  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (tokens, d_ff))
  costs = {}
  for name, arm in activations.items():
    if arm['model.activation'] == 'era':
      fn = lambda v, lam=float(arm['model.era_entropy_weight']): era.era(v, entropy_weight=lam)  # noqa: E731
    else:
      fn = jax.nn.silu if arm['model.activation'] == 'silu' else jax.nn.gelu
    step = jax.jit(jax.grad(lambda v, f=fn: f(v).sum()))
    step(x).block_until_ready()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      step(x).block_until_ready()
      times.append(time.perf_counter() - t0)
    costs[name] = float(np.median(times))
  return costs


def _plots(cells: list[dict], speed: dict, micro: dict, out: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  for config_name in dict.fromkeys(c['params']['config'] for c in cells):
    mine = [c for c in cells if c['params']['config'] == config_name]
    fig = sweep.plot([{**c, 'params': {k: v for k, v in c['params'].items() if k != 'config'}} for c in mine],
                     out / f'lr_sweep_{config_name}.png', x_key='opt.learning_rate')
    plt.close(fig)
    written.append(f'lr_sweep_{config_name}.png')
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
  a1.barh(list(micro), [1e6 * v for v in micro.values()])
  a1.set_xlabel('activation alone, fwd+bwd (µs)')
  for config_name, speeds in speed.items():
    a2.barh([f'{k} ({config_name})' for k in speeds], list(speeds.values()))
  a2.set_xlabel('training tokens/s (median of runs)')
  fig.tight_layout()
  fig.savefig(out / 'step_cost.png', dpi=120)
  plt.close(fig)
  return written + ['step_cost.png']


def main(argv):
  del argv
  quick = _QUICK.value
  out = sweep.experiment_output(
      _OUT.value or REPO / 'experiments' / 'results' / f"era_vs_silu{'_quick' if quick else ''}", _DATA.value)
  configs = _CONFIGS.value or (['tiny'] if quick else ['tiny', 'small'])
  steps = _STEPS.value or (150 if quick else 2000)
  started = time.perf_counter()

  def report(r):
    what = f"{r['eval_loss']:.4f}" if r['status'] == 'done' else f"FAILED {r['reason']}"
    print(f"  {r['point']}: {what} ({r['seconds']:.0f} s)", flush=True)

  rows = []
  for config_name in configs:
    common = _common(config_name, quick, steps, out)
    lrs = _LRS.value or (['3e-3', '1e-2'] if quick else DEFAULT_LRS[config_name])
    for arm, settings in ARMS.items():
      print(f'{config_name} / {arm}', flush=True)
      results = sweep.run_sweep(REPO / 'configs' / f'{config_name}.py', {'opt.learning_rate': lrs}, _SEEDS.value,
                                out / 'sweeps' / f"{config_name}_{arm.replace(' ', '_').replace('λ=', 'l')}",
                                overrides={**common, **settings}, on_point=report)
      rows += [{**r, 'params': {'config': config_name, 'arm': arm, **r['params']}} for r in results]

  cells = sweep.summarize(rows, group_by=['config', 'arm'])
  best = {(c['params']['config'], c['params']['arm']): c for c in cells if c['best']}
  speed = {}
  for config_name in configs:
    speed[config_name] = {}
    for arm in ARMS:
      values = [r['tokens_per_s'] for r in rows if r['status'] == 'done' and r['params']['config'] == config_name
                and r['params']['arm'] == arm]
      speed[config_name][arm] = sorted(values)[len(values) // 2] if values else float('nan')
  micro = activation_cost(ARMS)
  lines = [f"# ERA vs SiLU vs GELU{' (--quick)' if quick else ''}", '',
           f'{steps} steps on `{pathlib.Path(_DATA.value).name}`, {_SEEDS.value} seeds per (arm, learning rate); '
           'final validation loss on held-out text; each arm at its best learning rate; Welch t-test of each '
           "arm's best against SiLU's best.", '',
           '| config | arm | best lr | val loss (mean ± std) | seeds | Δ vs SiLU | Welch t | p | tokens/s | '
           'activation fwd+bwd (µs) |', '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  comparisons = {}
  for config_name in configs:
    silu = best[(config_name, 'silu')]
    for arm in ARMS:
      c = best[(config_name, arm)]
      test = sweep.welch_t_test(silu['seed_values'], c['seed_values'])
      comparisons[f'{config_name}/{arm}'] = {'delta': c['mean'] - silu['mean'], **test}
      lines.append(f"| {config_name} | {arm} | {c['params']['opt.learning_rate']} | {c['mean']:.4f} ± "
                   f"{c['std']:.4f} | {c['n']} | {c['mean'] - silu['mean']:+.4f} | {test['t']:.2f} | "
                   f"{test['p']:.3f} | {speed[config_name][arm]:,.0f} | {1e6 * micro[arm]:.0f} |")
  lines += ['', 'Every cell (learning rate × arm):', '', sweep.markdown_table(cells), '',
            'tokens/s: median over the arm\'s runs of the logged training throughput, on a CPU shared with '
            'other jobs (indicative only). Activation cost: one forward and backward of the activation alone '
            'on a [512, 384] array, median of 50, in the experiment\'s process.', '',
            f'Total wall time {time.perf_counter() - started:.0f} s.']
  table = '\n'.join(lines)
  (out / 'results.md').write_text(table + '\n')
  pngs = _plots(cells, speed, micro, out)
  (out / 'results.json').write_text(json.dumps(
      {'quick': quick, 'configs': configs, 'data': _DATA.value, 'num_steps': steps, 'seeds': _SEEDS.value,
       'arms': ARMS, 'cells': cells, 'comparisons_vs_silu': comparisons, 'tokens_per_s': speed,
       'activation_seconds': micro, 'runs': rows, 'plots': pngs}, indent=1))
  print('\n' + table + f'\n\nwrote {out}/results.json, results.md, {", ".join(pngs)}', flush=True)


if __name__ == '__main__':
  app.run(main)
