"""Metacognition: a head that predicts, per token, whether the model's top-1 guess is right (SPEC §9).

A small MLP

    MetacogHead: inputs → metacog_hidden → 2      (fc1, GELU, fc2; float32)

gives per token a confidence logit (c = sigmoid(logit) = P(top-1 prediction is correct)) and a predicted
loss ℓ̂ (nats). `model.metacog_inputs` chooses what it reads:

    'hidden'  the final-normed hidden states x_BTD (the ones the output head reads): D inputs
    'stats'   what the output layer already knows about its own prediction, per token: the max
              probability p₁, log p₁, the predictive entropy (nats) and the top-1/top-2 margin
              z₁ − z₂ = log p₁ − log p₂: NUM_STATS inputs
    'both'    the two, concatenated: D + NUM_STATS inputs

A head on the hidden states alone has to re-derive what the softmax has already computed (and lost to
the max softmax probability when it did: README, Metacognition); the statistics come from the pass that
produces the loss (losses.py: the chunked head, or the logits), so they cost no second softmax. With
them the head's outputs are corrections: confidence logit = logit(p₁) + out₀, ℓ̂ = entropy + out₁, so
it starts where the max probability and the entropy are and learns what they get wrong. Both
inputs sit behind `stop_gradient`, so the trunk trains exactly as without the head;
`model.metacog_trunk_gradient=True` lets the auxiliary loss reach the hidden states (never the
statistics: they are a reading of the prediction, not an objective for it).

Training adds `train.metacog_weight · [BCE(c, 1[top-1 = target]) + MSE(ℓ̂, stopgrad(CE))]` (`head_loss`),
averaged over the real (non-padding) targets, to the language-model loss in the same forward pass. A
prediction counts as correct when the target has the highest logit (losses.token_stats: ties count as
correct, so no second pass over the vocabulary is needed).

Measures (`calibration`, host-side numpy and scipy in float64): expected calibration error over 15
equal-width bins, AUROC of the confidence for correctness, the selective-prediction view (the risk–coverage
curve: the error rate of the tokens kept when only the most confident are; its area, AURC, lower is
better) and the Brier score, Pearson and Spearman correlation of ℓ̂ with the real per-token loss; the same
for the baselines a reader will ask about: the model's own max softmax probability as a confidence, the
predictive entropy as a loss predictor (and, negated, as a ranking for selective prediction).

Shape suffixes follow the package's key (model.py). This module never imports model (model builds the
head from here); annotations name 'ModelConfig' as a string, as flylora.py does.
"""

import math
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from vesper_jax.pytree import Path, PyTree, flatten, unflatten

NAME = 'metacog'  # the head's top-level name in the parameter tree (and export: metacog.fc1.weight, ...)
NUM_BINS = 15     # calibration bins (equal width over [0, 1])
INPUTS = ('hidden', 'stats', 'both')  # model.metacog_inputs
NUM_STATS = 4     # p₁, log p₁, entropy, margin: the head's inputs from the predicted distribution


class Outputs(NamedTuple):
  """The head's per-token predictions (float32)."""
  confidence_logit_BT: jax.Array  # sigmoid() of it: P(the top-1 prediction is the target)
  predicted_loss_BT: jax.Array    # ℓ̂: the next-token cross-entropy the head expects, nats

  @property
  def confidence_BT(self) -> jax.Array:
    return jax.nn.sigmoid(self.confidence_logit_BT)


def uses_stats(config: 'ModelConfig') -> bool:
  """Whether the head reads the predicted distribution's statistics (model.metacog_inputs)."""
  return config.metacog and config.metacog_inputs in ('stats', 'both')


def num_inputs(config: 'ModelConfig') -> int:
  """The head's input width (fc1's input features)."""
  return {'hidden': config.d_model, 'stats': NUM_STATS, 'both': config.d_model + NUM_STATS}[
      config.metacog_inputs]


def stat_features(stats: dict[str, jax.Array]) -> jax.Array:
  """[..., NUM_STATS] float32: p₁, log p₁, entropy, margin, from losses' per-token statistics."""
  max_prob = stats['max_prob'].astype(jnp.float32)
  # log p₁ spreads out the low-confidence end, where most of a small model's tokens are; p₁ > 0 always
  # (it is at least 1/V), the floor only guards a float32 underflow.
  features = (max_prob, jnp.log(jnp.maximum(max_prob, 1e-30)), stats['entropy'], stats['margin'])
  return jax.lax.stop_gradient(jnp.stack([f.astype(jnp.float32) for f in features], axis=-1))


