"""Next-token cross-entropy and the predictive entropy, computed together in one pass over the logits."""

import jax
import jax.numpy as jnp


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
