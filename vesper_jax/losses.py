"""Next-token cross-entropy and the predictive entropy, computed together in one pass over the logits."""

import jax
import jax.numpy as jnp


def cross_entropy_and_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                              weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy and mean predictive entropy (both nats, float32).

  Both share one log-softmax, so Velvet's entropy signal costs no second pass over the vocabulary.

  Args:
    logits_BTV: logits for the next token at every position.
    targets_BT: int target ids.
    weights_BT: 1 for real targets, 0 for padding; the means are over real targets only.
  Returns:
    (loss, entropy): scalars.
  """
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  ent_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
  if weights_BT is None:
    weights_BT = jnp.ones_like(nll_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(weights_BT), 1.0)
  return jnp.sum(nll_BT * weights_BT) / denom, jnp.sum(ent_BT * weights_BT) / denom
