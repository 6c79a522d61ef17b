"""Causal attention through the CPU kernel of attention_cpu.cc (see kernels/cpu_kernels.py for its build).

`causal_attention` is differentiable: a custom VJP whose backward is the kernel's backward handler,
which recomputes the probabilities from q, k and each query's log-sum-exp.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vesper_jax.kernels import cpu_kernels

_FORWARD, _BACKWARD = 'vesper_attention_forward', 'vesper_attention_backward'


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether the kernel takes these operands: `cpu_kernels.usable`, a head size that is a multiple of 16
  (one vector of floats), and a CPU with AVX-512 (`cpu_kernels.wide_vectors`).

  Without AVX-512 the kernel's register tiles of 16-float vectors compile to slow code: on an AVX2 EPYC,
  one layer of small's attention (8 x 256, forward and backward) took 152 ms against 29 ms for the JAX
  blocks, and the 8 x 256 train step 2.65-3.1 s against 2.19 s with the JAX attention; on the AVX-512
  machine it was built on, 14.3 ms against 34.4 ms. There the JAX version runs. `kernel=True` in
  attention_cpu.causal_attention still forces it (the tests do).
  """
  return (q.shape[-1] % cpu_kernels.LANES == 0 and cpu_kernels.wide_vectors()
          and cpu_kernels.usable(q, k, v))


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                     attention_mask_BT: jax.Array | None = None) -> jax.Array:
  """As `jax.nn.dot_product_attention(q, k, v, mask, is_causal=True)`, float32 (see `supports`).

  A query that sees no key (all padding) gets a zero output where XLA's gets an average: either is
  garbage that the loss weights out.
  """
  cpu_kernels.require()
  B, T = q_BTNH.shape[:2]
  mask_BT = (jnp.ones((B, T), jnp.int32) if attention_mask_BT is None
             else attention_mask_BT.astype(jnp.int32))
  return _attention(q_BTNH, k_BTKH, v_BTKH, mask_BT)


def _scale(q):
  return float(q.shape[-1]) ** -0.5


@jax.custom_vjp
def _attention(q, k, v, mask):
  return _forward(q, k, v, mask)[0]


def _forward(q, k, v, mask):
  B, T, N, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      _FORWARD, (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
      vmap_method='sequential')(q, k, v, mask, scale=np.float32(_scale(q)))
  return out, lse


def _attention_fwd(q, k, v, mask):
  out, lse = _forward(q, k, v, mask)
  return out, (q, k, v, mask, out, lse)


def _attention_bwd(residuals, dout):
  q, k, v, mask, out, lse = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      _BACKWARD, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)),
      vmap_method='sequential')(q, k, v, mask, out, lse, dout.astype(q.dtype), scale=np.float32(_scale(q)))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
