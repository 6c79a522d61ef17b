"""Does the metacognition head know when the model is right better than the model's own softmax does?
In distribution and out of it, with the ablation of what the head reads.

    python experiments/metacog_calibration.py --quick        # tiny model on this CPU, minutes
    python experiments/metacog_calibration.py                # GPU: configs/small.py, 2000 steps
    python experiments/metacog_calibration.py --quick --data=DIR/tinystories_2MB.txt \
        --ood=DIR/tinyshakespeare.txt,DIR/piaf-v1.1.json   # offline: the same corpora from a folder DIR

For each seed and each of `--inputs` (model.metacog_inputs: 'hidden' = the final hidden states, 'stats'
= the predicted distribution's max probability, entropy and top-1/top-2 margin, 'both'), trains the model
with the head on `--data`, then scores with `evaluate.evaluate`:
  * in distribution: the validation split of `--data` (held-out documents, never trained on);
  * out of distribution: each corpus of `--ood` (text of another kind: Shakespeare's plays, French
    question answering), tokenized with the run's tokenizer, all of it scored up to --eval_tokens.
For the head: ECE (15 bins), AUROC of its confidence for top-1 correctness, AURC (area under the
risk–coverage curve, lower is better), Brier score, and Spearman / Pearson correlation of its predicted loss
ℓ̂ with the real per-token loss; for the baselines, the max softmax probability as a confidence and the
predictive entropy as a loss predictor (and, negated, as a ranking for AURC). Mean ± std over seeds, and
Welch's t-test (scipy) of each head against the max probability of the same runs.

Writes results.json, results.md (the tables), risk_coverage.png (per corpus, tokens pooled over seeds)
and reliability.png (in distribution, the default inputs against the max probability) to --out.
"""

import json
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np
import scipy.stats
from absl import app, flags, logging

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import config as base_config  # noqa: E402

_QUICK = flags.DEFINE_bool('quick', False, 'The tiny model, short runs: minutes on a CPU.')
_CONFIG = flags.DEFINE_string('config', None, 'configs/<name>.py (default: tiny with --quick, else small).')
_DATA = flags.DEFINE_string('data', 'download:tinystories',
                            'Training text (data.sources); its validation split is the in-distribution text.')
_OOD = flags.DEFINE_list('ood', ['download:tinyshakespeare', 'download:piaf'],
                         'Out-of-distribution corpora (each a data.sources spec), scored whole.')
_INPUTS = flags.DEFINE_list('inputs', ['hidden', 'stats', 'both'], 'model.metacog_inputs to compare.')
_STEPS = flags.DEFINE_integer('num_steps', None, 'Steps per run (default: 300 with --quick, else 2000).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. seeds-1 (initialisation and batch order).')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', None, 'Targets scored per corpus and run (default: '
                                    '32,768 with --quick, else 1,000,000).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: experiments/results/metacog_calibration'
                           '[_quick]).')

# (column, path under a predictor's block, format); a predictor without the measure leaves it blank.
COLUMNS = [('ECE ↓', 'ece'), ('AUROC ↑', 'auroc'), ('AURC ↓', 'aurc'), ('Brier ↓', 'brier'),
           ('Spearman(loss) ↑', 'spearman'), ('Pearson(loss) ↑', 'pearson')]
# Head vs baseline comparisons: (head measure, baseline block, baseline measure, higher is better).
TESTS = [('auroc', 'max_prob', 'auroc', True), ('ece', 'max_prob', 'ece', False),
         ('aurc', 'max_prob', 'aurc', False), ('brier', 'max_prob', 'brier', False),
         ('spearman', 'entropy', 'spearman', True)]


def _run_config(quick: bool, steps: int, cache_dir: pathlib.Path, seed: int, inputs: str):
  name = _CONFIG.value or ('tiny' if quick else 'small')
  config = base_config.short_run(base_config.load_config_file(name), steps, evaluations=0)
  config.data.sources = _DATA.value
  config.data.cache_dir = str(cache_dir)
  config.model.metacog = True
  config.model.metacog_inputs = inputs
  config.train.seed = seed
  if quick:
    config.data.seq_len = 64
    config.train.batch_size = 16
    config.train.eval_tokens = 4 * 16 * 64
  return config


