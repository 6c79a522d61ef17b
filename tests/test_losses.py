"""Cross-entropy and predictive entropy against a float64 numpy reference (SPEC §3, §8)."""

import jax
import numpy as np
import pytest

from vesper_jax import losses


def _numpy_reference(logits, targets, weights):
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  ent = -(np.exp(logp) * logp).sum(-1)
  return (nll * weights).sum() / weights.sum(), (ent * weights).sum() / weights.sum()


def test_matches_float64_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(3, 7, 50)) * 4).astype(np.float32)
  targets = rng.integers(0, 50, size=(3, 7))
  weights = (rng.random((3, 7)) < 0.7).astype(np.float32)
  loss, entropy = losses.cross_entropy_and_entropy(logits, targets, weights)
  want_loss, want_entropy = _numpy_reference(logits, targets, weights)
  np.testing.assert_allclose([float(loss), float(entropy)], [want_loss, want_entropy], rtol=1e-5)
  # Padded positions carry no weight: changing their logits or targets changes nothing.
  pad = weights == 0
  assert pad.any()
  logits2 = np.where(pad[..., None], rng.normal(size=logits.shape) * 9, logits).astype(np.float32)
  targets2 = np.where(pad, (targets + 1) % 50, targets)
  again = losses.cross_entropy_and_entropy(logits2, targets2, weights)
  assert (float(again[0]), float(again[1])) == (float(loss), float(entropy))
  # No weights = every target is real.
  unweighted = losses.cross_entropy_and_entropy(logits, targets)
  np.testing.assert_allclose([float(x) for x in unweighted],
                             _numpy_reference(logits, targets, np.ones((3, 7))), rtol=1e-5)


def test_uniform_logits_give_ln_v_and_all_padding_gives_zero_not_nan():
  logits = np.zeros((2, 4, 64), np.float32)
  targets = np.zeros((2, 4), np.int32)
  loss, entropy = losses.cross_entropy_and_entropy(logits, targets)
  np.testing.assert_allclose([float(loss), float(entropy)], [np.log(64)] * 2, rtol=1e-6)
  loss, entropy = jax.jit(losses.cross_entropy_and_entropy)(logits, targets, np.zeros((2, 4)))
  assert (float(loss), float(entropy)) == (0.0, 0.0)


def test_gradient_matches_float64_finite_differences():
  # The loss has a hand-written backward (one elementwise pass over the logits): check it against
  # central differences of the float64 reference, through both outputs and with padded positions.
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(2, 3, 11)) * 3).astype(np.float32)
  targets = rng.integers(0, 11, size=(2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  mix = lambda loss, entropy: loss + 0.37 * entropy  # Velvet reads both: both gradients must be right

  grad = jax.grad(lambda z: mix(*losses.cross_entropy_and_entropy(z, targets, weights)))(logits)
  want = np.zeros(logits.shape)
  z64, eps = logits.astype(np.float64), 1e-6
  for i in np.ndindex(*logits.shape):
    up, down = z64.copy(), z64.copy()
    up[i] += eps
    down[i] -= eps
    want[i] = (mix(*_numpy_reference(up, targets, weights))
               - mix(*_numpy_reference(down, targets, weights))) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)
  assert not np.asarray(grad)[weights == 0].any()  # padded positions get no gradient


@pytest.mark.parametrize('with_bias', [False, True])
def test_fused_head_equals_logits_then_loss(monkeypatch, with_bias):
  # The head applied inside the loss, in chunks, with the gradients computed in the forward pass: same
  # loss, entropy and gradients (hidden states, kernel, bias) as materialising the logits first.
  monkeypatch.setattr(losses, 'HEAD_CHUNK_TOKENS', 6)  # 3 rows × 2 positions: 4 chunks of T = 8
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 8, 16)).astype(np.float32)
  kernel = (rng.normal(size=(16, 50)) * 0.5).astype(np.float32)
  bias = rng.normal(size=(50,)).astype(np.float32) if with_bias else None
  targets = rng.integers(0, 50, size=(3, 8))
  weights = (rng.random((3, 8)) < 0.7).astype(np.float32)

  def unfused(x, kernel, bias):
    return losses.cross_entropy_and_entropy(x @ kernel + (0 if bias is None else bias), targets, weights)

  def fused(x, kernel, bias):
    return losses.head_cross_entropy_and_entropy(x, kernel, bias, targets, weights)

  np.testing.assert_allclose(jax.jit(fused)(x, kernel, bias), unfused(x, kernel, bias), rtol=1e-6)
  argnums = (0, 1, 2) if with_bias else (0, 1)
  got = jax.grad(lambda *a: 3.0 * fused(*a)[0], argnums)(x, kernel, bias)
  want = jax.grad(lambda *a: 3.0 * unfused(*a)[0], argnums)(x, kernel, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  # The entropy is a signal, not an objective: it carries no gradient.
  assert not np.asarray(jax.grad(lambda x: fused(x, kernel, bias)[1])(x)).any()
