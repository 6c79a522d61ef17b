"""How well does the metacognition head know when the model is right? Against the obvious baselines.

    python experiments/metacog_calibration.py --quick        # tiny model on this CPU, a few minutes
    python experiments/metacog_calibration.py                # GPU: configs/small.py, 2000 steps

For each seed, trains the model with the head (`model.metacog=True`, λ_meta = train.metacog_weight), then
scores held-out text (the validation split of the corpus, never trained on) with `evaluate.evaluate`:
for the head, expected calibration error (15 bins), AUROC of its confidence for top-1 correctness, and
Pearson / Spearman correlation of its predicted loss with the real per-token loss; for the baselines,
the model's own max softmax probability as a confidence (ECE, AUROC) and the predictive entropy as a
loss predictor (Pearson, Spearman). Writes results.json, results.md (the table, mean ± std over seeds)
and reliability.png (head vs max probability, tokens pooled over seeds) to --out.
"""

import json
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np
from absl import app, flags, logging

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import config as base_config  # noqa: E402

_QUICK = flags.DEFINE_bool('quick', False, 'The tiny model, short runs: minutes on a CPU.')
_CONFIG = flags.DEFINE_string('config', None, 'configs/<name>.py (default: tiny with --quick, else small).')
_DATA = flags.DEFINE_string('data', 'download:tinystories',
                            'Training text (data.sources); its validation split is the held-out text.')
_STEPS = flags.DEFINE_integer('num_steps', None, 'Steps per run (default: 300 with --quick, else 2000).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. seeds-1 (initialisation and batch order).')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', None, 'Held-out targets scored per seed (default: '
                                    '32,768 with --quick, else 1,000,000).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: experiments/results/metacog_calibration'
                           '[_quick]).')

# (row label, path in evaluate's result, measure) in the table's order.
MEASURES = [
    ('metacog head', ('metacog', 'ece'), 'ECE'),
    ('max softmax probability', ('baselines', 'max_prob', 'ece'), 'ECE'),
    ('metacog head', ('metacog', 'auroc'), 'AUROC'),
    ('max softmax probability', ('baselines', 'max_prob', 'auroc'), 'AUROC'),
    ('metacog head (predicted loss)', ('metacog', 'pearson'), 'Pearson with loss'),
    ('predictive entropy', ('baselines', 'entropy', 'pearson'), 'Pearson with loss'),
    ('metacog head (predicted loss)', ('metacog', 'spearman'), 'Spearman with loss'),
    ('predictive entropy', ('baselines', 'entropy', 'spearman'), 'Spearman with loss'),
]


def _run_config(quick: bool, steps: int, cache_dir: pathlib.Path, seed: int):
  name = _CONFIG.value or ('tiny' if quick else 'small')
  config = base_config.short_run(base_config.load_config_file(name), steps, evaluations=0)
  config.data.sources = _DATA.value
  config.data.cache_dir = str(cache_dir)
  config.model.metacog = True
  config.train.seed = seed
  if quick:
    config.data.seq_len = 64
    config.train.batch_size = 16
    config.train.eval_tokens = 4 * 16 * 64
  return config


def _get(result: dict, path: tuple[str, ...]) -> float:
  for key in path:
    result = result[key]
  return result


def _plot(pooled: dict[str, np.ndarray], out: pathlib.Path) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from vesper_jax import metacog  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
  for ax, (label, conf) in zip(axes, (('metacog head', pooled['confidence']),
                                      ('max softmax probability', pooled['max_prob']))):
    rel = metacog.reliability(conf, pooled['correct'])
    edges = np.array(rel['edges'])
    centers = (edges[:-1] + edges[1:]) / 2
    acc = np.array(rel['accuracy'], dtype=float)
    ax.bar(centers, np.nan_to_num(acc), width=edges[1] - edges[0], edgecolor='k', alpha=0.7,
           label='accuracy per bin')
    ax.plot([0, 1], [0, 1], 'r--', label='perfect calibration')
    ece = metacog.expected_calibration_error(conf, pooled['correct'])
    ax.set_title(f'{label}: ECE {ece:.4f}')
    ax.set_xlabel('confidence')
    ax.set_ylabel('top-1 accuracy')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(centers, np.array(rel['count']) / max(sum(rel['count']), 1), 'g.-', label='share of tokens')
    ax2.set_ylabel('share of tokens', color='g')
    ax.legend(loc='upper left', fontsize=8)
  fig.suptitle(f"Reliability on held-out text ({len(pooled['correct']):,} tokens, pooled over seeds)")
  fig.tight_layout()
  path = out / 'reliability.png'
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path.name