def _corpus_label(spec: str) -> str:
  return spec.split(':', 1)[1] if spec.startswith('download:') else pathlib.Path(spec).name


def _blocks(result: dict, inputs: str) -> dict[str, dict]:
  """{predictor: measures} of one evaluation: the head under its inputs' name, and the baselines."""
  return {f'head ({inputs})': result['metacog'], 'max_prob': result['baselines']['max_prob'],
          'entropy': result['baselines']['entropy']}


def _mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _welch(a: list[float], b: list[float]) -> float:
  """Two-sided p-value of Welch's t-test (NaN when it is undefined: one seed, or no variance)."""
  if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
    return float('nan')
  return float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)


def _table(corpus: str, runs: dict[str, list[dict]], inputs: list[str], baseline_inputs: str) -> list[str]:
  """The measures of every head and of the baselines (from the `baseline_inputs` runs) on one corpus."""
  first = runs[inputs[0]][0]
  lines = [f'### {corpus} ({first["tokens"]:,} tokens per run; top-1 accuracy '
           f'{_mean_std([r["metacog"]["accuracy"] for r in runs[inputs[0]]])[0]:.4f}, loss '
           f'{_mean_std([r["loss"] for r in runs[inputs[0]]])[0]:.4f})', '',
           '| predictor | ' + ' | '.join(c for c, _ in COLUMNS) + ' |',
           '|---|' + '---:|' * len(COLUMNS)]
  rows = [(f'head ({i})', [r['metacog'] for r in runs[i]]) for i in inputs]
  rows += [('max softmax probability', [r['baselines']['max_prob'] for r in runs[baseline_inputs]]),
           ('predictive entropy', [r['baselines']['entropy'] for r in runs[baseline_inputs]])]
  for label, blocks in rows:
    cells = []
    for _, key in COLUMNS:
      if key in blocks[0] and blocks[0][key] is not None:
        mean, std = _mean_std([b[key] for b in blocks])
        cells.append(f'{mean:.4f} ± {std:.4f}')
      else:
        cells.append('')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| head | ' + ' | '.join(f'{h} vs {b} {m}' for h, b, m, _ in TESTS) + ' |',
            '|---|' + '---:|' * len(TESTS)]
  for i in inputs:
    cells = []
    for head_key, block, key, higher in TESTS:
      head = [r['metacog'][head_key] for r in runs[i]]
      base = [r['baselines'][block][key] for r in runs[i]]  # the same runs' baseline
      diff = statistics.mean(head) - statistics.mean(base)
      wins = diff > 0 if higher else diff < 0
      cells.append(f"{diff:+.4f} ({'better' if wins else 'worse'}, p={_welch(head, base):.3f})")
    lines.append(f'| head ({i}) | ' + ' | '.join(cells) + ' |')
  return lines


def _verdicts(corpora: dict[str, dict[str, list[dict]]], inputs: str, in_dist: str) -> list[str]:
  """The issue's targets for the head with `inputs`: met or not, with the numbers."""
  def means(runs, head_key, block, key):
    return (statistics.mean(r['metacog'][head_key] for r in runs),
            statistics.mean(r['baselines'][block][key] for r in runs))
  runs = corpora[in_dist][inputs]
  out = [f'Targets, head ({inputs}):']
  h, b = means(runs, 'auroc', 'max_prob', 'auroc')
  out.append(f"- in distribution, AUROC ≥ max-prob AUROC + 0.01: {h:.4f} vs {b:.4f} + 0.01: "
             f"{'met' if h >= b + 0.01 else 'NOT met'}")
  h, b = means(runs, 'ece', 'max_prob', 'ece')
  out.append(f"- in distribution, ECE ≤ max-prob ECE: {h:.4f} vs {b:.4f}: {'met' if h <= b else 'NOT met'}")
  h, b = means(runs, 'spearman', 'entropy', 'spearman')
  out.append(f"- in distribution, ℓ̂ Spearman ≥ entropy's: {h:.4f} vs {b:.4f}: {'met' if h >= b else 'NOT met'}")
  for corpus, by_inputs in corpora.items():
    if corpus == in_dist:
      continue
    h, b = means(by_inputs[inputs], 'ece', 'max_prob', 'ece')
    a_h, a_b = means(by_inputs[inputs], 'auroc', 'max_prob', 'auroc')
    out.append(f"- OOD {corpus}: ECE {h:.4f} vs max-prob {b:.4f} ({'met' if h < b else 'NOT met'}); "
               f"AUROC {a_h:.4f} vs {a_b:.4f}")
  return out


