"""The scaling-law fit (scaling_fit.py) recovers known constants from synthetic losses."""

import numpy as np
import pytest

from vesper_jax import scaling, scaling_fit

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla's own fit (scaling.py)


def _synthetic(noise: float, seed: int = 0):
  n, d = np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6))
  n, d = n.ravel(), d.ravel()
  law = scaling_fit.LawFit(**TRUE, objective=0.0)
  rng = np.random.default_rng(seed)
  return n, d, law.predict(n, d) * np.exp(noise * rng.standard_normal(n.shape))


def test_recovers_constants_without_noise():
  law = scaling_fit.fit(*_synthetic(noise=0.0), starts=4)
  for key, value in TRUE.items():
    assert getattr(law, key) == pytest.approx(value, rel=1e-3), key


def test_recovers_constants_with_noise_and_bootstrap_intervals():
  n, d, losses = _synthetic(noise=0.003)
  law = scaling_fit.fit(n, d, losses)
  assert law.E == pytest.approx(TRUE['E'], rel=0.05)
  assert law.alpha == pytest.approx(TRUE['alpha'], abs=0.04)
  assert law.beta == pytest.approx(TRUE['beta'], abs=0.04)
  intervals = scaling_fit.bootstrap(n, d, losses, samples=20)
  for key in ('E', 'alpha', 'beta'):
    lo, hi = intervals[key]
    assert lo <= getattr(law, key) <= hi, (key, lo, hi)
    assert hi - lo < 0.1 * TRUE[key], (key, lo, hi)  # 0.3% noise on 36 runs pins each constant
  lo, hi = intervals['n_exponent']
  assert lo <= TRUE['beta'] / (TRUE['alpha'] + TRUE['beta']) + 0.02 and hi >= lo


def test_compute_optimal_matches_the_closed_form():
  """At Chinchilla's constants the optimum is N ∝ C^0.45 and near the 20-tokens-per-parameter rule."""
  law = scaling_fit.LawFit(**TRUE, objective=0.0)
  n1, d1 = scaling_fit.compute_optimal(law, 1e21)
  n2, _ = scaling_fit.compute_optimal(law, 1e23)
  assert np.log(n2 / n1) / np.log(100) == pytest.approx(0.28 / 0.62, rel=1e-6)
  assert 6 * n1 * d1 == pytest.approx(1e21)
  # The loss at the optimum is lower than at 2× or ½× the parameters for the same compute.
  for factor in (0.5, 2.0):
    assert law.predict(n1, d1) < law.predict(n1 * factor, d1 / factor)
  assert 5 < d1 / n1 < 80 and scaling.TOKENS_PER_PARAM == 20.0


def test_too_few_runs_is_an_error():
  with pytest.raises(ValueError, match='at least 5 runs'):
    scaling_fit.fit([1e6, 1e7], [1e8, 1e9], [3.0, 2.5])
