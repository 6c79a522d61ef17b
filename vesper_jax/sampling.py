"""Which token comes next: the sampling filters and the draw (SPEC §10).

Shape suffixes follow the package's key (model.py): B batch, V vocabulary.

Filters are pure functions over float32 logits, applied by `sample_logits` in the usual order:
repetition penalty, temperature, top-k, top-p, then a draw (argmax at temperature 0). How tokens are
produced with the model (KV cache, prefill, steps) is decode.py; how they reach a terminal, generate.py.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vesper_jax import platforms
from vesper_jax.kernels import sampling_cpu_ffi


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. Hashable: it is a static argument, one compilation per setting."""
  temperature: float = 0.8         # 0 = greedy (argmax, deterministic)
  top_k: int = 50                  # keep the k most likely tokens (and any tied with the k-th); 0 = off
  top_p: float = 0.9               # keep the smallest most-likely set with mass >= top_p; 1.0 = off
  repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output; 1.0 = off

  def __post_init__(self):
    for name in ('temperature', 'top_p', 'repetition_penalty'):
      if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
        raise ValueError(f'{name}={getattr(self, name)} must be a finite number')
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0 (0 = greedy)')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1 = off)')
    if self.repetition_penalty <= 0:
      raise ValueError(f'repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)')


GREEDY = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


# ------------------------------------------------------------------------------------------ filters
# Each takes and returns float32 logits_BV; a removed token gets -inf (probability exactly 0).
#
# top-k and top-p need a threshold: the k-th largest logit, or the probability of the last token of the
# nucleus. Two exact ways to find it, chosen by the caller (decoding: `method_for` its model's platform;
# `method=None`: the default devices' platform):
#   'sort':   lax.top_k / a sort over V — fast on accelerators;
#   'search': 32 passes of compare-and-count over V that build the threshold bit by bit (floats ordered
#             through their bit patterns) — on a CPU, XLA's top_k and sort over 32k entries cost 5-10 ms
#             per row, the search well under one.
# Both keep every token tied with the threshold, so they give the same set. Where 'search' is chosen and
# the CPU kernels apply (cpu_kernels.usable: float32, one device, library built), `sample_logits` hands
# top-k, top-p and the draw to kernels/sampling_cpu.cc instead: the same set and the same uniform, so the
# same token but at float-rounding boundaries, with one selection over V in place of the 2 × 32 passes
# (~0.6 ms of a CPU decode step at V = 16k). Not for top-p without top-k: the kernel would sort all V,
# slower than the search.

def method_for(platform: str) -> str:
  """The threshold method for a platform (platforms.py): 'search' on a CPU, 'sort' elsewhere."""
  return 'search' if platform == 'cpu' else 'sort'


def _method(method: str | None) -> str:
  if method is None:
    return method_for(platforms.resolve())
  if method not in ('sort', 'search'):
    raise ValueError(f"method={method!r}: expected 'sort', 'search' or None")
  return method


