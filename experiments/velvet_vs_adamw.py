"""Velvet vs AdamW: same model, data and step budget; a learning-rate sweep per optimizer; several seeds.

    python experiments/velvet_vs_adamw.py --quick                      # this CPU, ~10 minutes
    python experiments/velvet_vs_adamw.py                              # GPU: configs/small.py, 2000 steps
    python experiments/velvet_vs_adamw.py --protocol=original [--quick]

`--protocol=sweep` (default): for each optimizer and each learning rate in its sweep, one run per seed
(the seed sets both the initialisation and the batch order). The learning rate with the lowest mean final
validation loss is each optimizer's best; the two bests are compared as mean ± std over seeds.

`--protocol=original`: the original project's benchmark, kept for the record. Its "Velvet" was AdamW with
the learning rate ×1.5 and β1 = 0.95, so this runs AdamW(lr) against AdamW(1.5·lr, β1 = 0.95); real
Velvet does not appear in it.

Each optimizer's runs are one sweep (`vesper_jax.sweep`: a `python -m vesper_jax.train` process per
run, in <out>/sweeps/<optimizer>/; re-running skips finished runs), the per-step losses read back from each
run's `metrics.jsonl`; the two bests are compared by Welch's t-test over seeds. Writes results.json, results.md (the tables) and PNG curves to --out.
"""

import json
import pathlib
import statistics
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import config as base_config  # noqa: E402
from vesper_jax import sweep  # noqa: E402

_PROTOCOL = flags.DEFINE_enum('protocol', 'sweep', ['sweep', 'original'], 'Which comparison to run.')
_QUICK = flags.DEFINE_bool('quick', False, 'The tiny model, short runs, small batches: minutes on a CPU.')
_CONFIG = flags.DEFINE_string('config', None, 'configs/<name>.py (default: tiny with --quick, else small).')
_DATA = flags.DEFINE_string('data', 'download:tinystories', 'Training text (data.sources).')
_STEPS = flags.DEFINE_integer('num_steps', None, 'Steps per run (default: 200 with --quick, else 2000).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per (optimizer, learning rate): 0 .. seeds-1.')
_LRS_ADAMW = flags.DEFINE_list('lrs_adamw', None, 'AdamW sweep (default: 1e-3,3e-3,1e-2 with --quick; '
                                '3e-4,1e-3,3e-3 full).')
_LRS_VELVET = flags.DEFINE_list('lrs_velvet', None, 'Velvet sweep (default: 3e-4,1e-3,3e-3 with --quick, '
                                 'else as AdamW). Lower than AdamW\'s: s_E reaches 2 while the entropy is high.')
_LR_ORIGINAL = flags.DEFINE_float('lr_original', None, 'AdamW lr of --protocol=original (default: the '
                                  "config's opt.learning_rate).")
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: experiments/results/velvet_vs_adamw'
                           '[_original][_quick]).')


def _run_config(base_name: str, quick: bool, steps: int, cache_dir: pathlib.Path):
  """The settings every run shares: the base config with the data and the budget (the optimizer, its
  learning rate and the seed are the sweep's)."""
  config = base_config.short_run(base_config.load_config_file(base_name), steps, evaluations=6)
  config.data.sources = _DATA.value
  config.data.cache_dir = str(cache_dir)  # one token cache (and compilation cache) for every run
  if quick:
    config.data.seq_len = 64
    config.train.batch_size = 8
    config.train.eval_tokens = 4 * 8 * 64  # the first 32 windows of the validation split
  return config


def _read_metrics(workdir: pathlib.Path) -> dict[str, list]:
  """Train-loss and eval-loss curves (and Velvet's scalings when the train loop logged them)."""
  curves: dict[str, list] = {'train': [], 'eval': [], 'scalings': []}
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'eval_loss' in row:
        curves['eval'].append((row['step'], row['eval_loss']))
      if 'loss' in row:
        curves['train'].append((row['step'], row['loss']))
      scal = {k: v for k, v in row.items() if k.split('/')[-1] in ('s_entropy', 's_perplexity', 'beta1')}
      if scal:
        curves['scalings'].append({'step': row['step'], **scal})
  return curves


