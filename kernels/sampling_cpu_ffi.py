"""Top-k, top-p and the draw through the CPU kernel of sampling_cpu.cc (built by cpu_kernels.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from vesper_jax.kernels import cpu_kernels


def supports(logits_BV: jax.Array) -> bool:
  return cpu_kernels.usable(logits_BV)


def sample(logits_BV: jax.Array, uniform_B: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """The token sampling.py's 'search' filters and `_draw` choose per row, given its uniform: int32[B].

  Args:
    logits_BV: float32, already penalised and divided by the temperature.
    uniform_B: float32 in [0, 1), the uniform `_draw` would use for the row.
    top_k: keep the tokens at least as likely as the k-th; 0 (or >= V) = off.
    top_p: keep the nucleus of mass >= top_p, ties with its least likely member included; 1.0 = off.
  """
  cpu_kernels.require()
  top_k = 0 if top_k >= logits_BV.shape[-1] else top_k
  # broadcast_all: under vmap the kernel takes the extra axes as more rows.
  return jax.ffi.ffi_call('vesper_sample', jax.ShapeDtypeStruct(uniform_B.shape, jnp.int32),
                          vmap_method='broadcast_all')(
                              logits_BV, uniform_B, top_k=np.int32(top_k), top_p=np.float32(top_p))
