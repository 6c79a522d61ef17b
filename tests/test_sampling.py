"""The sampling filters (sampling.py) against numpy references: top-k, top-p (both methods, ties),
their fused form, the repetition penalty, temperature, and the draw's empirical distribution; the CPU
kernel of top-k, top-p and the draw (kernels/sampling_cpu.cc) against the same references and the XLA
path, and decoding with it in a one-device subprocess."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from vesper_jax import sampling
from vesper_jax.kernels import cpu_kernels
from vesper_jax.kernels import sampling_cpu_ffi


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


def _np_draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
  """`_draw`'s rule in float64: the first token whose running weight exceeds u × total, else the last
  token with weight."""
  tokens = []
  for row, u_row in zip(logits.astype(np.float64), u):
    weights = np.exp(row - row.max())
    above = np.nonzero((weights > 0) & (np.cumsum(weights) > u_row * weights.sum()))[0]
    tokens.append(above[0] if len(above) else np.nonzero(weights > 0)[0][-1])
  return np.array(tokens)


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
  _assert_draws_follow(tokens, want)


def _assert_draws_follow(tokens: np.ndarray, want: np.ndarray) -> None:
  """Tokens drawn from the probabilities `want`: none where want is 0, and a chi-square over the kept
  tokens (expected counts >= 5, the rest pooled) far below the 1e-6 tail."""
  n = len(tokens)
  counts = np.bincount(tokens, minlength=len(want))
  assert counts[want == 0].sum() == 0
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


# ------------------------------------------------------------------------- the CPU sampling kernel
# Called directly here (8 simulated devices: sample_logits itself keeps the XLA path, cpu_kernels.usable).

_needs_kernels = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or not cpu_kernels.available(),
    reason='the CPU kernels did not build here (no C++ compiler, or not a CPU backend): sampling uses the '
           'XLA path, which the tests above check')


def _np_filtered(logits: np.ndarray, k: int, p: float) -> np.ndarray:
  out = logits if k == 0 or k >= logits.shape[-1] else _np_top_k(logits, k)
  return out if p >= 1.0 else _np_top_p(out, p)


def _probe_uniforms(filtered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(row, u, token): for every token the reference keeps, uniforms just inside both ends and at the
  middle of its slice of [0, 1), and the token each must draw. A token kept or removed by mistake
  shifts the slices after it."""
  rows, us, tokens = [], [], []
  for b, row in enumerate(filtered.astype(np.float64)):
    weights = np.exp(row - row.max())
    high = np.cumsum(weights) / weights.sum()
    low = high - weights / weights.sum()
    for v in np.nonzero(weights > 1e-4 * weights.max())[0]:
      width = high[v] - low[v]
      for u in (low[v] + 0.05 * width, low[v] + 0.5 * width, high[v] - 0.05 * width):
        rows.append(b), us.append(u), tokens.append(v)
  return np.array(rows), np.array(us, np.float32), np.array(tokens)


def _kernel_tokens_at(logits: np.ndarray, rows: np.ndarray, us: np.ndarray, k: int, p: float) -> np.ndarray:
  return np.asarray(sampling_cpu_ffi.sample(jnp.asarray(logits[rows]), jnp.asarray(us), k, p))


def _edge_logits(seed: int) -> np.ndarray:
  """Tied logits, -inf entries (the first and last included), and a row with fewer than 50 finite."""
  logits = _random_logits(seed, shape=(5, 300), ties=True)
  rng = np.random.default_rng(seed)
  logits[1, rng.random(300) < 0.3] = -np.inf
  logits[1, [0, 299]] = -np.inf
  logits[2, rng.permutation(300)[:280]] = -np.inf   # 20 finite: top-k 50 keeps them all
  logits[3, :] = 1.5                                 # every token tied
  return logits


@_needs_kernels
@pytest.mark.parametrize('k, p', [(5, 1.0), (50, 1.0), (0, 0.9), (0, 0.05), (50, 0.9), (3, 0.5), (299, 0.99),
                                  (300, 0.9), (1000, 1.0), (0, 1.0)])
def test_kernel_keeps_and_draws_as_numpy(k, p):
  # top-k, top-p, both and neither (k = 0, k >= V, p = 1), with ties, -inf entries and B > 1: each token
  # the reference keeps is drawn across its whole slice of the uniform, and only those are drawn.
  logits = _edge_logits(k + int(p * 100))
  filtered = _np_filtered(logits, k, p)
  rows, us, tokens = _probe_uniforms(filtered)
  np.testing.assert_array_equal(_kernel_tokens_at(logits, rows, us, k, p), tokens)


@_needs_kernels
def test_kernel_check_catches_a_wrong_tie_rule():
  # The check above can fail: a top-k that keeps exactly k tokens (ties with the k-th broken by index)
  # draws other tokens than the kernel for the same uniforms.
  logits = _edge_logits(50 + 90)
  k = 50
  exact_k = logits.astype(np.float64).copy()
  for row in exact_k:
    row[np.argsort(-row, kind='stable')[k:]] = -np.inf
  rows, us, tokens = _probe_uniforms(_np_top_p(exact_k, 0.9))
  assert (_kernel_tokens_at(logits, rows, us, k, 0.9) != tokens).any()