def _mean_std(xs: list[float]) -> tuple[float, float]:
  return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _arms(protocol: str, quick: bool, config_lr: float) -> list[dict]:
  """The (label, optimizer, lr, b1) arms of the protocol."""
  if protocol == 'original':
    lr = _LR_ORIGINAL.value or config_lr
    return [{'arm': 'adamw', 'name': 'adamw', 'lr': lr, 'b1': None},
            {'arm': 'original-velvet (adamw, lr×1.5, β1 0.95)', 'name': 'adamw', 'lr': 1.5 * lr, 'b1': 0.95}]
  default = ['1e-3', '3e-3', '1e-2'] if quick else ['3e-4', '1e-3', '3e-3']
  lrs_adamw = [float(x) for x in (_LRS_ADAMW.value or default)]
  default_velvet = ['3e-4', '1e-3', '3e-3'] if quick else default
  lrs_velvet = [float(x) for x in (_LRS_VELVET.value or _LRS_ADAMW.value or default_velvet)]
  return ([{'arm': 'adamw', 'name': 'adamw', 'lr': lr, 'b1': None} for lr in lrs_adamw] +
          [{'arm': 'velvet', 'name': 'velvet', 'lr': lr, 'b1': None} for lr in lrs_velvet])


def _plot(results: list[dict], best: dict[str, dict], out: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  written = []
  for kind, title in (('eval', 'validation loss'), ('train', 'training loss')):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, cell in best.items():
      runs = [r for r in results if r['arm'] == cell['arm'] and r['lr'] == cell['lr']]
      steps = [s for s, _ in runs[0]['curves'][kind]]
      ys = np.array([[y for _, y in r['curves'][kind]] for r in runs])
      mean, std = ys.mean(0), ys.std(0)
      ax.plot(steps, mean, label=f"{label} (lr {cell['lr']:g}, {len(runs)} seeds)")
      ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel('step')
    ax.set_ylabel(f'{title} (nats)')
    ax.set_title(f'{title}: best learning rate per optimizer, mean ± std over seeds')
    ax.legend()
    fig.tight_layout()
    path = out / f'{kind}_loss.png'
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path.name)
  # The sweep itself: final validation loss against the learning rate, per optimizer.
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm in dict.fromkeys(r['arm'] for r in results):
    lrs = sorted({r['lr'] for r in results if r['arm'] == arm})
    stats = [_mean_std([r['final_eval_loss'] for r in results if r['arm'] == arm and r['lr'] == lr])
             for lr in lrs]
    ax.errorbar(lrs, [m for m, _ in stats], yerr=[s for _, s in stats], marker='o', capsize=3, label=arm)
  ax.set_xscale('log')
  ax.set_xlabel('peak learning rate')
  ax.set_ylabel('final validation loss (nats)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / 'lr_sweep.png', dpi=120)
  plt.close(fig)
  written.append('lr_sweep.png')
  scal_runs = [r for r in results if r['curves']['scalings']]
  if scal_runs:
    r = scal_runs[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in r['curves']['scalings'][0]:
      if key != 'step':
        ax.plot([s['step'] for s in r['curves']['scalings']], [s[key] for s in r['curves']['scalings']],
                label=key)
    ax.set_xlabel('step')
    ax.set_title(f"Velvet's scalings (lr {r['lr']:g}, seed {r['seed']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'velvet_scalings.png', dpi=120)
    plt.close(fig)
    written.append('velvet_scalings.png')
  return written


def main(argv):
  del argv
  quick, protocol = _QUICK.value, _PROTOCOL.value
  base_name = _CONFIG.value or ('tiny' if quick else 'small')
  steps = _STEPS.value or (200 if quick else 2000)
  suffix = ('_original' if protocol == 'original' else '') + ('_quick' if quick else '')
  out = sweep.experiment_output(_OUT.value or REPO / 'experiments' / 'results' / f'velvet_vs_adamw{suffix}',
                                _DATA.value)
  cache_dir = out / 'cache'
  arms = _arms(protocol, quick, base_config.load_config_file(base_name).opt.learning_rate)

  config0 = _run_config(base_name, quick, steps, cache_dir)
  common = sweep.config_overrides(config0, base_config.load_config_file(base_name))
  results = []
  started = time.perf_counter()
  # One sweep per arm (vesper_jax.sweep: a process per run; a re-run skips the finished ones).
  for label in dict.fromkeys(arm['arm'] for arm in arms):
    mine = [arm for arm in arms if arm['arm'] == label]
    overrides = {**common, 'opt.name': mine[0]['name']}
    if mine[0]['b1'] is not None:
      overrides['opt.b1'] = str(mine[0]['b1'])
    sweep_dir = out / 'sweeps' / label.split(' ')[0]

    def report(r, label=label):
      what = f"eval loss {r['eval_loss']:.4f}" if r['status'] == 'done' else f"FAILED: {r['reason']}"
      print(f"{label:45s} {r['point']}: {what} ({r['seconds']:.0f} s)", flush=True)

    points = sweep.run_sweep(REPO / 'configs' / f'{base_name}.py',
                             {'opt.learning_rate': [f"{arm['lr']:g}" for arm in mine]}, _SEEDS.value,
                             sweep_dir, overrides=overrides, on_point=report)
    for arm in mine:
      for r in points:
        if r['params']['opt.learning_rate'] == f"{arm['lr']:g}" and r['status'] == 'done':
          results.append({**arm, 'seed': r['seed'], 'final_eval_loss': r['eval_loss'],
                          'final_train_loss': r['train_loss'], 'tokens_per_s': r['tokens_per_s'],
                          'seconds': r['seconds'],
                          'curves': _read_metrics(sweep_dir / 'points' / r['point'])})
      if not any(r['arm'] == arm['arm'] and r['lr'] == arm['lr'] for r in results):
        raise RuntimeError(f"every run of {arm['arm']} at lr {arm['lr']:g} failed (see {sweep_dir}/points)")

  # Per (arm, lr): mean ± std of the final validation loss over seeds; each arm's best lr.
  cells = []
  for arm in arms:
    losses = [r['final_eval_loss'] for r in results if r['arm'] == arm['arm'] and r['lr'] == arm['lr']]
    mean, std = _mean_std(losses)
    cells.append({'arm': arm['arm'], 'lr': arm['lr'], 'b1': arm['b1'], 'mean': mean, 'std': std,
                  'n': len(losses)})
  best = {}
  for cell in cells:
    if cell['arm'] not in best or cell['mean'] < best[cell['arm']]['mean']:
      best[cell['arm']] = cell
  base, other = list(best.values())[0], list(best.values())[-1]
  diff = other['mean'] - base['mean']
  # Welch's t-test on the two best cells, over seeds.
  seed_losses = lambda c: [r['final_eval_loss'] for r in results  # noqa: E731
                           if r['arm'] == c['arm'] and r['lr'] == c['lr']]
  welch = sweep.welch_t_test(seed_losses(base), seed_losses(other))
  t_stat = welch['t']
  setup = (f"config `{base_name}`{' (--quick: seq_len 64, batch 8)' if quick else ''}, data "
           f'`{pathlib.Path(_DATA.value).name}`, {steps} steps of {config0.train.batch_size}×'
           f'{config0.data.seq_len} tokens, warmup {config0.opt.warmup_steps} then cosine, clip '
           f'{config0.opt.grad_clip_norm}, weight decay {config0.opt.weight_decay}, b1 {config0.opt.b1}, '
           f'b2 {config0.opt.b2}; {_SEEDS.value} seeds (init and batch order); final validation loss over '
           f'{config0.train.eval_tokens or "all"} tokens')
  lines = [f'# Velvet vs AdamW — protocol `{protocol}`', '', setup, '',
           '| optimizer | peak lr | final val loss (mean ± std) | seeds |', '|---|---:|---:|---:|']
  for c in cells:
    mark = ' **(best)**' if best[c['arm']] is c else ''
    lines.append(f"| {c['arm']} | {c['lr']:g}{mark} | {c['mean']:.4f} ± {c['std']:.4f} | {c['n']} |")
  for arm, cell in best.items():
    lrs = sorted(c['lr'] for c in cells if c['arm'] == arm)
    if len(lrs) > 1 and cell['lr'] in (lrs[0], lrs[-1]):
      lines.append(f"\n{arm}: the best learning rate is at the edge of its sweep; widen the sweep before "
                   'reading the comparison.')
  lines += ['', f"Best {other['arm']} − best {base['arm']}: {diff:+.4f} nats "
            f"({100 * diff / base['mean']:+.2f}%), Welch t = {t_stat:.2f}, p = {welch['p']:.3f} over "
            f"{base['n']}+{other['n']} seeds ({'not significant at 5%' if not welch['p'] < 0.05 else 'significant at 5%'}).",
            f'Total wall time {time.perf_counter() - started:.0f} s.']
  table = '\n'.join(lines)
  (out / 'results.md').write_text(table + '\n')
  pngs = _plot(results, best, out)
  (out / 'results.json').write_text(json.dumps(
      {'protocol': protocol, 'quick': quick, 'config': base_name, 'data': _DATA.value, 'num_steps': steps,
       'seeds': _SEEDS.value, 'cells': cells, 'best': best, 'difference': diff, 'welch': welch,
       'runs': results, 'plots': pngs}, indent=1))
  print(f'\nwrote {out}/results.json, results.md, {", ".join(pngs)}\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