def main(argv):
  del argv
  from vesper_jax import checkpoint, data, evaluate, train  # pylint: disable=g-import-not-at-top
  quick = _QUICK.value
  steps = _STEPS.value or (300 if quick else 2000)
  eval_tokens = _EVAL_TOKENS.value if _EVAL_TOKENS.value is not None else (32_768 if quick else 1_000_000)
  out = pathlib.Path(_OUT.value or REPO / 'experiments' / 'results' /
                     ('metacog_calibration_quick' if quick else 'metacog_calibration'))
  runs_dir = out / 'runs'
  shutil.rmtree(runs_dir, ignore_errors=True)
  runs_dir.mkdir(parents=True)
  cache_dir = out / 'cache'
  per_seed, pooled = [], {}
  start = time.time()
  for seed in range(_SEEDS.value):
    config = _run_config(quick, steps, cache_dir, seed)
    workdir = runs_dir / f'seed{seed}'
    summary = train.train_and_evaluate(config, workdir)
    model_config, params, tokenizer = checkpoint.load_for_inference(workdir)
    cache = data.build_or_load_cache(config.data, config.model.vocab_size, progress=False)
    result = evaluate.evaluate(params, model_config, cache.val, tokenizer, seq_len=config.data.seq_len,
                               batch_size=16, max_tokens=eval_tokens, return_tokens=True)
    for k, v in result.pop('per_token').items():
      pooled.setdefault(k, []).append(v)
    result.update(seed=seed, final_train_loss=summary['loss'])
    per_seed.append(result)
    logging.info('seed %d: %s', seed, json.dumps(result))
  pooled = {k: np.concatenate(v) for k, v in pooled.items()}

  def stats(path):
    values = [_get(r, path) for r in per_seed]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

  lines = [f'{len(per_seed)} seeds, {steps} steps, held-out tokens per seed: {per_seed[0]["tokens"]:,}; '
           f'config {_CONFIG.value or ("tiny" if quick else "small")}, data {pathlib.Path(_DATA.value).name}',
           '', '| measure | predictor | mean ± std over seeds |', '|---|---|---:|']
  for label, path, measure in MEASURES:
    mean, std = stats(path)
    lines.append(f'| {measure} | {label} | {mean:.4f} ± {std:.4f} |')
  acc, conf, loss = stats(('metacog', 'accuracy')), stats(('metacog', 'mean_confidence')), stats(('loss',))
  lines += ['', f'top-1 accuracy {acc[0]:.4f} ± {acc[1]:.4f}; head mean confidence {conf[0]:.4f} ± '
            f'{conf[1]:.4f}; held-out loss {loss[0]:.4f} ± {loss[1]:.4f}']
  gap = max(abs(r['metacog']['mean_confidence'] - r['metacog']['accuracy']) for r in per_seed)
  worst_ece = max(r['metacog']['ece'] for r in per_seed)
  lines += [f'per seed, at worst: |head mean confidence − accuracy| = {gap:.4f}, head ECE = {worst_ece:.4f} '
            f"(targets: ≤ 0.05 each: {'met' if gap <= 0.05 and worst_ece <= 0.05 else 'NOT met'})"]
  head_ece, base_ece = stats(('metacog', 'ece'))[0], stats(('baselines', 'max_prob', 'ece'))[0]
  head_auc, base_auc = stats(('metacog', 'auroc'))[0], stats(('baselines', 'max_prob', 'auroc'))[0]
  verdict = (f"ECE: the head {'beats' if head_ece < base_ece else 'does not beat'} max probability "
             f"({head_ece:.4f} vs {base_ece:.4f}); AUROC: the head {'beats' if head_auc > base_auc else 'does not beat'} "
             f"max probability ({head_auc:.4f} vs {base_auc:.4f}).")
  lines += ['', verdict]
  figure = _plot(pooled, out)
  (out / 'results.md').write_text('\n'.join(lines) + '\n')
  (out / 'results.json').write_text(json.dumps({
      'steps': steps, 'seeds': len(per_seed), 'eval_tokens': eval_tokens, 'per_seed': per_seed,
      'seconds': time.time() - start, 'figure': figure}, indent=2, default=str) + '\n')
  print('\n'.join(lines))
  print(f'wrote {out}/results.json, results.md, {figure} ({time.time() - start:.0f} s)')


if __name__ == '__main__':
  app.run(main)