class MetacogHead(nn.Module):
  """MLP inputs → metacog_hidden → 2 (model.metacog_inputs): (confidence logit, predicted loss)."""
  config: 'ModelConfig'

  @nn.compact
  def __call__(self, x_BTD: jax.Array, stats: dict[str, jax.Array] | None = None) -> Outputs:
    """Args:
      x_BTD: the final-normed hidden states.
      stats: per token, 'max_prob', 'entropy' and 'margin' of the predicted distribution (losses.py);
        needed unless model.metacog_inputs == 'hidden' (otherwise ignored).
    """
    c = self.config
    if not c.metacog_trunk_gradient:  # the head learns from the trunk, never the reverse
      x_BTD = jax.lax.stop_gradient(x_BTD)
    parts = []
    if c.metacog_inputs in ('hidden', 'both'):
      parts.append(x_BTD.astype(jnp.float32))
    if c.metacog_inputs in ('stats', 'both'):
      if stats is None:
        raise ValueError(f'model.metacog_inputs={c.metacog_inputs!r}: the head needs the predicted '
                         'distribution\'s statistics (max_prob, entropy, margin)')
      parts.append(stat_features(stats))
    inputs_BTI = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    # float32 throughout: the head is tiny, and its outputs are probabilities and losses.
    h_BTU = nn.Dense(c.metacog_hidden, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(0.02), name='fc1')(inputs_BTI)
    # The predicted loss starts at ln V, the loss of an untrained model (a uniform prediction): starting
    # at 0 would give the first steps a squared error of ~(ln V)², whose gradient would dominate the
    # global norm that clipping shares with the trunk. With the statistics it starts from the entropy
    # instead (below), and both outputs from 0.
    start = 0.0 if uses_stats(c) else math.log(c.vocab_size)
    bias_init = lambda key, shape, dtype: jnp.array([0.0, start], dtype)
    out_BT2 = nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32, bias_init=bias_init,
                       kernel_init=nn.initializers.normal(0.02), name='fc2')(jax.nn.gelu(h_BTU))
    if not uses_stats(c):
      return Outputs(out_BT2[..., 0], out_BT2[..., 1])
    # With the statistics the head predicts corrections to the softmax's own answers: the confidence
    # logit is logit(p₁) + its first output, ℓ̂ is the entropy (the expected loss if the softmax is
    # calibrated) + its second. It starts where the max probability and the entropy are, and learns only
    # what they get wrong.
    max_prob = jnp.clip(jax.lax.stop_gradient(stats['max_prob']).astype(jnp.float32), 1e-7, 1.0 - 1e-7)
    logit_BT = jnp.log(max_prob) - jnp.log1p(-max_prob)
    entropy_BT = jax.lax.stop_gradient(stats['entropy']).astype(jnp.float32)
    return Outputs(logit_BT + out_BT2[..., 0], entropy_BT + out_BT2[..., 1])


def validate(config: 'ModelConfig') -> None:
  """Raises ValueError naming the `model.metacog*` key that is out of range."""
  if config.metacog_hidden < 1:
    raise ValueError(f'model.metacog_hidden={config.metacog_hidden} must be >= 1')
  if config.metacog_inputs not in INPUTS:
    raise ValueError(f'model.metacog_inputs={config.metacog_inputs!r}: expected one of {INPUTS}')


def apply(config: 'ModelConfig', params: PyTree, x_BTD: jax.Array,
          stats: dict[str, jax.Array] | None) -> Outputs:
  """The head of a model's parameter tree (`params[NAME]`) on hidden states and statistics computed
  outside the model (the train step's chunked loss, evaluation's logits): the same module VesperLM
  applies with `with_metacog=True`."""
  return MetacogHead(config).apply({'params': params[NAME]}, x_BTD, stats)


def is_head_path(path: Path) -> bool:
  """Whether a parameter path belongs to the metacognition head."""
  return bool(path) and path[0] == NAME


