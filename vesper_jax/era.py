"""ERA: the entropy-regularized activation (SPEC §4).

Per token, over the last axis (the FFN hidden units), with temperature T and weight λ:

    g_j = sigmoid(x_j / T)
    H   = mean_j [softplus(x_j / T) − (x_j / T)·g_j] / ln 2     # mean binary entropy of the gates
    ERA(x)_j = x_j · g_j · (1 + λ·H)

With λ = 0 and T = 1 this is SiLU. The entropy term is a per-token scalar, so one token's output never
depends on another token's hidden state.
"""

import math

import jax
import jax.numpy as jnp

from vesper_jax import platforms
from vesper_jax.kernels import era_cpu_ffi


def gate_entropy(x: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Mean binary entropy (bits, in [0, 1]) of the sigmoid gates of `x`, per token: shape x.shape[:-1] + (1,)."""
  # Entropy is a mean of many small terms: accumulate it in float32 even under a bfloat16 compute dtype.
  z = x.astype(jnp.float32) / temperature
  # softplus(z) − z·sigmoid(z) is the binary entropy (in nats) of p = sigmoid(z), written so that it is
  # finite for every z (no log(0) at saturated gates).
  ent = jax.nn.softplus(z) - z * jax.nn.sigmoid(z)
  return jnp.mean(ent, axis=-1, keepdims=True) / math.log(2.0)


def era(x: jax.Array,
        temperature: float = 1.0,
        entropy_weight: float = 0.1,
        detach_entropy: bool = False,
        kernel: bool | None = None) -> jax.Array:
  """ERA(x) = x · sigmoid(x/T) · (1 + λ·H(x)); see the module docstring.

  With `kernel` (the model sets it for the CPU platform; None = when the default devices are CPUs), in
  float32 on one device, it runs as a C++ kernel (kernels/era_cpu.cc: the same values to float32
  rounding, two passes over each token's units instead of XLA's ten over the whole array).
  """
  if kernel is None:
    kernel = platforms.resolve() == 'cpu'
  if (kernel and entropy_weight != 0.0
      and all(isinstance(a, (int, float)) for a in (temperature, entropy_weight))
      and era_cpu_ffi.supports(x)):
    return era_cpu_ffi.era(x, temperature, entropy_weight, detach_entropy)
  g = jax.nn.sigmoid(x / temperature)
  y = x * g
  if entropy_weight == 0.0:
    # Exactly SiLU at T = 1: skip the entropy reduction altogether.
    return y
  h = gate_entropy(x, temperature)
  if detach_entropy:
    h = jax.lax.stop_gradient(h)
  return y * (1.0 + entropy_weight * h).astype(y.dtype)
