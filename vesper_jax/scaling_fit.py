"""Fitting a scaling law to one's own runs: L(N, D) = E + A/N^α + B/D^β (Chinchilla's approach 3).

Hoffmann et al. 2022 (§3.3, appendix D.2) fit the five constants by minimising the Huber loss (δ = 1e-3)
between the predicted and the observed log loss, with L-BFGS from a grid of initialisations, in the
parametrisation A = e^a, B = e^b, E = e^e so that

    log L̂(N, D) = LSE(a − α·log N, b − β·log D, e).

`fit` does that, `bootstrap` refits on resampled runs for intervals, `compute_optimal` solves for the
N and D that minimise the fitted loss at a compute budget C = 6·N·D (scaling.py has Chinchilla's own
constants; this module fits yours).
"""

import dataclasses
import itertools
import math

import numpy as np

HUBER_DELTA = 1e-3
# Chinchilla's grid of initial points (appendix D.2): α, β, e, a, b.
INIT_GRID = {'alpha': (0.0, 0.5, 1.0, 1.5, 2.0), 'beta': (0.0, 0.5, 1.0, 1.5, 2.0),
             'e': (-1.0, -0.5, 0.0, 0.5, 1.0), 'a': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
             'b': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)}
_ORDER = ('a', 'b', 'e', 'alpha', 'beta')


@dataclasses.dataclass(frozen=True)
class LawFit:
  """The fitted constants of L(N, D) = E + A/N^α + B/D^β (nats, N parameters, D tokens)."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float  # the summed Huber loss at the optimum

  def predict(self, params, tokens):
    """The fitted loss at N = `params`, D = `tokens` (scalars or arrays)."""
    return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
  """The summed Huber loss of the log-loss residuals, and its gradient in (a, b, e, α, β)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, runs]
  top = terms.max(0)
  weights = np.exp(terms - top)
  total = weights.sum(0)
  residual = top + np.log(total) - log_l
  weights /= total  # softmax: d LSE / d term
  small = np.abs(residual) <= delta
  huber = np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta))
  slope = np.where(small, residual, delta * np.sign(residual))
  grad = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
                   -np.sum(slope * weights[0] * log_n), -np.sum(slope * weights[1] * log_d)])
  return float(huber.sum()), grad


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
  """The summed Huber loss at each row (a, b, e, α, β) of `grid`, in one vectorised pass."""
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape[:1] + log_n.shape)])
  residual = np.logaddexp.reduce(terms, axis=0) - log_l
  huber = np.where(np.abs(residual) <= delta, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta))
  return huber.sum(-1)


def fit(params, tokens, losses, *, delta: float = HUBER_DELTA, starts: int = 8,
        init: np.ndarray | None = None) -> LawFit:
  """Fits E, A, B, α, β to runs of `params` parameters trained on `tokens` tokens to loss `losses`.

  Args:
    params, tokens, losses: one value per run (N, D, final validation loss in nats).
    delta: the Huber loss's δ (Chinchilla: 1e-3).
    starts: L-BFGS runs, from the best points of Chinchilla's initialisation grid (scored by the
      objective; running all 4,500 as the paper does changes nothing here and costs seconds per fit).
    init: an extra starting point (a, b, e, α, β), e.g. a previous fit when bootstrapping.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top  (scipy is a dependency of jax)
  log_n, log_d, log_l = (np.log(np.asarray(x, np.float64)) for x in (params, tokens, losses))
  if not len(log_n) == len(log_d) == len(log_l) >= 5:
    raise ValueError(f'need at least 5 runs (one per constant) with N, D and L each, got {len(log_l)}')
  grid = np.array(list(itertools.product(*(INIT_GRID[k] for k in _ORDER))))
  scores = _grid_objective(grid, log_n, log_d, log_l, delta)
  candidates = list(grid[np.argsort(scores)[:starts]]) + ([np.asarray(init)] if init is not None else [])
  best = None
  for theta0 in candidates:
    # Bounds keep exponents of the power laws non-negative, as the form assumes.
    result = optimize.minimize(_objective, theta0, args=(log_n, log_d, log_l, delta), jac=True,
                               method='L-BFGS-B', bounds=[(None, None)] * 3 + [(0.0, None)] * 2,
                               options={'maxiter': 300, 'ftol': 1e-12, 'gtol': 1e-8})
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  return LawFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
                objective=float(best.fun))


def to_theta(law: LawFit) -> np.ndarray:
  """(a, b, e, α, β) of a fit: a starting point for `fit(init=...)`."""
  return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap(params, tokens, losses, *, samples: int = 200, seed: int = 0, confidence: float = 0.95,
              delta: float = HUBER_DELTA) -> dict[str, tuple[float, float]]:
  """Percentile intervals of E, A, B, α, β (and the optimal tokens per parameter exponent a = β/(α+β))
  from refits on runs resampled with replacement."""
  params, tokens, losses = (np.asarray(x, np.float64) for x in (params, tokens, losses))
  center = fit(params, tokens, losses, delta=delta)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(samples):
    idx = rng.integers(0, len(losses), len(losses))
    if len(set(zip(params[idx], tokens[idx]))) < 5:
      continue  # too few distinct runs to pin five constants
    law = fit(params[idx], tokens[idx], losses[idx], delta=delta, starts=1, init=to_theta(center))
    draws.append((law.E, law.A, law.B, law.alpha, law.beta, law.beta / (law.alpha + law.beta)))
  draws = np.array(draws)
  lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
  names = ('E', 'A', 'B', 'alpha', 'beta', 'n_exponent')
  return {name: (float(np.percentile(draws[:, i], lo)), float(np.percentile(draws[:, i], hi)))
          for i, name in enumerate(names)}


def compute_optimal(law: LawFit, flops: float, flops_per_param_token: float = 6.0) -> tuple[float, float]:
  """(N, D) minimising the fitted loss at C = 6·N·D (Chinchilla eq. 4):
  N = G·(C/6)^(β/(α+β)), D = (C/6)/N, G = (αA/(βB))^(1/(α+β))."""
  if law.alpha <= 0 or law.beta <= 0:
    raise ValueError(f'no compute optimum: the fit has alpha={law.alpha:.3g}, beta={law.beta:.3g} '
                     '(a non-positive exponent means more of it never helps)')
  budget = flops / flops_per_param_token
  g = (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))
  n = g * budget ** (law.beta / (law.alpha + law.beta))
  return n, budget / n
