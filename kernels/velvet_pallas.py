"""The fused Velvet / AdamW update of one flat buffer, as a Pallas kernel (SPEC §8).

One launch walks the whole buffer in blocks of `block_size` elements. Each element is read once from
p, g, m and v and written once to (p or u), m and v, in place (`input_output_aliases`): 28 bytes per
float32 parameter, the floor for this update. The math between the loads and the stores is not written
here: the kernel body calls `velvet_elementwise.update`, the function the XLA paths call on whole arrays,
so the kernel cannot disagree with them. The scalars that change every step (velvet_elementwise.StepScalars:
the step size, β1_t, the bias corrections, b2 and the clip factor) come in as one small float32 vector,
so a new step never recompiles, and a skipped step (identity scalars) writes every element back unchanged.

Backends: on GPU the kernel lowers through Pallas-Triton; the Triton compiler parameters are passed
explicitly because JAX 0.11 makes Mosaic GPU the default Pallas GPU backend (Pallas-Triton is deprecated
there but still served when asked for by its CompilerParams). On CPU it runs with `interpret=True`,
which is how the tests check it against the XLA path of `vesper_jax.velvet`.

Tails: the last block of a buffer whose length is not a multiple of `block_size` is masked explicitly
(loads and stores with `mask=`), because Pallas-Triton offsets block pointers without bounds checks.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from vesper_jax import platforms
from vesper_jax import velvet_elementwise

BLOCK_SIZE = 1024  # elements per program: a power of two (Triton); 4 warps → 8 floats per thread
NUM_WARPS = 4
# Length of the scalars vector: StepScalars's fields, in order (a power of two, as Triton loads require).
NUM_SCALARS = 8


def pack_scalars(scalars: velvet_elementwise.StepScalars) -> jax.Array:
  """A step's `velvet_elementwise.StepScalars` as the kernels read them: float32[NUM_SCALARS].

  A None grad_scale (the optax path, clipped before) becomes 1, which the select leaves exact.
  """
  values = scalars._replace(grad_scale=1.0) if scalars.grad_scale is None else scalars
  return jnp.stack([jnp.asarray(x, jnp.float32) for x in values])


def _kernel(*refs, n: int, block_size: int, eps: float, weight_decay: float, write_params: bool,
            has_keep: bool):
  if has_keep:
    s_ref, p_ref, g_ref, m_ref, v_ref, keep_ref, out_ref, m_out, v_out = refs
  else:
    s_ref, p_ref, g_ref, m_ref, v_ref, out_ref, m_out, v_out = refs
    keep_ref = None
  idx = pl.program_id(0) * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size,), 0)
  inside = idx < n

  def load(ref):
    # Explicit masks: Pallas-Triton offsets block pointers without bounds checks (the module docstring).
    return plt.load(ref, mask=inside, other=0)

  scalars = velvet_elementwise.StepScalars(*(s_ref[i] for i in range(NUM_SCALARS)))
  # p is loaded only when something reads it: an update-only call on an undecayed buffer moves 24 B/elem.
  p = load(p_ref) if (weight_decay or write_params) else None
  keep = None if keep_ref is None else load(keep_ref) != 0
  out, m, v = velvet_elementwise.update(p, load(g_ref), load(m_ref), load(v_ref), keep, scalars=scalars,
                                        eps=eps, weight_decay=weight_decay, write_params=write_params)
  # The cast matters only when p was not loaded: then u comes back float32 (p's dtype otherwise).
  plt.store(out_ref, out.astype(out_ref.dtype), mask=inside)
  plt.store(m_out, m, mask=inside)
  plt.store(v_out, v, mask=inside)


def check_buffers(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, block_size: int,
                  keep: jax.Array | None = None) -> int:
  """The checks every fused update kernel (this one, velvet_triton's) makes of its flat buffers; returns
  their length."""
  (n,) = p.shape
  for name, x in (('g', g), ('m', m), ('v', v)) + ((('keep', keep),) if keep is not None else ()):
    if x.shape != p.shape:
      raise ValueError(f'velvet_update: {name} has shape {x.shape}, p has {p.shape}')
  if m.dtype != jnp.float32 or v.dtype != jnp.float32:
    raise ValueError(f'velvet_update: moments must be float32, got m {m.dtype}, v {v.dtype}')
  if block_size & (block_size - 1):
    raise ValueError(f'velvet_update: block_size={block_size} must be a power of two')
  if n >= 2**31 - block_size:
    raise ValueError(f'velvet_update: {n} elements overflow the kernel\'s int32 offsets; split the buffer')
  return n


def velvet_update(scalars: jax.Array, p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array,
                  keep: jax.Array | None = None, *, eps: float, weight_decay: float,
                  write_params: bool, block_size: int = BLOCK_SIZE, num_warps: int = NUM_WARPS,
                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One fused Velvet step over flat buffers, in place.

  Args:
    scalars: `pack_scalars(...)`.
    p: parameters, 1-D, any float dtype (math in float32).
    g: gradients, 1-D, same length.
    m, v: float32 moments, same length.
    keep: optional int8 mask, same length: 0 = frozen element (no update, moments set to 0).
    eps, weight_decay: static hyperparameters (weight_decay 0 for an undecayed buffer).
    write_params: True → returns the new parameters, aliased onto `p` (the 28 B/param in-place step);
      False → returns the update u (optax's contract: the caller adds it), aliased onto `g`.
    block_size: elements per program, a power of two.
    num_warps: Triton warps per program (GPU only).
    interpret: run the Pallas interpreter; None = only where the devices are CPUs (what the hardware can
      compile, platforms.hardware: not a per-platform choice, so a platform='gpu' run on a CPU still
      interprets).
  Returns:
    (p_new or u, m_new, v_new), each the same shape and dtype as the buffer it replaces.
  """
  n = check_buffers(p, g, m, v, block_size, keep)
  if interpret is None:
    interpret = platforms.hardware() == 'cpu'
  has_keep = keep is not None
  kernel = functools.partial(_kernel, n=n, block_size=block_size, eps=float(eps),
                             weight_decay=float(weight_decay), write_params=write_params,
                             has_keep=has_keep)
  block = pl.BlockSpec((block_size,), lambda i: (i,))
  in_specs = [pl.BlockSpec((NUM_SCALARS,), lambda i: (0,))] + [block] * (5 if has_keep else 4)
  out_dtype = p.dtype
  out_shape = (jax.ShapeDtypeStruct(p.shape, out_dtype), jax.ShapeDtypeStruct(m.shape, jnp.float32),
               jax.ShapeDtypeStruct(v.shape, jnp.float32))
  # Inputs: 0 scalars, 1 p, 2 g, 3 m, 4 v (5 keep). The first output overwrites p (in-place step) or
  # g (update-only: the gradient is dead once its update exists); the moments overwrite themselves.
  aliases = {1 if write_params else 2: 0, 3: 1, 4: 2}
  if not write_params and g.dtype != out_dtype:
    aliases.pop(2)  # a bfloat16 gradient cannot hold a float32 update
  args = (scalars, p, g, m, v) + ((keep,) if has_keep else ())
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(n, block_size),),
      in_specs=in_specs,
      out_specs=(block, block, block),
      input_output_aliases=aliases,
      compiler_params=None if interpret else plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name='velvet_update',
  )(*args)