def _plot_risk_coverage(pooled: dict[str, dict[str, dict[str, np.ndarray]]], focus: str,
                        out: pathlib.Path) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from vesper_jax import metacog  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(pooled), figsize=(5 * len(pooled), 4.2), squeeze=False)
  for ax, (corpus, by_inputs) in zip(axes[0], pooled.items()):
    base = by_inputs[focus]  # the baselines of the runs the tables take them from
    curves = [(f'head ({i})', t['confidence'], t['correct']) for i, t in by_inputs.items()]
    curves += [('max softmax probability', base['max_prob'], base['correct']),
               ('−entropy', -base['entropy'], base['correct'])]
    for label, score, correct in curves:
      rc = metacog.risk_coverage(score, correct)
      ax.plot(rc['coverage'], rc['risk'], label=f"{label}: AURC {metacog.aurc(score, correct):.4f}")
    ax.set_title(f'{corpus} ({len(base["correct"]):,} tokens)')
    ax.set_xlabel('coverage (share of tokens kept, most confident first)')
    ax.set_ylabel('risk (top-1 error rate of the kept tokens)')
    ax.legend(fontsize=7)
  fig.suptitle('Risk–coverage, tokens pooled over seeds (lower is better)')
  fig.tight_layout()
  path = out / 'risk_coverage.png'
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path.name


def _plot_reliability(tokens: dict[str, np.ndarray], inputs: str, out: pathlib.Path) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from vesper_jax import metacog  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
  for ax, (label, conf) in zip(axes, ((f'metacog head ({inputs})', tokens['confidence']),
                                      ('max softmax probability', tokens['max_prob']))):
    rel = metacog.reliability(conf, tokens['correct'])
    edges = np.array(rel['edges'])
    centers = (edges[:-1] + edges[1:]) / 2
    ax.bar(centers, np.nan_to_num(np.array(rel['accuracy'], dtype=float)), width=edges[1] - edges[0],
           edgecolor='k', alpha=0.7, label='accuracy per bin')
    ax.plot([0, 1], [0, 1], 'r--', label='perfect calibration')
    ax.set_title(f'{label}: ECE {metacog.expected_calibration_error(conf, tokens["correct"]):.4f}')
    ax.set_xlabel('confidence')
    ax.set_ylabel('top-1 accuracy')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc='upper left', fontsize=8)
  fig.suptitle(f"Reliability in distribution ({len(tokens['correct']):,} tokens, pooled over seeds)")
  fig.tight_layout()
  path = out / 'reliability.png'
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path.name


