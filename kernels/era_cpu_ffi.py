"""ERA through the CPU kernel of era_cpu.cc (built by cpu_kernels.py): a custom VJP over its two handlers."""

import functools

import jax
import numpy as np

from vesper_jax.kernels import cpu_kernels


def supports(x: jax.Array) -> bool:
  return cpu_kernels.usable(x)


def era(x: jax.Array, temperature: float, entropy_weight: float, detach_entropy: bool) -> jax.Array:
  """era.era(x, ...) over the last axis of float32 x, computed by the kernel."""
  cpu_kernels.require()
  x_MF = x.reshape(-1, x.shape[-1])
  return _era(x_MF, float(temperature), float(entropy_weight), bool(detach_entropy)).reshape(x.shape)


def _forward(x_MF, temperature, weight):
  return jax.ffi.ffi_call('vesper_era_forward', jax.ShapeDtypeStruct(x_MF.shape, x_MF.dtype),
                          vmap_method='sequential')(
                              x_MF, temperature=np.float32(temperature), weight=np.float32(weight))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _era(x_MF, temperature, weight, detach):
  return _forward(x_MF, temperature, weight)


def _era_fwd(x_MF, temperature, weight, detach):
  return _forward(x_MF, temperature, weight), x_MF


def _era_bwd(temperature, weight, detach, x_MF, dy_MF):
  dx = jax.ffi.ffi_call('vesper_era_backward', jax.ShapeDtypeStruct(x_MF.shape, x_MF.dtype),
                        vmap_method='sequential')(
                            x_MF, dy_MF, temperature=np.float32(temperature), weight=np.float32(weight),
                            detach=np.int32(detach))
  return (dx,)


_era.defvjp(_era_fwd, _era_bwd)
