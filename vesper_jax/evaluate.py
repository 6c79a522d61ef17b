"""Loss, perplexity and bits per byte of a trained model on held-out text (SPEC §2).

  python -m vesper_jax.evaluate --workdir=runs/tiny                       # the run's validation split
  python -m vesper_jax.evaluate --workdir=runs/tiny --data=notes/*.txt    # any corpus, the run's tokenizer
  python -m vesper_jax.evaluate --workdir=export/tiny --data=corpus.txt   # a safetensors export
  python -m vesper_jax.evaluate --workdir=runs/tiny --quantize=int4       # what int4 weights cost

Every next-token target of the text is scored exactly once (non-overlapping windows of data.seq_len
targets; the last one partial), up to a token budget (`--max_tokens`, by default the run's
train.eval_tokens). The same function scores the validation loss logged during training, so that value
and this command's agree on the same checkpoint. Bits per byte divide the summed loss (in bits) by the
UTF-8 bytes of the scored targets' text, a measure that does not depend on the tokenizer.
"""

import functools
import json
import math
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from vesper_jax import checkpoint, cli, data, export, losses, metacog, quantize
from vesper_jax import config as base_config
from vesper_jax.model import ModelConfig, VesperLM
from vesper_jax.pytree import PyTree
from vesper_jax.tokenizer import Tokenizer

FLAGS = flags.FLAGS


def eval_step(params: PyTree, model_state: PyTree, batch: dict[str, jax.Array], *,
              model: VesperLM) -> tuple[jax.Array, ...]:
  """(summed next-token NLL over the weighted targets, their count) of one batch; pure, jittable.

  With the metacognition head (model.metacog), a third element: per-token arrays [B, T] of the head's
  confidence and predicted loss, the real nll, correctness, max probability, entropy, and the weights
  (what `score` gathers for metacog.calibration). The loss then comes from the same softmax as the
  head's statistics (losses.token_stats): one pass over the vocabulary.
  """
  tokens_BT1, weights_BT = batch['tokens'], batch['weights']
  variables, targets_BT = {'params': params, **model_state}, tokens_BT1[:, 1:]
  count = jnp.sum(weights_BT)
  if not model.config.metacog:
    logits_BTV = model.apply(variables, tokens_BT1[:, :-1])
    loss, _ = losses.cross_entropy_and_entropy(logits_BTV, targets_BT, weights_BT)
    return loss * count, count
  # One softmax gives the loss, the head's inputs (with model.metacog_inputs 'stats'/'both') and the
  # baselines: the head is applied here, as the train step applies it, to the statistics computed once.
  logits_BTV, x_BTD = model.apply(variables, tokens_BT1[:, :-1], with_hidden=True)
  stats = losses.token_stats(logits_BTV, targets_BT)
  meta = metacog.apply(model.config, params, x_BTD, stats)
  weights_BT = weights_BT.astype(jnp.float32)
  loss = jnp.sum(stats['nll'] * weights_BT) / jnp.maximum(count, 1.0)
  per_token = {'confidence': meta.confidence_BT, 'predicted_loss': meta.predicted_loss_BT,
               **{k: stats[k] for k in ('nll', 'correct', 'max_prob', 'entropy')}, 'weights': weights_BT}
  return loss * count, count, per_token


def score(step_fn: Callable[[dict], tuple[jax.Array, ...]], tokens: np.ndarray, *, seq_len: int,
          batch_size: int, max_tokens: int = 0,
          place: Callable[[dict], dict] = lambda batch: batch, return_tokens: bool = False) -> dict:
  """Scores every target of `tokens` (up to `max_tokens`) through `step_fn` (an `eval_step`).

  Args:
    step_fn: batch -> (nll sum, count[, per-token arrays]), e.g. a jitted `eval_step` with the
      parameters bound; with per-token arrays (a model with the metacognition head), the scored
      targets' values are gathered on the host and measured (metacog.calibration).
    tokens: a 1-D token array (a split of the token cache).
    seq_len: targets per window.
    batch_size: windows per batch (the global batch; each process reads its rows).
    max_tokens: the budget of targets; 0 = all.
    place: puts this process's rows of a batch on the devices (default: as they are).
    return_tokens: with the head, also return the per-token arrays under 'per_token' (confidence,
      predicted_loss, nll, correct, max_prob, entropy; scored targets only), e.g. for a reliability
      diagram (metacog.reliability).
  Returns:
    {'loss': mean NLL in nats, 'perplexity', 'tokens': targets scored}; with the head, also
    'metacog' and 'baselines' (see metacog.calibration).
  """
  total, count = 0.0, 0.0  # summed on the host in float64, batch by batch
  gathered: dict[str, list[np.ndarray]] = {}
  for index in range(data.num_eval_batches(tokens, seq_len=seq_len, batch_size=batch_size,
                                           max_tokens=max_tokens)):
    tokens_BT1, weights_BT = data.eval_batch(
        tokens, index=index, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
        process_index=jax.process_index(), process_count=jax.process_count())
    nll, n, *per_token = step_fn(place({'tokens': tokens_BT1, 'weights': weights_BT}))
    total, count = total + float(nll), count + float(n)
    if per_token:
      _gather(per_token[0], gathered)
  loss = total / max(count, 1.0)
  result = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'tokens': int(count)}
  if gathered:
    t = {k: np.concatenate(v) for k, v in gathered.items()}
    result.update(metacog.calibration(t['confidence'], t['predicted_loss'], t['correct'], t['nll'],
                                      t['max_prob'], t['entropy']))
    if return_tokens:
      result['per_token'] = t
  return result


