"""FlyLoRA vs LoRA vs full fine-tuning: adapt a TinyStories model to French PIAF (SPEC §5, §13).

    python experiments/flylora_vs_lora.py --quick        # tiny model, 3 seeds, this CPU: ~15 minutes
    python experiments/flylora_vs_lora.py                # small model, longer runs (a GPU)

1. Pretrain the model on TinyStories (`--pretrain_data`), training its byte-level BPE there.
2. From that workdir (`train.init_from`), fine-tune on PIAF (`--finetune_data`, SQuAD-format French QA)
   with the base's tokenizer, three ways, each over a small learning-rate sweep:
     flylora — frozen base, sparse routed adapters (rank r, top-k k) on `--targets`, only B trains;
     lora    — frozen base, plain LoRA of the same rank on the same targets (A and B train);
     full    — every parameter trains.
3. Evaluate the base and every fine-tuned model on both validation splits (up to `--eval_windows`
   windows each): the PIAF loss is what was learned, the TinyStories loss after − before is what was
   forgotten. Each arm is reported at its best learning rate (lowest mean PIAF validation loss over
   `--seeds` seeds), with Welch's t-tests between the arms.

Every run goes through the sweep runner (vesper_jax.sweep: a `python -m vesper_jax.train` process each,
in <out>/sweeps/; re-running reuses finished runs, the pretraining included).

Writes results.json, results.md (the tables) and PNGs (PIAF validation curves of each arm's best run;
learned vs forgotten for every run) to --out.
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

_QUICK = flags.DEFINE_bool('quick', False, 'The tiny model and short runs: minutes on a CPU.')
_CONFIG = flags.DEFINE_string('config', None, 'configs/<name>.py (default: tiny with --quick, else small).')
_PRETRAIN_DATA = flags.DEFINE_string('pretrain_data', 'download:tinystories', 'Pretraining text (data.sources).')
_FINETUNE_DATA = flags.DEFINE_string('finetune_data', 'download:piaf', 'Fine-tuning data (data.sources).')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', None, 'Default: 400 with --quick, else 4000.')
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', None, 'Default: 150 with --quick, else 1000.')
_TARGETS = flags.DEFINE_string('targets', 'gate,up', 'Adapted projections (model.lora_targets).')
_RANK = flags.DEFINE_integer('rank', 32, 'Adapter rank r (both FlyLoRA and LoRA).')
_K = flags.DEFINE_integer('k', 8, "FlyLoRA's top-k.")
_LRS_ADAPTERS = flags.DEFINE_list('lrs_adapters', ['1e-2', '3e-2'], 'Sweep for flylora and lora.')
_LRS_FULL = flags.DEFINE_list('lrs_full', ['1e-3', '3e-3'], 'Sweep for full fine-tuning.')
_EVAL_WINDOWS = flags.DEFINE_integer('eval_windows', 512, 'Validation windows per split (at most).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the adapters\' frozen A (model.lora_seed); pretraining uses seed 0.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Fine-tuning seeds per (method, learning rate): train.seed 0 .. seeds-1.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: '
                           'experiments/results/flylora_vs_lora[_quick]).')

ARMS = ('flylora', 'lora', 'full')


def _config(base_name: str, quick: bool, out: pathlib.Path, steps: int, sources: str):
  """The shared run settings: one cache dir, end-only checkpoints, quiet logging."""
  config = base_config.short_run(base_config.load_config_file(base_name), steps)
  config.data.sources = sources
  config.data.cache_dir = str(out / 'cache')
  if quick:
    config.data.seq_len = 64
    config.train.batch_size = 16
    config.train.eval_tokens = 4 * 16 * 64  # the first 64 windows of the validation split
  return config


def _finetune_config(base_name, quick, out, pretrain_dir: pathlib.Path, arm: str, lr: float):
  config = _config(base_name, quick, out, _FINETUNE_STEPS.value or (150 if quick else 1000),
                   _FINETUNE_DATA.value)
  config.train.init_from = str(pretrain_dir)
  config.data.tokenizer = str(pretrain_dir / 'tokenizer.json')  # the base's ids keep their meaning
  config.opt.learning_rate = lr
  config.opt.weight_decay = 0.0  # the same for every arm: no pull toward zero (or away from the base)
  if arm != 'full':
    config.model.lora_targets = _TARGETS.value
    config.model.lora_mode = arm
    config.model.lora_rank = _RANK.value
    config.model.lora_k = _K.value
    config.model.lora_seed = _SEED.value
  return config


def _eval_loss(model_cfg, params, tokens, seq_len: int, max_windows: int, batch_size: int = 32) -> float:
  """Mean next-token loss over the targets of the first `max_windows` non-overlapping windows of a split."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vesper_jax import evaluate  # pylint: disable=g-import-not-at-top
  from vesper_jax.model import VesperLM  # pylint: disable=g-import-not-at-top

  step = jax.jit(functools.partial(evaluate.eval_step, model=VesperLM(model_cfg)))
  return evaluate.score(lambda batch: step(params, {}, batch), tokens, seq_len=seq_len,
                        batch_size=batch_size, max_tokens=max_windows * seq_len)['loss']