def main(argv):
  del argv
  from vesper_jax import checkpoint, data, evaluate, metacog, train  # pylint: disable=g-import-not-at-top
  quick = _QUICK.value
  steps = _STEPS.value or (300 if quick else 2000)
  eval_tokens = _EVAL_TOKENS.value if _EVAL_TOKENS.value is not None else (32_768 if quick else 1_000_000)
  inputs = list(_INPUTS.value)
  for i in inputs:
    if i not in metacog.INPUTS:
      raise app.UsageError(f'--inputs: {i!r} is not one of {metacog.INPUTS}')
  default = base_config.get_config().model.metacog_inputs
  focus = default if default in inputs else inputs[-1]  # whose baselines the tables show, and the verdicts
  out = pathlib.Path(_OUT.value or REPO / 'experiments' / 'results' /
                     ('metacog_calibration_quick' if quick else 'metacog_calibration'))
  runs_dir = out / 'runs'
  shutil.rmtree(runs_dir, ignore_errors=True)
  runs_dir.mkdir(parents=True)
  cache_dir = out / 'cache'
  in_dist = f'{_corpus_label(_DATA.value)} (held out)'
  corpora: dict[str, dict[str, list[dict]]] = {}     # corpus -> inputs -> per-seed results
  pooled: dict[str, dict[str, dict[str, list]]] = {}  # corpus -> inputs -> per-token arrays, all seeds
  start = time.time()
  for seed in range(_SEEDS.value):
    for inp in inputs:
      config = _run_config(quick, steps, cache_dir, seed, inp)
      workdir = runs_dir / f'{inp}_seed{seed}'
      summary = train.train_and_evaluate(config, workdir)
      model_config, params, tokenizer = checkpoint.load_for_inference(workdir)
      cache = data.build_or_load_cache(config.data, config.model.vocab_size, progress=False)
      texts = {in_dist: cache.val}
      for spec in _OOD.value:
        ood = config.data.copy_and_resolve_references()
        ood.sources, ood.val_fraction, ood.tokenizer = spec, 0.0, tokenizer.path
        texts[f'{_corpus_label(spec)} (OOD)'] = data.build_or_load_cache(
            ood, config.model.vocab_size, progress=False).train
      for corpus, tokens in texts.items():
        result = evaluate.evaluate(params, model_config, tokens, tokenizer, seq_len=config.data.seq_len,
                                   batch_size=16, max_tokens=eval_tokens, return_tokens=True)
        for k, v in result.pop('per_token').items():
          pooled.setdefault(corpus, {}).setdefault(inp, {}).setdefault(k, []).append(v)
        result.update(seed=seed, inputs=inp, final_train_loss=summary['loss'])
        corpora.setdefault(corpus, {}).setdefault(inp, []).append(result)
      logging.info('seed %d, inputs %s: done after %.0f s', seed, inp, time.time() - start)
      print(f'  seed {seed}, inputs {inp}: trained and scored ({time.time() - start:.0f} s)', flush=True)
  pooled_arrays = {c: {i: {k: np.concatenate(v) for k, v in t.items()} for i, t in by.items()}
                   for c, by in pooled.items()}
  elapsed = time.time() - start
  name = _CONFIG.value or ('tiny' if quick else 'small')
  lines = [f'{_SEEDS.value} seeds × inputs {", ".join(inputs)}; config {name}, {steps} steps; trained on '
           f'{_corpus_label(_DATA.value)}; mean ± std over seeds; baselines from the runs of the head '
           f'({focus}) (the trunk is the same up to gradient clipping: the head sits behind stop_gradient); '
           f'p: Welch\'s t-test against the same runs\' baseline; {elapsed / 60:.1f} min', '']
  for corpus, by_inputs in corpora.items():
    lines += _table(corpus, by_inputs, inputs, focus) + ['']
  lines += _verdicts(corpora, focus, in_dist)
  figures = [_plot_risk_coverage(pooled_arrays, focus, out),
             _plot_reliability(pooled_arrays[in_dist][focus], focus, out)]
  (out / 'results.md').write_text('\n'.join(lines) + '\n')
  (out / 'results.json').write_text(json.dumps(evaluate._json_safe({  # pylint: disable=protected-access
      'steps': steps, 'seeds': _SEEDS.value, 'inputs': inputs, 'eval_tokens': eval_tokens,
      'config': name, 'data': _DATA.value, 'ood': list(_OOD.value), 'seconds': elapsed,
      'figures': figures, 'results': corpora}), indent=1, default=str) + '\n')
  print('\n'.join(lines))
  print(f'wrote {out}/results.json, results.md, {", ".join(figures)} ({time.time() - start:.0f} s)')


if __name__ == '__main__':
  app.run(main)
