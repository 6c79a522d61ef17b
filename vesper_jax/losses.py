"""Next-token cross-entropy and the predictive entropy, computed together in one pass over the logits.

Per-token statistics (`token_stats`, and `per_token=True` on the fused head) serve the metacognition
head (metacog.py): the loss of each token and whether its top-1 prediction was right (its training
targets), and what the predicted distribution says of itself, read from the same softmax (its inputs,
`DISTRIBUTION_STATS`): the max probability, the entropy, and the top-1/top-2 margin in log space.
"""

import functools

import jax
import jax.numpy as jnp

from vesper_jax import platforms
from vesper_jax.kernels import cross_entropy_cpu_ffi


def cross_entropy_and_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                              weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy and mean predictive entropy (both nats, float32).

  Both share one softmax, so Velvet's entropy signal costs no second pass over the vocabulary.

  Args:
    logits_BTV: logits for the next token at every position.
    targets_BT: int target ids.
    weights_BT: 1 for real targets, 0 for padding; the means are over real targets only.
  Returns:
    (loss, entropy): scalars.
  """
  nll_BT, ent_BT = _nll_and_entropy(logits_BTV.astype(jnp.float32), targets_BT)
  if weights_BT is None:
    weights_BT = jnp.ones_like(nll_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(weights_BT), 1.0)
  return jnp.sum(nll_BT * weights_BT) / denom, jnp.sum(ent_BT * weights_BT) / denom


DISTRIBUTION_STATS = ('max_prob', 'entropy', 'margin')  # what a prediction says of itself (metacog.py)


def _top2(z_BTV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The largest and second-largest logit of each row ([B, T, 1] and [B, T]); equal when the top is tied.

  Three fused reductions over the row rather than `jax.lax.top_k(z, 2)`: inside the train step's jitted
  scan XLA:CPU lowered that top_k to a sort of every row, a ~20x slower step (tiny, 1,024 tokens of a
  4,096-token vocabulary: 2.5 s against 0.12 s, measured).
  """
  max_BT1 = jnp.max(z_BTV, axis=-1, keepdims=True)
  at_max_BTV = z_BTV == max_BT1
  ties_BT = jnp.sum(at_max_BTV.astype(jnp.int32), axis=-1)
  below_BT = jnp.max(jnp.where(at_max_BTV, -jnp.inf, z_BTV), axis=-1)
  return max_BT1, jnp.where(ties_BT > 1, max_BT1[..., 0], below_BT)


def _softmax_stats(z_BTV: jax.Array) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
  """(DISTRIBUTION_STATS, shifted logits z − max z, their exp, the softmax's normaliser Σ exp(z − max z)).

  The max the softmax shifts by is the first of `_top2`: the margin is z₁ − z₂ = log p₁ − log p₂ (0 for
  a tie). It runs only where the head reads the statistics (and in evaluation).
  """
  max_BT1, second_BT = _top2(z_BTV)
  shifted_BTV = z_BTV - max_BT1
  e_BTV = jnp.exp(shifted_BTV)
  s_BT = jnp.sum(e_BTV, axis=-1)
  stats = {'max_prob': 1.0 / s_BT,
           'entropy': jnp.log(s_BT) - jnp.sum(e_BTV * shifted_BTV, axis=-1) / s_BT,
           'margin': max_BT1[..., 0] - second_BT}
  return stats, shifted_BTV, e_BTV, s_BT


def distribution_stats(logits_BTV: jax.Array) -> dict[str, jax.Array]:
  """Per token, float32 and without gradient: max_prob, entropy (nats) and margin (log p₁ − log p₂) of
  the predicted distribution: the metacognition head's inputs where no target is known (decoding)."""
  return _softmax_stats(jax.lax.stop_gradient(logits_BTV.astype(jnp.float32)))[0]