def _curve(workdir: pathlib.Path) -> list[tuple[int, float]]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['eval_loss']) for r in rows if 'eval_loss' in r]


def _plot(best: dict[str, dict], runs: list[dict], base: dict, out: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for arm, r in best.items():
    steps, ys = zip(*r['curve'])
    ax.plot(steps, ys, marker='.', label=f"{arm} (lr {r['lr']:g}, {r['trainable']:,} trainable)")
  ax.set_xlabel('fine-tuning step')
  ax.set_ylabel('PIAF validation loss (nats)')
  ax.set_title('Adapting a TinyStories model to French PIAF')
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / 'piaf_val_loss.png', dpi=120)
  plt.close(fig)

  # Learned vs forgotten, every run of the sweeps: the trade-off each method offers.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, arm in enumerate(dict.fromkeys(r['arm'] for r in runs)):
    mine = sorted((r for r in runs if r['arm'] == arm), key=lambda r: r['lr'])
    ax.plot([r['piaf_loss'] for r in mine], [r['tinystories_loss'] - base['tinystories_loss'] for r in mine],
            marker='o', color=f'C{i}', label=f"{arm} ({mine[0]['trainable']:,} trainable)")
    for r in mine:
      ax.annotate(f"{r['lr']:g}", (r['piaf_loss'], r['tinystories_loss'] - base['tinystories_loss']),
                  textcoords='offset points', xytext=(4, 4), fontsize=8)
  ax.axhline(0.0, color='grey', ls='--')
  ax.axvline(base['piaf_loss'], color='grey', ls=':', label='base PIAF loss')
  ax.set_xlabel('PIAF validation loss after fine-tuning (nats; lower = learned more)')
  ax.set_ylabel('TinyStories loss increase (nats; forgetting)')
  ax.set_title('Learning vs forgetting (labels: peak learning rate)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / 'tradeoff.png', dpi=120)
  plt.close(fig)
  return ['piaf_val_loss.png', 'tradeoff.png']


def _mean_std(xs: list[float]) -> str:
  return f'{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}'


def main(argv):
  del argv
  from vesper_jax import checkpoint, data as data_lib, flylora  # pylint: disable=g-import-not-at-top
  from vesper_jax.model import ModelConfig, param_counts  # pylint: disable=g-import-not-at-top

  quick = _QUICK.value
  base_name = _CONFIG.value or ('tiny' if quick else 'small')
  config_file = REPO / 'configs' / f'{base_name}.py'
  reference = base_config.load_config_file(base_name)
  out = sweep.experiment_output(
      _OUT.value or REPO / 'experiments' / 'results' / f"flylora_vs_lora{'_quick' if quick else ''}",
      _PRETRAIN_DATA.value, _FINETUNE_DATA.value)
  started = time.perf_counter()

  def report(r):
    what = f"eval loss {r['eval_loss']:.4f}" if r['status'] == 'done' else f"FAILED: {r['reason']}"
    print(f"  {r['point']}: {what} ({r['seconds']:.0f} s)", flush=True)

  # 1. Pretraining, one run (its BPE is trained on TinyStories and shared by every later run); a sweep of
  # one point, so a re-run reuses it.
  pretrain_steps = _PRETRAIN_STEPS.value or (400 if quick else 4000)
  pretrain = _config(base_name, quick, out, pretrain_steps, _PRETRAIN_DATA.value)
  (base_result,) = sweep.run_sweep(config_file, {}, 1, out / 'sweeps' / 'pretrain', on_point=report,
                                   overrides=sweep.config_overrides(pretrain, reference))
  if base_result['status'] != 'done':
    raise RuntimeError(f"pretraining failed: {base_result['reason']}")
  pretrain_dir = out / 'sweeps' / 'pretrain' / 'points' / base_result['point']
  print(f"pretrained {pretrain_steps} steps on {pathlib.Path(_PRETRAIN_DATA.value).name}: eval loss "
        f"{base_result['eval_loss']:.4f}", flush=True)

  # The two validation splits, tokenized with the base's tokenizer.
  seq_len = pretrain.data.seq_len
  splits = {}
  for name, sources in (('tinystories', _PRETRAIN_DATA.value), ('piaf', _FINETUNE_DATA.value)):
    data_config = pretrain.data.copy_and_resolve_references()
    data_config.sources = sources
    data_config.tokenizer = str(pretrain_dir / 'tokenizer.json')
    splits[name] = data_lib.build_or_load_cache(data_config, pretrain.model.vocab_size, progress=False).val

  def evaluate(model_cfg, params) -> dict[str, float]:
    return {f'{name}_loss': _eval_loss(model_cfg, params, tokens, seq_len, _EVAL_WINDOWS.value)
            for name, tokens in splits.items()}

  base_cfg, base_params, _ = checkpoint.load_for_inference(pretrain_dir)
  base = evaluate(base_cfg, base_params)
  print(f"base: PIAF {base['piaf_loss']:.4f}, TinyStories {base['tinystories_loss']:.4f}", flush=True)

  # 2. Fine-tuning, three ways, each a sweep over its learning rates × seeds (train.seed: the batch order
  # and the initialisation; A is fixed by model.lora_seed).
  runs = []
  for arm in ARMS:
    lrs = _LRS_FULL.value if arm == 'full' else _LRS_ADAPTERS.value
    overrides = sweep.config_overrides(_finetune_config(base_name, quick, out, pretrain_dir, arm, 1.0),
                                       reference)
    del overrides['opt.learning_rate']
    print(arm, flush=True)
    results = sweep.run_sweep(config_file, {'opt.learning_rate': lrs}, _SEEDS.value, out / 'sweeps' / arm,
                              overrides=overrides, on_point=report)
    for r in results:
      if r['status'] != 'done':
        continue
      workdir = out / 'sweeps' / arm / 'points' / r['point']
      model_cfg, params, _ = checkpoint.load_for_inference(workdir)
      trainable = flylora.trainable_mask(params, model_cfg)
      counts = param_counts(params, trainable)
      report_ = flylora.param_report(params, model_cfg, trainable) if arm != 'full' else {}
      runs.append({'arm': arm, 'lr': float(r['params']['opt.learning_rate']), 'seed': r['seed'],
                   'trainable': counts['trainable'], 'total': counts['total'],
                   'lora_same_rank': report_.get('lora_same_rank'), 'tokens_per_s': r['tokens_per_s'],
                   'seconds': r['seconds'], 'curve': _curve(workdir), **evaluate(model_cfg, params)})

  # Per (arm, lr): seeds pooled; each arm's best lr by mean PIAF loss.
  cells = {}
  for run in runs:
    cells.setdefault((run['arm'], run['lr']), []).append(run)
  mean = lambda rs, key: statistics.mean(r[key] for r in rs)  # noqa: E731
  best = {}
  for (arm, lr), rs in cells.items():
    if arm not in best or mean(rs, 'piaf_loss') < mean(cells[(arm, best[arm])], 'piaf_loss'):
      best[arm] = lr
  best_runs = {arm: cells[(arm, lr)] for arm, lr in best.items()}
  tests = {}
  for a, b in (('lora', 'flylora'), ('full', 'flylora'), ('full', 'lora')):
    for key in ('piaf_loss', 'tinystories_loss'):
      tests[f'{b} vs {a}: {key}'] = sweep.welch_t_test([r[key] for r in best_runs[a]],
                                                       [r[key] for r in best_runs[b]])

  # 3. The table.
  full_n = best_runs['full'][0]['trainable']
  lora_n = best_runs['lora'][0]['trainable']
  ft = _finetune_config(base_name, quick, out, pretrain_dir, 'flylora', 0.0)
  model_desc = ModelConfig(**ft.model)
  lines = [
      '# FlyLoRA vs LoRA vs full fine-tuning: TinyStories → PIAF (French)', '',
      f"Base: `{base_name}` ({model_desc.num_layers} layers, d_model {model_desc.d_model}, d_ff "
      f'{model_desc.d_ff}) pretrained {pretrain_steps} steps on `{pathlib.Path(_PRETRAIN_DATA.value).name}`; '
      f'fine-tuned {ft.train.num_steps} steps of {ft.train.batch_size}×{seq_len} tokens on '
      f'`{pathlib.Path(_FINETUNE_DATA.value).name}` (AdamW, warmup {ft.opt.warmup_steps} then cosine, no '
      f'weight decay, clip {ft.opt.grad_clip_norm}). Adapters on `{_TARGETS.value}`, rank {_RANK.value} '
      f'(FlyLoRA: top-{_K.value}, ρ = {flylora.density(model_desc):g}, α = 2r). Losses in nats over up to '
      f'{_EVAL_WINDOWS.value} validation windows per split, mean ± std over {_SEEDS.value} seeds; each arm at '
      'its best learning rate (lowest mean PIAF loss) from its sweep.', '',
      f"Base before fine-tuning: PIAF {base['piaf_loss']:.4f}, TinyStories {base['tinystories_loss']:.4f}.",
      '',
      f'| method | lr | trainable params | vs full FT | vs LoRA r={_RANK.value} | PIAF val loss | '
      'TinyStories loss | Δ forgetting | seeds |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for arm in ARMS:
    rs = best_runs[arm]
    lines.append(
        f"| {arm} | {best[arm]:g} | {rs[0]['trainable']:,} | {100 * rs[0]['trainable'] / full_n:.2f}% | "
        f"{100 * rs[0]['trainable'] / lora_n:.1f}% | {_mean_std([r['piaf_loss'] for r in rs])} | "
        f"{_mean_std([r['tinystories_loss'] for r in rs])} | "
        f"{mean(rs, 'tinystories_loss') - base['tinystories_loss']:+.4f} | {len(rs)} |")
  lines += ['', "Welch's t-tests (best learning rate of each arm, over seeds; t of the first minus the second):",
            '', '| comparison | t | p |', '|---|---:|---:|']
  lines += [f"| {k} | {v['t']:.2f} | {v['p']:.3f} |" for k, v in tests.items()]
  lines += ['', 'Every cell of the sweeps:', '', '| method | lr | PIAF val loss | TinyStories loss | seeds |',
            '|---|---:|---:|---:|---:|']
  lines += [f"| {arm} | {lr:g} | {_mean_std([r['piaf_loss'] for r in rs])} | "
            f"{_mean_std([r['tinystories_loss'] for r in rs])} | {len(rs)} |" for (arm, lr), rs in cells.items()]
  lines += ['', f'Total wall time {time.perf_counter() - started:.0f} s (finished runs of an earlier call are '
            'reused, not re-run).']
  table = '\n'.join(lines)
  (out / 'results.md').write_text(table + '\n')
  pngs = _plot({arm: min(rs, key=lambda r: r['piaf_loss']) for arm, rs in best_runs.items()}, runs, base, out)
  (out / 'results.json').write_text(json.dumps(
      {'quick': quick, 'config': base_name, 'pretrain_data': _PRETRAIN_DATA.value,
       'finetune_data': _FINETUNE_DATA.value, 'pretrain_steps': pretrain_steps,
       'finetune_steps': ft.train.num_steps, 'targets': _TARGETS.value, 'rank': _RANK.value, 'k': _K.value,
       'seeds': _SEEDS.value, 'base': base, 'runs': runs, 'best_lr': best, 'welch': tests, 'plots': pngs},
      indent=1))
  print('\n' + table + f'\n\nwrote {out}/results.json, results.md, {", ".join(pngs)}\n', flush=True)


if __name__ == '__main__':
  app.run(main)