@_needs_kernels
@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('k, p', [(50, 0.9), (40, 0.8), (0, 1.0), (20, 1.0)])
def test_kernel_draws_what_the_xla_path_draws(k, p, ties):
  # With the same key, the kernel, the XLA path ('search' and 'sort') and numpy's `_draw` rule over the
  # reference's filters agree on every row: they differ only where a uniform falls within float
  # rounding of a slice's end, which these rows never do.
  cfg = sampling.SamplingConfig(temperature=0.9, top_k=k, top_p=p)
  seen = jnp.zeros((256, 1000), bool)
  for seed in range(4):
    logits = _random_logits(seed, shape=(256, 1000), ties=ties)
    key = jax.random.key(seed)
    u = sampling._uniform(key, 256)
    scaled = np.asarray(sampling.apply_temperature(jnp.asarray(logits), 0.9))
    kernel = np.asarray(sampling_cpu_ffi.sample(jnp.asarray(scaled), u, k, p))
    np.testing.assert_array_equal(kernel, _np_draw(_np_filtered(scaled, k, p), np.asarray(u)))
    for method in METHODS:
      np.testing.assert_array_equal(
          kernel, np.asarray(sampling.sample_logits(key, jnp.asarray(logits), seen, cfg, method)))
    assert len(set(kernel.tolist())) > 50


@_needs_kernels
def test_kernel_draws_follow_the_filtered_softmax():
  # Chi-square over 20k draws (vmapped: the kernel takes the mapped axis as more rows).
  logits = _random_logits(5, shape=(1, 300), ties=True)
  logits[0, ::7] = -np.inf
  want = np.exp(_np_filtered(logits, 40, 0.9)[0] - logits.max())
  draw = jax.jit(jax.vmap(lambda key: sampling_cpu_ffi.sample(
      jnp.asarray(logits), sampling._uniform(key, 1), 40, 0.9)[0]))
  _assert_draws_follow(np.asarray(draw(jax.random.split(jax.random.key(2), 20000))), want / want.sum())


def test_kernel_is_chosen_for_search_with_top_k_or_without_top_p(monkeypatch):
  # Where it applies (forced here: 8 devices), not for 'sort', greedy, or top-p over the whole vocabulary.
  monkeypatch.setattr(sampling_cpu_ffi, 'supports', lambda x: True)
  logits, seen = jnp.zeros((2, 64)), jnp.zeros((2, 64), bool)

  def lowered(method, **settings):
    f = lambda key, x: sampling.sample_logits(key, x, seen, sampling.SamplingConfig(**settings), method)
    return 'vesper_sample' in jax.jit(f).lower(jax.random.key(0), logits).as_text()

  assert lowered('search') and lowered('search', top_k=0, top_p=1.0) and lowered('search', top_p=1.0)
  assert not lowered('sort') and not lowered('search', temperature=0.0)
  assert not lowered('search', top_k=0) and not lowered('search', top_k=64)
  monkeypatch.setattr(sampling_cpu_ffi, 'supports', lambda x: False)
  assert not lowered('search')


# Run with one device (python -c _ONE_DEVICE REPO): decoding with the default sampling, the kernel as
# sample_logits chooses it (in the lowered step) and with it off: the same tokens.
_ONE_DEVICE = """
import sys
sys.path.insert(0, sys.argv[1] + '/tests')
import jax, jax.numpy as jnp
from conftest import tiny_model_config
from vesper_jax import decode
from vesper_jax.model import init_params
from vesper_jax.kernels import sampling_cpu_ffi
from vesper_jax.sampling import SamplingConfig

assert jax.device_count() == 1, jax.devices()
config = tiny_model_config(vocab_size=512)
params = init_params(config, jax.random.key(0))
supports = sampling_cpu_ffi.supports
state, _ = decode.prefill(params, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                          jax.random.key(0), config=config, sampling=SamplingConfig(), eos_id=None,
                          cache_len=8)
step = lambda: decode.decode_step.lower(params, state, config=config, sampling=SamplingConfig(),
                                        eos_id=None).as_text()
assert 'vesper_sample' in step()

def run(supports_now):
  sampling_cpu_ffi.supports = supports_now
  jax.clear_caches()  # decode's jitted functions trace again, and choose again
  return decode.generate(params, config, [[5, 17, 300, 42, 7], [9, 8]], max_new_tokens=40, seed=3,
                         chunk_size=8)

with_kernel = run(supports)
without = run(lambda x: False)
assert 'vesper_sample' not in step()
assert with_kernel == without and len(set(without[0] + without[1])) > 20, (with_kernel, without)
print('checked', sum(map(len, without)), 'tokens')
"""


@_needs_kernels
def test_decode_with_kernel_on_one_device_draws_the_xla_tokens():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _ONE_DEVICE, str(REPO)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('checked ')
