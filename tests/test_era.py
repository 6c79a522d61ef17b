"""ERA against SiLU, per-token independence and a float64 numpy reference (SPEC §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesper_jax.era import era, gate_entropy


def _era_numpy(x: np.ndarray, temperature: float, weight: float) -> np.ndarray:
  """SPEC §4 written out in float64 with the textbook entropy −p·ln p − (1−p)·ln(1−p)."""
  x = x.astype(np.float64)
  z = x / temperature
  p = 1.0 / (1.0 + np.exp(-z))
  ent = -(p * np.log(p) + (1 - p) * np.log1p(-p))
  h = ent.mean(axis=-1, keepdims=True) / np.log(2.0)
  return x * p * (1 + weight * h)


def test_era_without_entropy_is_silu():
  x = jax.random.normal(jax.random.key(0), (4, 7, 33)) * 3
  np.testing.assert_array_equal(np.asarray(era(x, 1.0, 0.0)), np.asarray(jax.nn.silu(x)))


@pytest.mark.parametrize('temperature,weight', [(1.0, 0.1), (0.5, 0.3), (2.0, 1.0)])
def test_era_matches_float64_numpy(temperature, weight):
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 5, 64)) * 4, np.float32)
  got = np.asarray(era(jnp.asarray(x), temperature, weight))
  np.testing.assert_allclose(got, _era_numpy(x, temperature, weight), rtol=2e-6, atol=1e-6)


def test_gate_entropy_is_in_unit_interval_and_maximal_at_zero():
  x = jnp.concatenate([jnp.zeros((1, 8)), jnp.full((1, 8), 40.0)], axis=0)
  h = np.asarray(gate_entropy(x))
  np.testing.assert_allclose(h[0], 1.0, rtol=1e-6)  # sigmoid(0) = 1/2: one full bit
  assert 0.0 <= h[1] < 1e-12


def test_era_tokens_are_independent():
  x = jax.random.normal(jax.random.key(2), (2, 6, 32))
  y = era(x)
  x2 = x.at[1, 3].set(100.0)  # change one token's hidden state
  y2 = era(x2)
  changed = np.any(np.asarray(y) != np.asarray(y2), axis=-1)
  expected = np.zeros((2, 6), bool)
  expected[1, 3] = True
  np.testing.assert_array_equal(changed, expected)


def test_detached_entropy_changes_only_the_gradient():
  x = jax.random.normal(jax.random.key(3), (2, 16))
  np.testing.assert_array_equal(np.asarray(era(x, detach_entropy=True)), np.asarray(era(x)))
  g = jax.grad(lambda v: era(v).sum())(x)
  g_det = jax.grad(lambda v: era(v, detach_entropy=True).sum())(x)
  assert not np.allclose(np.asarray(g), np.asarray(g_det))
