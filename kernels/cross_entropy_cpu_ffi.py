"""The fused head's softmax pass through the CPU kernel of cross_entropy_cpu.cc (built by cpu_kernels.py)."""

import jax
import jax.numpy as jnp

from vesper_jax.kernels import cpu_kernels


def supports(z_MV: jax.Array) -> bool:
  return z_MV.ndim == 2 and cpu_kernels.usable(z_MV)


def softmax_cross_entropy(z_MV: jax.Array, targets_M: jax.Array, weights_M: jax.Array):
  """(dz_MV, nll_M, entropy_M, correct_M) of float32 logits, in one pass per row (see the .cc file).

  dz = (softmax(z) − onehot(target)) · weight; nll, entropy and correct as losses._chunk_softmax_terms.
  z's buffer is reused for dz where XLA can donate it (it is dead after this call in the head's loop).
  """
  cpu_kernels.require()
  M, _ = z_MV.shape
  per_token = jax.ShapeDtypeStruct((M,), jnp.float32)
  return jax.ffi.ffi_call(
      'vesper_softmax_cross_entropy',
      (jax.ShapeDtypeStruct(z_MV.shape, jnp.float32), per_token, per_token, per_token),
      input_output_aliases={0: 0}, vmap_method='sequential')(
          z_MV, targets_M.astype(jnp.int32), weights_M.astype(jnp.float32))