def _gather(per_token: dict[str, jax.Array], gathered: dict[str, list[np.ndarray]]) -> None:
  """Appends the scored (weight > 0) targets' per-token values, from every process, to `gathered`."""
  if jax.process_count() > 1:  # each process holds only its rows of the global batch
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    per_token = multihost_utils.process_allgather(per_token, tiled=True)
  host = {k: np.asarray(v) for k, v in per_token.items()}
  scored = host.pop('weights') > 0
  for k, v in host.items():
    gathered.setdefault(k, []).append(v[scored])


def bits_per_byte(loss: float, tokens: np.ndarray, num_targets: int, tokenizer: Tokenizer) -> float:
  """The summed loss in bits over the UTF-8 bytes of the scored targets' text (special tokens: 0 bytes)."""
  num_bytes = len(tokenizer.decode(np.asarray(tokens[1:num_targets + 1])).encode('utf-8'))
  return loss * num_targets / math.log(2.0) / max(num_bytes, 1)


def evaluate(params: PyTree, config: ModelConfig, tokens: np.ndarray, tokenizer: Tokenizer, *,
             seq_len: int, batch_size: int, max_tokens: int = 0, return_tokens: bool = False) -> dict:
  """Loss, perplexity, bits per byte and the number of targets scored, on one device; with the
  metacognition head, its calibration and the baselines' ('metacog', 'baselines').

  Args:
    params, config: the model (float or cast for inference).
    tokens: the token ids to score (a split of a token cache).
    tokenizer: the tokenizer that made them (for the byte count).
    seq_len, batch_size, max_tokens, return_tokens: as in `score`.
  """
  step = jax.jit(functools.partial(eval_step, model=VesperLM(config)))
  result = score(lambda batch: step(params, {}, batch), tokens, seq_len=seq_len, batch_size=batch_size,
                 max_tokens=max_tokens, return_tokens=return_tokens)
  result['bits_per_byte'] = bits_per_byte(result['loss'], tokens, result['tokens'], tokenizer)
  return result


def calibration_table(result: dict) -> str:
  """The metacognition head's measures beside the baselines' (a Markdown table)."""
  m, b = result['metacog'], result['baselines']
  f = lambda x: f'{x:.4f}'
  mp, en = b['max_prob'], b['entropy']
  return ('| predictor | ECE (15 bins) | AUROC (correct) | AURC (↓) | Brier (↓) | Pearson (loss) | '
          'Spearman (loss) |\n'
          '|---|---:|---:|---:|---:|---:|---:|\n'
          f"| metacog head | {f(m['ece'])} | {f(m['auroc'])} | {f(m['aurc'])} | {f(m['brier'])} | "
          f"{f(m['pearson'])} | {f(m['spearman'])} |\n"
          f"| max softmax probability | {f(mp['ece'])} | {f(mp['auroc'])} | {f(mp['aurc'])} | "
          f"{f(mp['brier'])} | | |\n"
          f"| predictive entropy | | | {f(en['aurc'])} | | {f(en['pearson'])} | {f(en['spearman'])} |\n"
          f"\nmean confidence {f(m['mean_confidence'])}, top-1 accuracy {f(m['accuracy'])} "
          f"over {result['tokens']:,} tokens")


