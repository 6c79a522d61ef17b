"""Metacognition: a head that predicts, per token, whether the model's top-1 guess is right (SPEC §9).

On the final-normed hidden states x_BTD (the ones the output head reads), a small MLP

    MetacogHead: D → metacog_hidden → 2      (fc1, GELU, fc2; float32)

gives per token a confidence logit (c = sigmoid(logit) = P(top-1 prediction is correct)) and a predicted
loss ℓ̂ (nats). By default it reads x_BTD behind `stop_gradient`, so the trunk trains exactly as without
it; `model.metacog_trunk_gradient=True` lets the auxiliary loss shape the trunk too.

Training adds `train.metacog_weight · [BCE(c, 1[top-1 = target]) + MSE(ℓ̂, stopgrad(CE))]` (`head_loss`),
averaged over the real (non-padding) targets, to the language-model loss in the same forward pass. A
prediction counts as correct when the target has the highest logit (losses.token_stats: ties count as
correct, so no second pass over the vocabulary is needed).

Measures (`calibration`, host-side numpy in float64): expected calibration error over 15 equal-width bins,
AUROC of the confidence for correctness, Pearson and Spearman correlation of ℓ̂ with the real per-token
loss; the same for the baselines a reader will ask about: the model's own max softmax probability as a
confidence, the predictive entropy as a loss predictor.

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

from vesper_jax.pytree import Path, PyTree, flatten, unflatten

NAME = 'metacog'  # the head's top-level name in the parameter tree (and export: metacog.fc1.weight, ...)
NUM_BINS = 15     # calibration bins (equal width over [0, 1])


class Outputs(NamedTuple):
  """The head's per-token predictions (float32)."""
  confidence_logit_BT: jax.Array  # sigmoid() of it: P(the top-1 prediction is the target)
  predicted_loss_BT: jax.Array    # ℓ̂: the next-token cross-entropy the head expects, nats

  @property
  def confidence_BT(self) -> jax.Array:
    return jax.nn.sigmoid(self.confidence_logit_BT)


class MetacogHead(nn.Module):
  """MLP D → metacog_hidden → 2 on the final hidden states: (confidence logit, predicted loss)."""
  config: 'ModelConfig'

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> Outputs:
    c = self.config
    if not c.metacog_trunk_gradient:  # the head learns from the trunk, never the reverse
      x_BTD = jax.lax.stop_gradient(x_BTD)
    # float32 throughout: the head is tiny, and its outputs are probabilities and losses.
    h_BTU = nn.Dense(c.metacog_hidden, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(0.02), name='fc1')(x_BTD.astype(jnp.float32))
    # The predicted loss starts at ln V, the loss of an untrained model (a uniform prediction): starting
    # at 0 would give the first steps a squared error of ~(ln V)², whose gradient would dominate the
    # global norm that clipping shares with the trunk.
    bias_init = lambda key, shape, dtype: jnp.array([0.0, math.log(c.vocab_size)], dtype)
    out_BT2 = nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32, bias_init=bias_init,
                       kernel_init=nn.initializers.normal(0.02), name='fc2')(jax.nn.gelu(h_BTU))
    return Outputs(out_BT2[..., 0], out_BT2[..., 1])


def validate(config: 'ModelConfig') -> None:
  """Raises ValueError naming the `model.metacog*` key that is out of range."""
  if config.metacog_hidden < 1:
    raise ValueError(f'model.metacog_hidden={config.metacog_hidden} must be >= 1')


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
  count = np.bincount(bins, minlength=num_bins)
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


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given their average rank (as scipy.stats.rankdata's default)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind='mergesort')
  sorted_x = x[order]
  # Runs of equal values share the mean of the ranks they span.
  starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
  run_id = np.cumsum(starts) - 1
  first = np.flatnonzero(starts)
  last = np.r_[first[1:], x.size] - 1
  ranks = np.empty(x.size, np.float64)
  ranks[order] = (first[run_id] + last[run_id]) / 2.0 + 1.0
  return ranks


def auroc(score: np.ndarray, label: np.ndarray) -> float:
  """Area under the ROC curve of `score` for the positives of `label` (ties count one half).

  The Mann-Whitney form: (Σ ranks of positives − n₊(n₊+1)/2) / (n₊·n₋). Undefined when every label is
  the same (an all-correct batch): then NaN, with a RuntimeWarning, never an exception.
  """
  score, label = np.asarray(score, np.float64), np.asarray(label).astype(bool)
  n_pos = int(label.sum())
  n_neg = label.size - n_pos
  if n_pos == 0 or n_neg == 0:
    warnings.warn(f'AUROC is undefined with {n_pos} positive and {n_neg} negative labels: returning NaN',
                  RuntimeWarning, stacklevel=2)
    return float('nan')
  rank_sum = float(np.sum(_ranks(score)[label]))
  return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; NaN (with a RuntimeWarning) when either side is constant or empty."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  dx, dy = x - x.mean() if x.size else x, y - y.mean() if y.size else y
  denom = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
  if not denom > 0:
    warnings.warn('correlation is undefined for a constant or empty input: returning NaN', RuntimeWarning,
                  stacklevel=2)
    return float('nan')
  return float(np.sum(dx * dy)) / denom


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (Pearson of the average ranks, so ties are handled as scipy does)."""
  return pearson(_ranks(x), _ranks(y)) if np.size(x) else pearson(x, y)


def calibration(confidence: np.ndarray, predicted_loss: np.ndarray, correct: np.ndarray, nll: np.ndarray,
                max_prob: np.ndarray, entropy: np.ndarray) -> dict[str, dict]:
  """The head's measures and the baselines', on per-token arrays of the scored (non-padding) targets.

  Returns:
    {'metacog': {ece, auroc, pearson, spearman, mean_confidence, accuracy},
     'baselines': {'max_prob': {ece, auroc}, 'entropy': {pearson, spearman}}}; floats (NaN where a
    measure is undefined, e.g. AUROC when every prediction is right).
  """
  correct = np.asarray(correct, np.float64)
  return {
      'metacog': {
          'ece': expected_calibration_error(confidence, correct),
          'auroc': auroc(confidence, correct),
          'pearson': pearson(predicted_loss, nll),
          'spearman': spearman(predicted_loss, nll),
          'mean_confidence': float(np.mean(confidence)) if np.size(confidence) else float('nan'),
          'accuracy': float(np.mean(correct)) if correct.size else float('nan'),
      },
      'baselines': {
          'max_prob': {'ece': expected_calibration_error(max_prob, correct), 'auroc': auroc(max_prob, correct)},
          'entropy': {'pearson': pearson(entropy, nll), 'spearman': spearman(entropy, nll)},
      },
  }