def head_trainable(trainable: PyTree) -> PyTree:
  """A trainable mask (flylora.trainable_mask) with the head's leaves switched on: fine-tuning with
  adapters trains the head too while the base stays frozen."""
  flat = flatten(trainable)
  return unflatten({k: v or is_head_path(k) for k, v in flat.items()})


# ------------------------------------------------------------------------------------------ training

def head_loss(outputs: Outputs, correct_BT: jax.Array, nll_BT: jax.Array,
              weights_BT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BCE(c, correct) + MSE(ℓ̂, nll), each averaged over the weighted targets (the weight λ is the caller's).

  Args:
    outputs: the head's predictions.
    correct_BT: 1.0 where the top-1 prediction is the target (losses.token_stats), else 0.0.
    nll_BT: the real per-token cross-entropy; used under stop_gradient (a target, not an objective).
    weights_BT: 1 for real targets, 0 for padding.
  Returns:
    (loss, {'meta_bce', 'meta_mse'}): float32 scalars.
  """
  correct_BT = jax.lax.stop_gradient(correct_BT.astype(jnp.float32))
  nll_BT = jax.lax.stop_gradient(nll_BT.astype(jnp.float32))
  if weights_BT is None:
    weights_BT = jnp.ones_like(nll_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(weights_BT), 1.0)
  z_BT = outputs.confidence_logit_BT
  # BCE with logits, in its stable form: max(z, 0) − z·y + log(1 + e^−|z|).
  bce_BT = jnp.maximum(z_BT, 0.0) - z_BT * correct_BT + jnp.log1p(jnp.exp(-jnp.abs(z_BT)))
  mse_BT = jnp.square(outputs.predicted_loss_BT - nll_BT)
  bce, mse = jnp.sum(bce_BT * weights_BT) / denom, jnp.sum(mse_BT * weights_BT) / denom
  return bce + mse, {'meta_bce': bce, 'meta_mse': mse}


# ------------------------------------------------------------------------------------------ measures

def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, num_bins: int = NUM_BINS) -> float:
  """Σ_bins (n_b / n)·|accuracy_b − mean confidence_b| over `num_bins` equal-width bins of [0, 1].

  Bin b holds confidences in [b/n, (b+1)/n) (the last bin includes 1.0). NaN for no tokens.
  """
  confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  if confidence.size == 0:
    return float('nan')
  bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
  conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
  acc_sum = np.bincount(bins, weights=correct, minlength=num_bins)
  return float(np.sum(np.abs(acc_sum - conf_sum)) / confidence.size)


def reliability(confidence: np.ndarray, correct: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, list]:
  """Per bin: the count, mean confidence and accuracy (NaN where empty): a reliability diagram's data."""
  confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_conf = np.bincount(bins, weights=confidence, minlength=num_bins) / count
    accuracy = np.bincount(bins, weights=correct, minlength=num_bins) / count
  return {'edges': np.linspace(0.0, 1.0, num_bins + 1).tolist(), 'count': count.tolist(),
          'confidence': mean_conf.tolist(), 'accuracy': accuracy.tolist()}


def auroc(score: np.ndarray, label: np.ndarray) -> float:
  """Area under the ROC curve of `score` for the positives of `label` (ties count one half).

  The Mann-Whitney U of the positives' scores against the negatives' (scipy), over n₊·n₋. Undefined when
  every label is the same (an all-correct batch): then NaN, with a RuntimeWarning, never an exception.
  """
  score, label = np.asarray(score, np.float64), np.asarray(label).astype(bool)
  n_pos = int(label.sum())
  n_neg = label.size - n_pos
  if n_pos == 0 or n_neg == 0:
    warnings.warn(f'AUROC is undefined with {n_pos} positive and {n_neg} negative labels: returning NaN',
                  RuntimeWarning, stacklevel=2)
    return float('nan')
  u = scipy.stats.mannwhitneyu(score[label], score[~label], alternative='two-sided', method='asymptotic',
                               use_continuity=False).statistic
  return float(u) / (n_pos * n_neg)


def _defined(x: np.ndarray, y: np.ndarray) -> bool:
  if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    warnings.warn('correlation is undefined for a constant or empty input: returning NaN', RuntimeWarning,
                  stacklevel=3)
    return False
  return True


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation (scipy); NaN (with a RuntimeWarning) when either side is constant or empty."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(scipy.stats.pearsonr(x, y).statistic) if _defined(x, y) else float('nan')


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (scipy: average ranks for ties); NaN as `pearson`."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(scipy.stats.spearmanr(x, y).statistic) if _defined(x, y) else float('nan')


def brier(confidence: np.ndarray, correct: np.ndarray) -> float:
  """Mean squared error of the confidence against correctness (0 is perfect); NaN for no tokens."""
  confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  return float(np.mean(np.square(confidence - correct))) if confidence.size else float('nan')


def _expected_errors(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
  """errors[k − 1]: the expected number of wrong predictions among the k most confident tokens.

  Tokens of equal confidence are in no order, so within a run of ties the errors are spread evenly (the
  expectation over the run's orderings): the curve does not depend on how a sort breaks ties.
  """
  order = np.argsort(-confidence, kind='stable')
  c, wrong = confidence[order], 1.0 - correct[order]
  starts = np.r_[True, c[1:] != c[:-1]]
  run = np.cumsum(starts) - 1
  first = np.flatnonzero(starts)
  size = np.diff(np.r_[first, c.size])
  run_wrong = np.add.reduceat(wrong, first)
  before = np.r_[0.0, np.cumsum(run_wrong)[:-1]]  # errors in the runs ahead of each run
  k = np.arange(1, c.size + 1)
  return before[run] + (k - first[run]) * (run_wrong / size)[run]


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
  """Area under the risk–coverage curve (lower is better): keep the k most confident tokens, the risk
  is their error rate; the mean of that risk over k = 1..n. NaN for no tokens."""
  confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  if confidence.size == 0:
    return float('nan')
  return float(np.mean(_expected_errors(confidence, correct) / np.arange(1, confidence.size + 1)))


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, points: int = 100) -> dict[str, list]:
  """The risk–coverage curve at `points` coverages (k/n, k = ⌈n·i/points⌉): selective prediction's view,
  the error rate of the tokens kept when only the most confident are kept (a plot's data)."""
  confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  n = confidence.size
  if n == 0:
    return {'coverage': [], 'risk': []}
  k = np.unique(np.maximum(np.ceil(n * np.arange(1, points + 1) / points).astype(np.int64), 1))
  risk = _expected_errors(confidence, correct)[k - 1] / k
  return {'coverage': (k / n).tolist(), 'risk': risk.tolist()}


def _confidence_measures(confidence: np.ndarray, correct: np.ndarray) -> dict:
  return {'ece': expected_calibration_error(confidence, correct), 'auroc': auroc(confidence, correct),
          'aurc': aurc(confidence, correct), 'brier': brier(confidence, correct),
          'risk_coverage': risk_coverage(confidence, correct)}


def calibration(confidence: np.ndarray, predicted_loss: np.ndarray, correct: np.ndarray, nll: np.ndarray,
                max_prob: np.ndarray, entropy: np.ndarray) -> dict[str, dict]:
  """The head's measures and the baselines', on per-token arrays of the scored (non-padding) targets.

  Returns:
    {'metacog': {ece, auroc, aurc, brier, risk_coverage, pearson, spearman, mean_confidence, accuracy},
     'baselines': {'max_prob': {ece, auroc, aurc, brier, risk_coverage},
                   'entropy': {aurc, risk_coverage, pearson, spearman}}}; floats (NaN where a measure is
    undefined, e.g. AUROC when every prediction is right), risk_coverage as `risk_coverage`. The entropy ranks
    tokens for selective prediction by −entropy (AURC); it is no probability, so it has no ECE or Brier.
  """
  correct = np.asarray(correct, np.float64)
  entropy = np.asarray(entropy, np.float64)
  return {
      'metacog': {
          **_confidence_measures(confidence, correct),
          'pearson': pearson(predicted_loss, nll),
          'spearman': spearman(predicted_loss, nll),
          'mean_confidence': float(np.mean(confidence)) if np.size(confidence) else float('nan'),
          'accuracy': float(np.mean(correct)) if correct.size else float('nan'),
      },
      'baselines': {
          'max_prob': _confidence_measures(max_prob, correct),
          'entropy': {'aurc': aurc(-entropy, correct), 'risk_coverage': risk_coverage(-entropy, correct),
                      'pearson': pearson(entropy, nll), 'spearman': spearman(entropy, nll)},
      },
  }
