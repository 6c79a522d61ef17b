"""The sampling filters (sampling.py) against numpy references: top-k, top-p (both methods, ties),
their fused form, the repetition penalty, temperature, and the draw's empirical distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesper_jax import sampling


# ------------------------------------------------------------------------------ numpy references

def _np_top_k(logits: np.ndarray, k: int) -> np.ndarray:
  out = logits.astype(np.float64).copy()
  for row in out:
    kth = np.sort(row)[::-1][k - 1]
    row[row < kth] = -np.inf
  return out


def _np_top_p(logits: np.ndarray, p: float) -> np.ndarray:
  """Walk the tokens from most to least likely until the mass reaches p; keep all as likely as the last."""
  out = logits.astype(np.float64).copy()
  for row in out:
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    mass, threshold = 0.0, None
    for prob in sorted(probs, reverse=True):
      threshold = prob
      mass += prob
      if mass >= p:
        break
    row[probs < threshold] = -np.inf  # tied tokens have bit-identical probabilities
  return out


def _np_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
  out = logits.astype(np.float64).copy()
  for b, v in zip(*np.nonzero(seen)):
    out[b, v] = out[b, v] / penalty if out[b, v] > 0 else out[b, v] * penalty
  return out


def _random_logits(seed: int, shape=(6, 300), ties: bool = False) -> np.ndarray:
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2.0, shape).astype(np.float32)
  if ties:
    # Round to a coarse grid so many tokens share a logit, the top ones included.
    logits = np.round(logits * 2) / 2
  return logits


def _kept(logits) -> np.ndarray:
  return np.isfinite(np.asarray(logits))


METHODS = ['sort', 'search']


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('k', [1, 5, 50, 299, 300, 0])
def test_top_k_matches_numpy(k, ties, method):
  logits = _random_logits(k, ties=ties)
  got = sampling.top_k_filter(jnp.asarray(logits), k, method)
  want = logits if k == 0 else _np_top_k(logits, k)
  np.testing.assert_array_equal(_kept(got), _kept(want))
  np.testing.assert_array_equal(np.asarray(got)[_kept(got)], logits[_kept(want)])
  if ties and 0 < k < 300:
    assert (_kept(got).sum(axis=1) >= k).all()  # ties with the k-th are kept: at least k survive


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('p', [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_numpy(p, ties, method):
  logits = _random_logits(int(p * 1000), ties=ties)
  got = sampling.top_p_filter(jnp.asarray(logits), p, method)
  want = _np_top_p(logits, p)
  np.testing.assert_array_equal(_kept(got), _kept(want))
  np.testing.assert_array_equal(np.asarray(got)[_kept(got)], logits[_kept(want)])
  if p == 1.0:
    assert _kept(got).all()


@pytest.mark.parametrize('method', METHODS)
def test_top_p_keeps_tied_tokens_together(method):
  # Four tokens of 0.2 each and two of 0.1: p = 0.3 is reached inside the tie, so all four stay.
  logits = np.log(np.array([[0.2, 0.1, 0.2, 0.2, 0.1, 0.2]], np.float32))
  np.testing.assert_array_equal(_kept(sampling.top_p_filter(jnp.asarray(logits), 0.3, method)),
                                [[True, False, True, True, False, True]])
  # The top token alone suffices when it holds p.
  np.testing.assert_array_equal(
      _kept(sampling.top_p_filter(jnp.asarray(logits[:, [0, 1]] * 3), 0.1, method)), [[True, False]])


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('k, p', [(5, 0.5), (50, 0.9), (50, 0.99), (3, 0.9999)])
def test_fused_top_k_top_p_matches_numpy(k, p, ties):
  logits = _random_logits(k, ties=ties)
  got = sampling._top_k_top_p_sorted(jnp.asarray(logits), k, p)
  want = _np_top_p(_np_top_k(logits, k), p)
  np.testing.assert_array_equal(_kept(got), _kept(want))


def test_ordered_bits_preserve_float_order():
  x = np.array([[-np.inf, -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.0, 3e38, np.inf]], np.float32)
  keys = np.asarray(sampling._ordered_bits(jnp.asarray(x)))[0].astype(np.int64)
  np.testing.assert_array_equal(np.diff(keys) > 0, [True] * 5 + [False] + [True] * 5)
  assert keys[5] == keys[6]  # -0.0 == 0.0, as comparisons (and lax.top_k, sort) have it


@pytest.mark.parametrize('method', METHODS)
def test_negative_zero_ties_with_zero(method):
  """Compiled as a whole (jit), where a compiler could fold a `x + 0.0` away: both zeros are kept."""
  logits = jnp.asarray([[0.0, -0.0, -1.0, -2.0], [-0.0, 0.0, -3.0, 1.0]], jnp.float32)
  kept = lambda k: _kept(jax.jit(lambda x: sampling.top_k_filter(x, k, method))(logits))
  np.testing.assert_array_equal(kept(1)[0], [True, True, False, False])
  np.testing.assert_array_equal(kept(2)[1], [True, True, False, True])


@pytest.mark.parametrize('penalty', [1.0, 1.3, 0.7])
def test_repetition_penalty_matches_numpy(penalty):
  logits = _random_logits(7)
  seen = np.random.default_rng(8).random(logits.shape) < 0.3
  got = sampling.repetition_penalty_filter(jnp.asarray(logits), jnp.asarray(seen), penalty)
  np.testing.assert_allclose(np.asarray(got), _np_repetition_penalty(logits, seen, penalty), rtol=1e-6)
  if penalty > 1:
    assert (np.asarray(got) <= logits + 1e-7).all()  # a penalty never makes a seen token more likely


@pytest.mark.parametrize('method', METHODS)
def test_sample_logits_draws_from_the_filtered_distribution(method):
  """The filters compose in order (penalty, temperature, top-k, top-p): empirical frequencies match."""
  logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 1.9]], np.float32)
  seen = np.array([[False, False, False, False, False, False, True]])
  cfg = sampling.SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.5)
  want = _np_repetition_penalty(logits, seen, 1.5) / 0.7
  want = _np_top_p(_np_top_k(want, 5), 0.9)[0]
  want = np.exp(want - want.max())
  want /= want.sum()
  n = 20000
  draw = jax.jit(jax.vmap(lambda key: sampling.sample_logits(key, jnp.asarray(logits), jnp.asarray(seen),
                                                             cfg, method)[0]))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
  freq = np.bincount(tokens, minlength=logits.shape[1]) / n
  np.testing.assert_allclose(freq, want, atol=0.015)
  assert freq[want == 0].sum() == 0  # filtered tokens are never drawn


@pytest.mark.parametrize('field', ['temperature', 'top_p', 'repetition_penalty'])
def test_non_finite_sampling_settings_are_refused(field):
  with pytest.raises(ValueError, match=f'{field}=nan must be a finite number'):
    sampling.SamplingConfig(**{field: float('nan')})


def test_sampling_config_rejects_bad_values():
  with pytest.raises(ValueError, match='top_p'):
    sampling.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match='temperature'):
    sampling.SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match='top_k'):
    sampling.SamplingConfig(top_k=-1)
  with pytest.raises(ValueError, match='repetition_penalty'):
    sampling.SamplingConfig(repetition_penalty=0.0)
  with pytest.raises(ValueError, match="method='heap'"):
    sampling.top_k_filter(jnp.zeros((1, 8)), 3, 'heap')


def test_temperature_zero_is_the_argmax_after_the_penalty():
  logits = np.array([[1.0, 3.0, 2.9, -1.0], [0.5, -2.0, 0.4, 0.1]], np.float32)
  seen = np.array([[False, True, False, False], [False, False, False, False]])
  keys = jax.random.split(jax.random.key(0), 5)
  greedy = [np.asarray(sampling.sample_logits(k, jnp.asarray(logits), jnp.asarray(seen), sampling.GREEDY))
            for k in keys]
  assert all(g.tolist() == [1, 0] for g in greedy)  # the key plays no part
  penalized = sampling.SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.5)
  # 3.0 / 1.5 = 2.0 < 2.9: the penalty moves the argmax of the first row, not of the second.
  got = sampling.sample_logits(keys[0], jnp.asarray(logits), jnp.asarray(seen), penalized)
  assert np.asarray(got).tolist() == [2, 0]
  np.testing.assert_allclose(np.asarray(sampling.apply_temperature(jnp.asarray(logits), 0.5)), logits * 2)


def test_both_methods_draw_the_same_tokens():
  """Same kept set, same key: 'sort' and 'search' must draw identical tokens (ties included)."""
  logits = jnp.asarray(_random_logits(11, shape=(64, 300), ties=True))
  seen = jnp.zeros(logits.shape, bool)
  cfg = sampling.SamplingConfig(temperature=0.9, top_k=40, top_p=0.8)
  draws = {m: np.asarray(sampling.sample_logits(jax.random.key(4), logits, seen, cfg, m)) for m in METHODS}
  np.testing.assert_array_equal(draws['sort'], draws['search'])
  assert len(set(draws['sort'].tolist())) > 10  # the rows really drew different tokens


@pytest.mark.parametrize('V', [7, 300, 1000])
def test_draw_matches_softmax_and_never_draws_removed_tokens(V):
  """The inverse-CDF draw (one uniform per row, blocks of _DRAW_BLOCK) against softmax probabilities:
  chi-square over 20k draws, V across one block, several, and a ragged last block; -inf never drawn."""
  rng = np.random.default_rng(V)
  logits = rng.normal(0, 1.0, (1, V)).astype(np.float32)
  logits[0, rng.random(V) < 0.5] = -np.inf  # removed tokens, the first and last included
  logits[0, [0, V - 1]] = -np.inf
  logits[0, V // 2] = 0.5  # at least one kept token
  want = np.exp(logits[0].astype(np.float64) - np.nanmax(logits[0]))
  want /= want.sum()
  n = 20000
  draw = jax.jit(jax.vmap(lambda key: sampling._draw(key, jnp.asarray(logits))[0]))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(1), n)))
  counts = np.bincount(tokens, minlength=V)
  assert counts[want == 0].sum() == 0
  # Chi-square over the kept tokens (expected counts >= 5, the rest pooled): far below the 1e-6 tail.
  big = want * n >= 5
  observed = np.append(counts[big], counts[~big & (want > 0)].sum())
  expected = np.append(want[big] * n, want[~big & (want > 0)].sum() * n)
  keep = expected > 0
  chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
  dof = keep.sum() - 1
  assert chi2 < dof + 7 * np.sqrt(2 * dof) + 25, (chi2, dof)


def test_draw_is_deterministic_per_key_and_varies_across_keys():
  logits = jnp.asarray(_random_logits(3, shape=(4, 16384)))
  a = np.asarray(sampling._draw(jax.random.key(7), logits))
  np.testing.assert_array_equal(a, np.asarray(sampling._draw(jax.random.key(7), logits)))
  others = {tuple(np.asarray(sampling._draw(jax.random.key(s), logits)).tolist()) for s in range(8)}
  assert len(others) > 1


def test_draw_handles_a_single_kept_token_in_any_block():
  """One finite logit (greedy-like rows): it is the token drawn, wherever it sits, whatever the key."""
  V = 1000
  for position in [0, 127, 128, 999]:
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, position] = 3.0
    for seed in range(5):
      assert int(sampling._draw(jax.random.key(seed), jnp.asarray(logits))[0]) == position
