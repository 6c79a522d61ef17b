"""The model's projections: `nn.Dense`'s parameters and result, with a weight gradient XLA:CPU runs faster.

Under `jax.grad`, a projection y = x·W gets dW = xᵀ·dy, a product that contracts the token axis of both
operands. XLA:CPU hands that layout to Eigen, at 150–180 GFLOP/s on the 2-core CPU, where the same
product with xᵀ copied out first ([D, M] row-major, a copy of 1.5–4 MiB) runs in YNNPACK at 185–205
(README, "CPU train step": 8–20% per weight gradient, ~40 ms a step for `small` at 8 × 256; the head's
own weight gradient, losses.py, gained nothing in the step this way and is left as it was). XLA's
algebraic simplifier folds a plain transpose back into the product, so the copy is held apart with an
optimization barrier, on CPU only (`copy_transpose`, set from the model's platform: platforms.py): on a
GPU the library takes either layout and the copy would only cost.

`Dense` declares exactly `nn.Dense`'s parameters (`kernel` [in, out] and optional `bias`, float32, same
initialisers and names), so checkpoints, export and LoRA / quantized variants are unaffected.
"""

from typing import Callable

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def transposed(x_MD: jax.Array, copy: bool) -> jax.Array:
  """xᵀ; with `copy` (CPU), as its own [D, M] row-major array (see the module docstring)."""
  return jax.lax.optimization_barrier(x_MD.T) if copy else x_MD.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x_MD: jax.Array, kernel_DF: jax.Array, copy_transpose: bool = False) -> jax.Array:
  """x·W for [M, D] x and [D, F] W, in their (common) dtype; `copy_transpose`: see `transposed`."""
  del copy_transpose
  return jnp.dot(x_MD, kernel_DF)


def _linear_fwd(x_MD, kernel_DF, copy_transpose):
  del copy_transpose
  return jnp.dot(x_MD, kernel_DF), (x_MD, kernel_DF)


def _linear_bwd(copy_transpose, residuals, dy_MF):
  x_MD, kernel_DF = residuals
  return (jax.lax.dot_general(dy_MF, kernel_DF, (((1,), (1,)), ((), ()))).astype(x_MD.dtype),
          jnp.dot(transposed(x_MD, copy_transpose), dy_MF).astype(kernel_DF.dtype))


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
  """`nn.Dense(features, use_bias, dtype, param_dtype=float32, kernel_init)` over [..., D] inputs."""
  features: int
  use_bias: bool
  dtype: jnp.dtype
  kernel_init: Callable = nn.initializers.lecun_normal()
  copy_transpose: bool = False  # the CPU layout of the weight gradient (module docstring)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = linear(x.reshape(-1, x.shape[-1]), kernel, self.copy_transpose).reshape(*x.shape[:-1], self.features)
    return y if bias is None else y + bias
