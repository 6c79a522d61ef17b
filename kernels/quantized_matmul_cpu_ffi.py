"""Quantized projections through the CPU kernel of quantized_matmul_cpu.cc (built by cpu_kernels.py).

Inference only (no gradient): x float32 [M, I] times an int8 or packed int4 weight in quantize.py's
layout, dequantized in registers; the bias is the caller's.
"""

import jax

from vesper_jax.kernels import cpu_kernels


def supports(x: jax.Array) -> bool:
  return cpu_kernels.usable(x)


def int8_matmul(x_MI: jax.Array, q_IO: jax.Array, scales_O: jax.Array) -> jax.Array:
  """x_MI · (q_IO · scales_O), float32 [M, O]."""
  cpu_kernels.require()
  return jax.ffi.ffi_call('vesper_int8_matmul',
                          jax.ShapeDtypeStruct((x_MI.shape[0], q_IO.shape[1]), x_MI.dtype),
                          vmap_method='sequential')(x_MI, q_IO, scales_O)


def int4_matmul(x_MI: jax.Array, packed_JO: jax.Array, scales_GO: jax.Array,
                mins_GO: jax.Array) -> jax.Array:
  """x_MI · dequantize_int4(packed_JO, scales_GO, mins_GO), float32 [M, O]."""
  cpu_kernels.require()
  return jax.ffi.ffi_call('vesper_int4_matmul',
                          jax.ShapeDtypeStruct((x_MI.shape[0], packed_JO.shape[1]), x_MI.dtype),
                          vmap_method='sequential')(x_MI, packed_JO, scales_GO, mins_GO)