def _ordered_bits(x_BV: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 values (a < b iff key(a) < key(b); -0 and +0 are equal)."""
  # Both zeros get +0.0's key and tie, as they do for lax.top_k and sort: otherwise 'search' would drop
  # a -0.0 tied with a kept +0.0. (A select, not x + 0.0, which a compiler may simplify to x.)
  x_BV = x_BV.astype(jnp.float32)
  i = jax.lax.bitcast_convert_type(jnp.where(x_BV == 0, 0.0, x_BV), jnp.uint32)
  negative = (i >> 31) == 1
  return jnp.where(negative, ~i, i | jnp.uint32(1 << 31))


def _largest_key(keys_BV: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The largest t with enough(keys_BV >= t) true, per row: uint32[B, 1]. `enough` must be monotone
  (true at t = 0, and once false for some t, false for every larger t)."""
  def body(i, t_B1):
    candidate_B1 = t_B1 | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(enough(keys_BV >= candidate_B1), candidate_B1, t_B1)
  return jax.lax.fori_loop(0, 32, body, jnp.zeros((keys_BV.shape[0], 1), jnp.uint32))


def apply_temperature(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """Divides by the temperature (> 0; temperature 0 is handled as argmax by `sample_logits`)."""
  return logits_BV / temperature


def top_k_filter(logits_BV: jax.Array, k: int, method: str | None = None) -> jax.Array:
  """Keeps the tokens whose logit is at least the k-th largest (so ties with the k-th are all kept)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  if _method(method) == 'sort':
    keep_BV = logits_BV >= jax.lax.top_k(logits_BV, k)[0][:, -1:]
  else:
    keys_BV = _ordered_bits(logits_BV)
    keep_BV = keys_BV >= _largest_key(keys_BV, lambda m: jnp.sum(m, -1, keepdims=True) >= k)
  return jnp.where(keep_BV, logits_BV, -jnp.inf)


def top_p_filter(logits_BV: jax.Array, p: float, method: str | None = None) -> jax.Array:
  """Nucleus: keeps the most likely tokens up to and including the one that brings the mass to >= p.

  Every token as likely as the least likely member is kept too, so tied tokens are all in or all out
  whatever order a sort put them in. p = 1 keeps everything (without trusting a float32 sum to reach 1).
  """
  if p >= 1.0:
    return logits_BV
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  if _method(method) == 'sort':
    sorted_BV = -jnp.sort(-probs_BV, axis=-1)  # descending
    mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
    # A token is in the nucleus if the mass strictly before it is < p; the top token always is.
    threshold_B1 = jnp.min(jnp.where(mass_before_BV < p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    keep_BV = probs_BV >= threshold_B1
  else:
    # The threshold is the largest probability t such that the tokens at least t likely hold >= p.
    keys_BV = _ordered_bits(probs_BV)
    mass_reaches_p = lambda m: jnp.sum(jnp.where(m, probs_BV, 0.0), -1, keepdims=True) >= p
    keep_BV = keys_BV >= _largest_key(keys_BV, mass_reaches_p)
  return jnp.where(keep_BV, logits_BV, -jnp.inf)


def _top_k_top_p_sorted(logits_BV: jax.Array, k: int, p: float) -> jax.Array:
  """top_p_filter(top_k_filter(x, k), p) from the k values lax.top_k returns sorted: no sort over V."""
  top_Bk = jax.lax.top_k(logits_BV, k)[0]
  logits_BV = jnp.where(logits_BV >= top_Bk[:, -1:], logits_BV, -jnp.inf)
  lse_B1 = jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True)
  probs_Bk = jnp.exp(top_Bk - lse_B1)
  mass_before_Bk = jnp.cumsum(probs_Bk, axis=-1) - probs_Bk
  # Tokens tied with the k-th beyond the k returned share its probability: if the nucleus is not complete
  # within the k, the threshold is the k-th's probability and every tied token stays, as in top_k_filter.
  threshold_B1 = jnp.min(jnp.where(mass_before_Bk < p, probs_Bk, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(jnp.exp(logits_BV - lse_B1) >= threshold_B1, logits_BV, -jnp.inf)


def repetition_penalty_filter(logits_BV: jax.Array, seen_BV: jax.Array, penalty: float) -> jax.Array:
  """CTRL's rule on tokens already seen: a positive logit is divided by the penalty, a negative multiplied."""
  if penalty == 1.0:
    return logits_BV
  penalized_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalized_BV, logits_BV)


def sample_logits(rng: jax.Array, logits_BV: jax.Array, seen_BV: jax.Array, sampling: SamplingConfig,
                  method: str | None = None) -> jax.Array:
  """Applies the filters in order and draws one token per row (argmax at temperature 0): int32[B]."""
  logits_BV = repetition_penalty_filter(logits_BV, seen_BV, sampling.repetition_penalty)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = apply_temperature(logits_BV, sampling.temperature)
  k, p = sampling.top_k, sampling.top_p
  method, top_k_on = _method(method), 0 < k < logits_BV.shape[-1]
  if method == 'search' and (top_k_on or p >= 1.0) and sampling_cpu_ffi.supports(logits_BV):
    return sampling_cpu_ffi.sample(logits_BV, _uniform(rng, logits_BV.shape[0]), k, p)
  if method == 'sort' and top_k_on and p < 1.0:
    logits_BV = _top_k_top_p_sorted(logits_BV, k, p)
  else:
    logits_BV = top_p_filter(top_k_filter(logits_BV, k, method), p, method)
  return _draw(rng, logits_BV)


def _first_above(cumulative_BX: jax.Array, target_B1: jax.Array, positive_BX: jax.Array) -> jax.Array:
  """Per row, the first index with positive weight whose cumulative exceeds the target: int32[B]. If
  rounding leaves none above (u·total rounded up to the total), the last index with positive weight."""
  above_BX = positive_BX & (cumulative_BX > target_B1)
  last_B = positive_BX.shape[-1] - 1 - jnp.argmax(positive_BX[:, ::-1], axis=-1)
  return jnp.where(jnp.any(above_BX, axis=-1), jnp.argmax(above_BX, axis=-1), last_B).astype(jnp.int32)


_DRAW_BLOCK = 128  # tokens per block of `_draw`'s two-level search


def _uniform(rng: jax.Array, B: int) -> jax.Array:
  """The draw's one uniform per row, float32[B] in [0, 1): `_draw`'s and the CPU kernel's."""
  return jax.random.uniform(rng, (B, 1), jnp.float32)[:, 0]


def _draw(rng: jax.Array, logits_BV: jax.Array) -> jax.Array:
  """One token per row from softmax(logits_BV) by inverse CDF: int32[B]. A -inf token is never drawn.

  One uniform u per row; the token is the first whose running probability mass exceeds u × the total:
  the same distribution as `jax.random.categorical`, whose Gumbel noise costs V random numbers and two
  logs per row (~1 ms per decode step on a CPU at V = 16k; this, ~0.05 ms). The running mass is found in
  two levels, blocks of `_DRAW_BLOCK` tokens and then the tokens of one block, because a cumulative sum
  over all V lowers on a CPU to a reduce-window whose cost grows with V².
  """
  B, V = logits_BV.shape
  W = _DRAW_BLOCK
  G = -(-V // W)
  weights_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))  # removed tokens: 0
  weights_BGW = jnp.pad(weights_BV, ((0, 0), (0, G * W - V))).reshape(B, G, W)  # padding: weight 0
  block_BG = jnp.sum(weights_BGW, axis=-1)
  block_cumulative_BG = jnp.cumsum(block_BG, axis=-1)
  target_B1 = _uniform(rng, B)[:, None] * block_cumulative_BG[:, -1:]
  block_B = _first_above(block_cumulative_BG, target_B1, block_BG > 0)
  in_block_BW = jnp.take_along_axis(weights_BGW, block_B[:, None, None], axis=1)[:, 0]
  before_B1 = jnp.where(block_B[:, None] > 0, jnp.take_along_axis(
      block_cumulative_BG, jnp.maximum(block_B - 1, 0)[:, None], axis=1), 0.0)
  token_B = _first_above(before_B1 + jnp.cumsum(in_block_BW, axis=-1), target_B1, in_block_BW > 0)
  return block_B * W + token_B
