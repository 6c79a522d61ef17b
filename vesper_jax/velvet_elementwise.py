"""Velvet's update of each element (SPEC §8), written once for every path that can call it.

    g = g · grad_scale ;  m = (1 − β1_t)·g + β1_t·m ;  v = (1 − b2)·g² + b2·v
    u = step · ((m / c1) / (sqrt(v / c2) + eps) + wd·p)        (step = −lr_t·s_E)

`update` is that math on arrays: velvet.py calls it on whole leaves (the optax tree path) and on whole flat
buffers (the in-place XLA path), and the Pallas kernel (kernels/velvet_pallas.py) calls it on the blocks
it loads, so the three cannot drift apart. The Triton kernel (kernels/velvet_triton.py) cannot call a JAX
function and transcribes it; tests/test_velvet_kernel.py holds that copy to this one on a GPU.

A module of its own because both velvet.py (which dispatches to the kernels) and the kernels import it:
kept in velvet.py, the kernel's import of it would close an import circle.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class StepScalars(NamedTuple):
  """What changes from step to step, as the per-element math reads it (float32 scalars or Python floats).

  A skipped step is `SKIPPED` (step 0, β1 1, b2 1, c 1, grad_scale 0), under which every element is
  written back unchanged, so skipping costs no second pass over the state. The kernels take these fields
  as one float32 vector, in this order (velvet_pallas.pack_scalars).
  """
  step: Any             # −lr_t·s_E (the sign folded in, as optax does)
  beta1: Any            # β1_t
  one_minus_beta1: Any  # 1 − β1_t, computed once so every path rounds it the same way
  c1: Any               # 1 − Π β1_τ
  c2: Any               # 1 − b2^t
  b2: Any
  one_minus_b2: Any
  grad_scale: Any       # the global-norm clip factor (None: clipped before, by optax); 0 = skipped step


SKIPPED = StepScalars(step=0.0, beta1=1.0, one_minus_beta1=0.0, c1=1.0, c2=1.0, b2=1.0, one_minus_b2=0.0,
                      grad_scale=0.0)


def update(p: jax.Array | None, g: jax.Array, m: jax.Array, v: jax.Array, keep: jax.Array | None = None, *,
           scalars: StepScalars, eps: float, weight_decay: float, write_params: bool
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One Velvet step of every element of p (a leaf, a flat buffer or a kernel's block).

  Args:
    p: parameters, any float dtype (the math is float32). Read only for weight decay or `write_params`;
      a caller with neither may pass None (the Pallas kernel then never loads p) and gets u in float32.
    g: gradients, p's shape, any float dtype.
    m, v: float32 moments, p's shape.
    keep: None, or bools broadcastable to p: False elements get no update and their moments are zeroed.
    scalars: this step's `StepScalars`.
    eps, weight_decay: static floats (weight_decay 0: no decay term at all).
    write_params: True → the new parameters p + u (added in p's dtype, as optax.apply_updates adds);
      False → the update u in p's dtype (optax's contract: the caller adds it).
  Returns:
    (p_new or u, m_new, v_new).
  """
  s = scalars
  g = g.astype(jnp.float32)
  if s.grad_scale is not None:
    # A select, not a product: a skipped step's gradient may hold NaN, and 0·NaN is NaN.
    g = jnp.where(s.grad_scale > 0, g * s.grad_scale, 0.0)
  m = s.one_minus_beta1 * g + s.beta1 * m
  v = s.one_minus_b2 * (g * g) + s.b2 * v
  direction = (m / s.c1) / (jnp.sqrt(v / s.c2) + eps)
  if weight_decay:
    direction = direction + weight_decay * p.astype(jnp.float32)
  out = s.step * direction
  if p is not None:
    out = out.astype(p.dtype)
  if write_params:
    out = p + out
  if keep is not None:
    # Selects after the add, so a frozen parameter is written back bit for bit (p + 0 turns −0 into +0).
    out = jnp.where(keep, out, p if write_params else 0.0)
    m, v = jnp.where(keep, m, 0.0), jnp.where(keep, v, 0.0)
  return out, m, v