def token_stats(logits_BTV: jax.Array, targets_BT: jax.Array) -> dict[str, jax.Array]:
  """Per token, float32 and without gradient: nll, correct, max_prob, entropy, margin; one softmax.

  `correct` is 1.0 where the target has the highest logit (ties count as correct: the same test the
  fused head makes for free, as `z[target] − max z == 0`), `max_prob` the model's top-1 probability
  (the confidence a model without a head would report), `entropy` the predictive entropy in nats,
  `margin` log p₁ − log p₂.
  """
  z_BTV = jax.lax.stop_gradient(logits_BTV.astype(jnp.float32))
  stats, shifted_BTV, _, s_BT = _softmax_stats(z_BTV)
  target_BT = jnp.take_along_axis(shifted_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return {'nll': jnp.log(s_BT) - target_BT, 'correct': (target_BT >= 0.0).astype(jnp.float32), **stats}


# The per-token terms carry a hand-written gradient. Autodiff of log_softmax + take_along_axis + the
# entropy sum kept log p and p over [B, T, V] as separate tensors and scattered the targets' gradient
# into a zero [B, T, V] tensor; the rule below is one elementwise pass over the logits instead:
#   d nll / d z = p − onehot(target)        d ent / d z = −p · (log p + ent)

@jax.custom_vjp
def _nll_and_entropy(z_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  nll_BT, ent_BT, _ = _forward(z_BTV, targets_BT)
  return nll_BT, ent_BT


def _forward(z_BTV, targets_BT):
  m_BT1 = jnp.max(z_BTV, axis=-1, keepdims=True)
  shifted_BTV = z_BTV - m_BT1  # ≤ 0: exp never overflows
  e_BTV = jnp.exp(shifted_BTV)
  s_BT = jnp.sum(e_BTV, axis=-1)
  log_s_BT = jnp.log(s_BT)
  # ent = −Σ p·log p = log s − Σ p·(z − m): written with the shifted logits so that no large lse
  # cancels against E_p[z].
  ent_BT = log_s_BT - jnp.sum(e_BTV * shifted_BTV, axis=-1) / s_BT
  lse_BT = log_s_BT + m_BT1[..., 0]
  nll_BT = lse_BT - jnp.take_along_axis(z_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return nll_BT, ent_BT, lse_BT


def _nll_and_entropy_fwd(z_BTV, targets_BT):
  nll_BT, ent_BT, lse_BT = _forward(z_BTV, targets_BT)
  return (nll_BT, ent_BT), (z_BTV, targets_BT, lse_BT, ent_BT)


def _nll_and_entropy_bwd(residuals, cotangents):
  z_BTV, targets_BT, lse_BT, ent_BT = residuals
  g_nll_BT, g_ent_BT = cotangents
  logp_BTV = z_BTV - lse_BT[..., None]
  p_BTV = jnp.exp(logp_BTV)
  onehot_BTV = jnp.arange(z_BTV.shape[-1], dtype=targets_BT.dtype) == targets_BT[..., None]
  dz_BTV = (g_nll_BT[..., None] * (p_BTV - onehot_BTV)
            - g_ent_BT[..., None] * p_BTV * (logp_BTV + ent_BT[..., None]))
  return dz_BTV, None  # integer targets: no gradient


_nll_and_entropy.defvjp(_nll_and_entropy_fwd, _nll_and_entropy_bwd)


# ------------------------------------------------------------------------------ the head, fused in

HEAD_CHUNK_TOKENS = 1024  # tokens per chunk: a 1,024 × 16,384 float32 chunk of logits is 64 MiB (measured
                          # on CPU: 3% faster steps than 256-token chunks, no slower than 2,048)


def head_cross_entropy_and_entropy(x_BTD: jax.Array, kernel_DV: jax.Array, bias_V: jax.Array | None,
                                   targets_BT: jax.Array, weights_BT: jax.Array | None = None, *,
                                   per_token: bool | str = False, kernel: bool | None = None
                                   ) -> tuple:
  """`cross_entropy_and_entropy(x·kernel + bias, ...)` without ever holding the [B, T, V] logits.

  The head runs over chunks of about HEAD_CHUNK_TOKENS tokens (a slice of the positions of every row,
  so a batch split over devices stays split), and under `jax.grad` each chunk's gradients are computed
  as soon as its softmax is known. On CPU this removes four [B, T, V] float32 tensors from the step
  (logits, softmax and their two gradients; 128 MiB each for `small` at batch 8): each was a full pass
  through memory and part of the working set XLA:CPU allocates for every step (see host_memory.py).

  The entropy is returned under stop_gradient: it is a signal (Velvet reads it), not an objective.
  The logits are computed as `VesperLM`'s head computes them: operands in x's dtype, then float32.

  Args:
    x_BTD: the final-normed hidden states (`VesperLM(..., return_hidden=True)`).
    kernel_DV, bias_V: the head cut to the real vocabulary (`VesperLM.head_weights`); bias may be None.
    targets_BT: int target ids.
    weights_BT: 1 for real targets, 0 for padding; the means are over real targets only.
    per_token: also return, per token and without gradient, its nll and correct (1.0 where the target
      has the highest logit; see token_stats), read from the chunks' logits as they pass; 'stats' adds
      DISTRIBUTION_STATS (max_prob, entropy, margin: the metacognition head's inputs) from the same
      chunks (in the kernel's path, the top two logits are read before the kernel reuses the buffer).
    kernel: each chunk's softmax pass in the C++ kernel where it applies (the CPU platform's choice,
      platforms.py); None = when the default devices are CPUs.
  Returns:
    (loss, entropy): scalars, float32 nats; with per_token, (loss, entropy, {name: [B, T] float32}).
  """
  B, T, _ = x_BTD.shape
  if weights_BT is None:
    weights_BT = jnp.ones((B, T), jnp.float32)
  # Chunks are [B, C] slices of the sequence axis: the largest C dividing T with B·C ≤ the budget.
  chunk_len = max([c for c in range(1, T + 1) if T % c == 0 and B * c <= HEAD_CHUNK_TOKENS] or [1])
  if kernel is None:
    kernel = platforms.resolve() == 'cpu'
  if per_token not in (False, True, 'stats'):
    raise ValueError(f'per_token={per_token!r}: expected False, True or "stats"')
  loss, entropy, per_token_BT = _fused_head(x_BTD, kernel_DV, bias_V, targets_BT,
                                            weights_BT.astype(jnp.float32), chunk_len, per_token, kernel)
  if per_token:
    return loss, jax.lax.stop_gradient(entropy), jax.lax.stop_gradient(per_token_BT)
  return loss, jax.lax.stop_gradient(entropy)


def _to_chunks(a_BT, chunk_len):
  """[B, T, ...] -> [T / C, B·C, ...]: chunk i holds positions [i·C, (i + 1)·C) of every row."""
  B, T = a_BT.shape[:2]
  a = a_BT.reshape(B, T // chunk_len, chunk_len, *a_BT.shape[2:]).swapaxes(0, 1)
  return a.reshape(T // chunk_len, B * chunk_len, *a_BT.shape[2:])


def _from_chunks(a_NM, B):
  n, M = a_NM.shape[:2]
  a = a_NM.reshape(n, B, M // B, *a_NM.shape[2:]).swapaxes(0, 1)
  return a.reshape(B, n * (M // B), *a_NM.shape[2:])


def _chunk_logits(x_MD, kernel_DV, bias_V):
  logits_MV = jnp.dot(x_MD, kernel_DV.astype(x_MD.dtype))
  if bias_V is not None:
    logits_MV = logits_MV + bias_V.astype(x_MD.dtype)
  return logits_MV.astype(jnp.float32)


def _chunk_softmax_terms(z_MV, targets_M, with_stats):
  """Per token: nll, entropy, correct, the softmax's statistics (with_stats, else None), and the pieces
  of the softmax its gradient needs (see _forward)."""
  if with_stats:
    stats, shifted_MV, e_MV, s_M = _softmax_stats(z_MV)
    log_s_M, ent_M = jnp.log(s_M), stats['entropy']
  else:
    stats = None
    shifted_MV = z_MV - jnp.max(z_MV, axis=-1, keepdims=True)
    e_MV = jnp.exp(shifted_MV)
    s_M = jnp.sum(e_MV, axis=-1)
    log_s_M = jnp.log(s_M)
    ent_M = log_s_M - jnp.sum(e_MV * shifted_MV, axis=-1) / s_M
  target_M = jnp.take_along_axis(shifted_MV, targets_M[:, None], axis=-1)[:, 0]
  correct_M = (target_M >= 0.0).astype(jnp.float32)  # the target holds the max (token_stats' test)
  return log_s_M - target_M, ent_M, correct_M, stats, e_MV, s_M


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_head(x_BTD, kernel_DV, bias_V, targets_BT, weights_BT, chunk_len, per_token, use_kernel):
  outputs, _ = _fused_head_fwd(x_BTD, kernel_DV, bias_V, targets_BT, weights_BT, chunk_len, per_token,
                               use_kernel, with_grads=False)
  return outputs


def _fused_head_fwd(x_BTD, kernel_DV, bias_V, targets_BT, weights_BT, chunk_len, per_token, use_kernel,
                    with_grads=True):
  B = x_BTD.shape[0]
  denom = jnp.maximum(jnp.sum(weights_BT), 1.0)

  with_stats = per_token == 'stats'

  def body(carry, chunk):
    x_MD, targets_M, weights_M = chunk
    z_MV = _chunk_logits(x_MD, kernel_DV, bias_V)
    if with_grads and use_kernel and cross_entropy_cpu_ffi.supports(z_MV):
      if with_stats:  # read before the kernel writes dz over z's buffer
        max_M1, second_M = _top2(z_MV)
        target_logit_M = jnp.take_along_axis(z_MV, targets_M[:, None], axis=-1)[:, 0]
      # On CPU, one pass per row in C++ (kernels/cross_entropy_cpu.cc) instead of XLA's five over the chunk.
      dz_MV, nll_M, ent_M, correct_M = cross_entropy_cpu_ffi.softmax_cross_entropy(
          z_MV, targets_M, weights_M / denom)
      dz_MV = dz_MV.astype(x_MD.dtype)
      # p₁ = exp(z₁ − lse), and the kernel's nll = lse − z[target] gives the lse.
      stats = ({'max_prob': jnp.exp(max_M1[:, 0] - target_logit_M - nll_M), 'entropy': ent_M,
                'margin': max_M1[:, 0] - second_M} if with_stats else None)
    else:
      nll_M, ent_M, correct_M, stats, e_MV, s_M = _chunk_softmax_terms(z_MV, targets_M, with_stats)
      dz_MV = None
    loss_sum, ent_sum, dkernel_DV, dbias_V = carry
    loss_sum += jnp.sum(nll_M * weights_M)
    ent_sum += jnp.sum(ent_M * weights_M)
    stats = {'nll': nll_M, 'correct': correct_M, **(stats or {})} if per_token else None
    if not with_grads:
      return (loss_sum, ent_sum, dkernel_DV, dbias_V), (None, stats)
    # d loss / d logits = (softmax − onehot(target)) · weight / denom, for the upstream cotangent 1;
    # the backward pass scales by the real one (a scalar).
    if dz_MV is None:
      onehot_MV = jnp.arange(e_MV.shape[-1], dtype=targets_M.dtype) == targets_M[:, None]
      dz_MV = ((e_MV / s_M[:, None] - onehot_MV) * (weights_M / denom)[:, None]).astype(x_MD.dtype)
    dx_MD = jax.lax.dot_general(dz_MV, kernel_DV.astype(x_MD.dtype), (((1,), (1,)), ((), ())))
    dkernel_DV += jax.lax.dot_general(x_MD, dz_MV, (((0,), (0,)), ((), ()))).astype(jnp.float32)
    if dbias_V is not None:
      dbias_V += jnp.sum(dz_MV.astype(jnp.float32), axis=0)
    return (loss_sum, ent_sum, dkernel_DV, dbias_V), (dx_MD, stats)

  zeros = lambda a: None if a is None or not with_grads else jnp.zeros(a.shape, jnp.float32)
  carry = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(kernel_DV), zeros(bias_V))
  chunks = (_to_chunks(x_BTD, chunk_len), _to_chunks(targets_BT, chunk_len),
            _to_chunks(weights_BT, chunk_len))
  (loss_sum, ent_sum, dkernel_DV, dbias_V), (dx_NMD, stats) = jax.lax.scan(body, carry, chunks)
  # Without per_token the per-token output is a placeholder ({}) that nothing reads.
  per_token_BT = {k: _from_chunks(v, B) for k, v in stats.items()} if per_token else {}
  outputs = (loss_sum / denom, ent_sum / denom, per_token_BT)
  if not with_grads:
    return outputs, None
  grads = (_from_chunks(dx_NMD, B), dkernel_DV.astype(kernel_DV.dtype),
           None if bias_V is None else dbias_V.astype(bias_V.dtype))
  return outputs, grads


def _fused_head_bwd(chunk_len, per_token, use_kernel, grads, cotangents):
  del chunk_len, per_token, use_kernel
  # The entropy and the per-token outputs leave under stop_gradient: their cotangents are zero.
  g_loss = cotangents[0]
  dx_BTD, dkernel_DV, dbias_V = grads
  scale = lambda g: None if g is None else (g_loss * g).astype(g.dtype)
  return scale(dx_BTD), scale(dkernel_DV), scale(dbias_V), None, None


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)