def _json_safe(value):
  """NaN (an undefined measure) as JSON null; everything else as it is."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


# ------------------------------------------------------------------------------------------ CLI

def _load(path: pathlib.Path) -> tuple[ModelConfig, PyTree, Tokenizer, ml_collections.ConfigDict | None]:
  """(model config, params, tokenizer, run config or None) of a training workdir or an export dir."""
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such workdir or export directory')
  weights = path / export.WEIGHTS_FILE if path.is_dir() else path
  if path.is_dir() and (path / checkpoint.CONFIG_FILE).is_file():
    model_config, params, tokenizer = checkpoint.load_for_inference(path)
    return model_config, params, tokenizer, checkpoint.read_config(path)
  if weights.suffix == '.safetensors' and weights.is_file():
    tokenizer = Tokenizer.load(weights.parent / checkpoint.TOKENIZER_FILE)
    return export.config_from_safetensors(weights), export.load_safetensors(weights), tokenizer, None
  raise FileNotFoundError(f'{path}: neither a training workdir (config.json) nor an export '
                          f'({export.WEIGHTS_FILE} + tokenizer.json)')


def _tokens(run: ml_collections.ConfigDict | None, model_config: ModelConfig,
            tokenizer: Tokenizer) -> np.ndarray:
  """The tokens named by --data (the whole corpus) or by --split of the run's own corpus."""
  if run is None and not FLAGS.data:
    raise ValueError(f'{FLAGS.workdir} is an export with no corpus of its own: name one with --data')
  data_config = (run or base_config.get_config()).data
  if FLAGS.data:  # a new corpus, read by the same readers, tokenized by the run's tokenizer, all scored
    data_config.sources, data_config.val_fraction = FLAGS.data, 0.0
  data_config.tokenizer = tokenizer.path
  cache = data.build_or_load_cache(data_config, model_config.vocab_size, progress=False)
  return cache.train if (FLAGS.data or FLAGS.split == 'train') else cache.val


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  model_config, params, tokenizer, run = _load(pathlib.Path(FLAGS.workdir))
  if FLAGS.quantize:  # weight-only, from the float weights (quantize.py): the quality cost, measured
    model_config, params = quantize.quantize_model(model_config, params, FLAGS.quantize,
                                                   quantize_head=FLAGS.quantize_head)
  tokens = _tokens(run, model_config, tokenizer)
  seq_len = FLAGS.seq_len or (run.data.seq_len if run else min(model_config.max_seq_len, 1024))
  # The run's micro-batch, as this machine would train it (one device here).
  batch_size = FLAGS.batch_size or (
      run.train.batch_size // base_config.grad_accum_steps(run, 1, model_config.runs_on) if run else 8)
  max_tokens = FLAGS.max_tokens if FLAGS.max_tokens is not None else (run.train.eval_tokens if run else 0)
  result = evaluate(params, model_config, tokens, tokenizer, seq_len=seq_len, batch_size=batch_size,
                    max_tokens=max_tokens)
  result.update(workdir=FLAGS.workdir, data=FLAGS.data or f'{FLAGS.split} split', seq_len=seq_len,
                quantize=model_config.quantize or 'none', quantize_head=model_config.quantize_head)
  weights = result['quantize'] + (' (+head)' if result['quantize_head'] else '')
  print(f"| model | weights | data | tokens | loss | perplexity | bits/byte |\n"
        f"|---|---|---|---:|---:|---:|---:|\n"
        f"| {FLAGS.workdir} | {weights} | {result['data']} | {result['tokens']:,} | {result['loss']:.4f} | "
        f"{result['perplexity']:.2f} | {result['bits_per_byte']:.4f} |")
  if 'metacog' in result:
    print('\n' + calibration_table(result))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(_json_safe(result), indent=2) + '\n')
    print(f'wrote {FLAGS.json}', file=sys.stderr)


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A training workdir, or an export directory (model.safetensors + '
                      'tokenizer.json).', required=True)
  flags.DEFINE_string('data', None, 'Sources to score instead of the run\'s split (files, globs, dirs, '
                      'as data.sources); the whole corpus is scored, with the run\'s tokenizer.')
  flags.DEFINE_enum('split', 'val', ['val', 'train'], 'Which split of the run\'s own corpus (no --data).')
  flags.DEFINE_integer('max_tokens', None, 'Targets to score at most; 0 = all; default: the run\'s '
                       'train.eval_tokens.', lower_bound=0)
  flags.DEFINE_integer('seq_len', 0, 'Targets per window; 0 = the run\'s data.seq_len.', lower_bound=0)
  flags.DEFINE_integer('batch_size', 0, 'Windows per batch; 0 = the run\'s micro-batch.', lower_bound=0)
  flags.DEFINE_string('json', None, 'Also write the result as JSON to this path.')
  flags.DEFINE_enum('quantize', None, list(quantize.SCHEMES), 'Weight-only quantization of the projections '
                    'before scoring (int8 per channel, int4 in groups of 128).')
  flags.DEFINE_bool('quantize_head', False, 'With --quantize, quantize the output head too.')


if __name__ == '__main__':
  cli.run('vesper_jax.evaluate', main, define_flags)
