"""The in-place Velvet / AdamW update of one flat buffer, written in Triton and called through jax-triton
(`opt.kernel='triton'`, SPEC §8). GPU only; needs the `triton` extra (jax-triton, which brings Triton).

The same update as kernels/velvet_pallas.py with `write_params=True`, in `triton.language` directly:
one launch per buffer, each program `block_size` elements; each element is read once from p, g, m, v and
written once to p, m, v, the three outputs aliased onto their inputs (`input_output_aliases`), so the
step moves the 28-byte-per-float32-parameter floor. The per-step scalars are the Pallas kernel's vector
(`pack_scalars`, velvet_elementwise.StepScalars in order): a new step never recompiles, and a skipped
step (identity scalars) writes every element back unchanged.

The only copy of the math: a @triton.jit body cannot call the JAX function that every other path calls
(`velvet_elementwise.update`), so `_velvet_block` transcribes it, expression for expression, and
tests/test_velvet_kernel.py::test_triton_matches_xla_on_gpu holds it to that function on a GPU. A change
to the math goes there first, then here.

Rounding: division and square root are the IEEE round-to-nearest forms (`tl.div_rn`, `tl.sqrt_rn`): plain
`/` and `tl.sqrt` are approximate in Triton, and the XLA path that this kernel must agree with is not.

jax-triton changed its aliasing convention in 0.4 (aliased outputs are no longer passed as their own
pointers): both kernels below share one body, and the installed version picks the signature.

Importing this module never fails: without Triton (a CPU machine, CI) `AVAILABLE` is False and
`velvet_update` raises one line; config validation refuses `opt.kernel='triton'` before that.
"""

import jax
import jax.numpy as jnp

from vesper_jax import platforms
from vesper_jax.kernels import velvet_pallas
from vesper_jax.kernels.velvet_pallas import BLOCK_SIZE, NUM_WARPS, pack_scalars  # noqa: F401 (re-exported)

# Two guards: Triton alone is enough to compile the kernel for a GPU target (the CPU test does), jax-triton
# (which needs a CUDA jaxlib) is what runs it from JAX.
try:
  import triton
  import triton.language as tl
  _IMPORT_ERROR = None
except ImportError as _error:  # the `triton` extra is not installed
  triton, _IMPORT_ERROR = None, _error
try:
  import jax_triton as jt
except ImportError as _error:
  jt, _IMPORT_ERROR = None, _IMPORT_ERROR or _error
AVAILABLE = triton is not None and jt is not None
# jax-triton 0.4 stopped passing aliased outputs as extra pointers: the kernel writes through its inputs.
_OUTPUTS_ARE_INPUTS = jt is not None and tuple(int(x) for x in jt.__version__.split('.')[:2]) >= (0, 4)


if triton is not None:

  @triton.jit
  def _velvet_block(s_ptr, p_ptr, g_ptr, m_ptr, v_ptr, p_out_ptr, m_out_ptr, v_out_ptr,
                    n: tl.constexpr, block_size: tl.constexpr, eps: tl.constexpr,
                    weight_decay: tl.constexpr):
    offsets = tl.program_id(0) * block_size + tl.arange(0, block_size)
    inside = offsets < n
    # The slots of pack_scalars: velvet_elementwise.StepScalars's fields, in order.
    step, beta1, one_minus_beta1 = tl.load(s_ptr + 0), tl.load(s_ptr + 1), tl.load(s_ptr + 2)
    c1, c2, b2, one_minus_b2 = tl.load(s_ptr + 3), tl.load(s_ptr + 4), tl.load(s_ptr + 5), tl.load(s_ptr + 6)
    grad_scale = tl.load(s_ptr + 7)
    p_raw = tl.load(p_ptr + offsets, mask=inside, other=0.0)
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
    v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
    # velvet_elementwise.update transcribed (no keep, write_params=True): the same expressions in the same
    # order, so that it rounds as the other paths do.
    g = tl.where(grad_scale > 0, g * grad_scale, 0.0)  # a skipped step (scale 0) may carry NaN gradients
    m = one_minus_beta1 * g + beta1 * m
    v = one_minus_b2 * (g * g) + b2 * v
    direction = tl.div_rn(tl.div_rn(m, c1), tl.sqrt_rn(tl.div_rn(v, c2)) + eps)
    if weight_decay != 0.0:
      direction = direction + weight_decay * p_raw.to(tl.float32)
    update = (step * direction).to(p_raw.dtype)
    tl.store(p_out_ptr + offsets, p_raw + update, mask=inside)  # in p's dtype, as optax.apply_updates adds
    tl.store(m_out_ptr + offsets, m, mask=inside)
    tl.store(v_out_ptr + offsets, v, mask=inside)

  @triton.jit
  def _velvet_kernel(s_ptr, p_ptr, g_ptr, m_ptr, v_ptr, p_out_ptr, m_out_ptr, v_out_ptr,
                     n: tl.constexpr, block_size: tl.constexpr, eps: tl.constexpr,
                     weight_decay: tl.constexpr):
    """jax-triton ≤ 0.3: the aliased outputs come as their own pointers (the same buffers as p, m, v)."""
    _velvet_block(s_ptr, p_ptr, g_ptr, m_ptr, v_ptr, p_out_ptr, m_out_ptr, v_out_ptr, n, block_size, eps,
                  weight_decay)

  @triton.jit
  def _velvet_kernel_in_place(s_ptr, p_ptr, g_ptr, m_ptr, v_ptr, n: tl.constexpr,
                              block_size: tl.constexpr, eps: tl.constexpr, weight_decay: tl.constexpr):
    """jax-triton ≥ 0.4: aliased outputs are written through the input pointers."""
    _velvet_block(s_ptr, p_ptr, g_ptr, m_ptr, v_ptr, p_ptr, m_ptr, v_ptr, n, block_size, eps, weight_decay)


def unavailable_reason() -> str | None:
  """One line saying why the kernel cannot run here, or None when it can (Triton present, a CUDA GPU)."""
  if not AVAILABLE:
    first_line = (str(_IMPORT_ERROR).strip().splitlines() or [type(_IMPORT_ERROR).__name__])[0]
    return ("needs jax-triton and Triton on a CUDA machine (pip install 'vesper_jax[triton]'), which "
            f"are not importable here ({first_line})")
  device = platforms.hardware()
  if device != 'gpu':
    return f'runs on a CUDA GPU only; this machine\'s devices are {device!r}'
  return None


def velvet_update(scalars: jax.Array, p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, *,
                  eps: float, weight_decay: float, write_params: bool = True, block_size: int = BLOCK_SIZE,
                  num_warps: int = NUM_WARPS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One fused Velvet step over flat buffers, in place: (p_new, m_new, v_new), aliased onto p, m, v.

  Args:
    scalars: `pack_scalars(velvet.StepScalars)`.
    p: parameters, 1-D, any float dtype (math in float32); g: gradients, same length.
    m, v: float32 moments, same length.
    eps, weight_decay: static (weight_decay 0 for an undecayed buffer).
    write_params: must be True: this kernel has only the in-place form (the optax form is Pallas's).
    block_size: elements per program, a power of two; num_warps: Triton warps per program.
  """
  if not AVAILABLE:
    raise RuntimeError(f"opt.kernel='triton': {unavailable_reason()}")
  if not write_params:
    raise ValueError('velvet_triton.velvet_update: only the in-place form (write_params=True) exists')
  n = velvet_pallas.check_buffers(p, g, m, v, block_size)
  out_shape = (jax.ShapeDtypeStruct(p.shape, p.dtype), jax.ShapeDtypeStruct(m.shape, jnp.float32),
               jax.ShapeDtypeStruct(v.shape, jnp.float32))
  # Inputs: 0 scalars, 1 p, 2 g, 3 m, 4 v → outputs 0 p, 1 m, 2 v (the gradient is read only).
  kernel, shapes = ((_velvet_kernel_in_place, {'out_type': out_shape}) if _OUTPUTS_ARE_INPUTS
                    else (_velvet_kernel, {'out_shape': out_shape}))
  return jt.triton_call(
      scalars, p, g, m, v, kernel=kernel, grid=(-(-n // block_size),),
      input_output_aliases={1: 0, 3: 1, 4: 2}, num_warps=num_warps, num_stages=1,
      name='velvet_update_triton', n=n, block_size=block_size, eps=float(eps),
      weight_decay=float(weight_decay), **shapes)
