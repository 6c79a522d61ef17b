"""Velvet (SPEC §8): an AdamW whose step follows the model's predictive entropy and whose momentum
follows its perplexity, as an `optax.GradientTransformationExtraArgs`.

    Ĥ    = entropy (mean predictive entropy / ln V, in [0, 1])   or, without it,  min(loss, ln V) / ln V
    s_E  = clip(Ĥ / H_target, s_min, s_max)                      (1 unless entropy_adaptive)
    s_P  = clip(P_pivot / exp(min(loss, L_max)), s_min, s_max)   (1 unless perplexity_guided)
    β1_t = clip(b1 · s_P, β1_min, β1_max)                        (b1 unless perplexity_guided)
    m = β1_t·m + (1 − β1_t)·g ;  v = b2·v + (1 − b2)·g²
    c1 = 1 − Π_{τ≤t} β1_τ ;  c2 = 1 − b2^t
    u  = −lr_t · s_E · ((m / c1) / (sqrt(v / c2) + eps) + wd·p)

The train step calls `tx.update(grads, state, params, loss=loss, entropy=entropy)`; optax.chain hands the
keyword arguments through. A missing or non-finite loss (or a non-finite entropy) sets s_E = s_P = 1 for
that step. With both flags off this is optax.adamw to float rounding.

Speed. The update is memory-bound: it must read p, g, m, v and write p, m, v (28 bytes per float32
parameter). Inside a jitted train step the XLA path (`kernel='xla'`) is elementwise work that XLA can
fuse, with the caller's `optax.apply_updates` and the clipping scale, into one multi-output fusion per
buffer, moving just those 28 bytes (the CPU backend splits it into three fusions; what a GPU does, the
bench measures); what remains is launching one fusion per leaf of a ~100-leaf model tree. The
layout removes that: `flat_layout` packs the parameters into a few flat buffers (one per dtype and decay
group) that the train state can hold directly, so the update sees two large buffers. The Pallas kernel
(`kernel='pallas'`, kernels/velvet_pallas.py) is the same math in one launch per buffer; through optax it
must return the update u, which the caller then adds (12 more bytes per parameter, XLA cannot fuse into a
custom kernel), so `kernel='auto'` picks XLA on every backend. Its in-place form, which writes p itself,
is `vesper_jax.kernels.velvet_pallas.velvet_update(..., write_params=True)`; kernels/bench_velvet.py
times every path against optax.adamw and a device copy.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vesper_jax.pytree import PyTree

KERNELS = ('auto', 'xla', 'pallas')


class VelvetState(NamedTuple):
  """Optimizer state; the last four fields are what the train loop logs."""
  count: jax.Array          # int32 []: steps taken
  mu: PyTree                # float32, like params: first moment
  nu: PyTree                # float32, like params: second moment
  beta1_product: jax.Array  # float32 []: Π β1_τ over the steps taken (c1 = 1 − this)
  s_entropy: jax.Array      # float32 []: s_E applied at the last step (1 before the first)
  s_perplexity: jax.Array   # float32 []: s_P applied at the last step
  beta1: jax.Array          # float32 []: β1_t applied at the last step


def scalings(loss: jax.Array | float | None, entropy: jax.Array | float | None = None, *,
             b1: float = 0.9, vocab_size: int | None = None, entropy_adaptive: bool = True,
             perplexity_guided: bool = True, entropy_target: float = 0.5, perplexity_pivot: float = 40.0,
             scale_min: float = 0.5, scale_max: float = 2.0, beta1_min: float = 0.5,
             beta1_max: float = 0.999, max_log_perplexity: float = 20.0
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(s_E, s_P, β1_t) for one step, as float32 scalars; see the module docstring.

  Args:
    loss: mean cross-entropy in nats, or None.
    entropy: mean predictive entropy already divided by ln V (in [0, 1]), or None.
    vocab_size: V, needed only when the entropy is missing (Ĥ falls back to min(loss, ln V) / ln V).
  """
  one = jnp.ones((), jnp.float32)
  b1_const = jnp.asarray(b1, jnp.float32)
  if loss is None or not (entropy_adaptive or perplexity_guided):
    return one, one, b1_const
  loss = jnp.asarray(loss, jnp.float32)
  valid = jnp.isfinite(loss)
  if entropy is not None:
    entropy = jnp.asarray(entropy, jnp.float32)
    valid &= jnp.isfinite(entropy)
  # Non-finite inputs are replaced before use so that no NaN reaches the clips (where() would pass it).
  safe_loss = jnp.where(valid, loss, 0.0)
  s_e, s_p, beta1 = one, one, b1_const
  if entropy_adaptive:
    if entropy is not None:
      h = jnp.where(valid, entropy, 0.0)
    elif vocab_size is None:
      raise ValueError('velvet: update() got no entropy= and velvet() got no vocab_size, so the '
                       'loss-based entropy min(loss, ln V)/ln V cannot be formed; pass vocab_size')
    else:
      log_v = math.log(vocab_size)
      h = jnp.minimum(safe_loss, log_v) / log_v
    s_e = jnp.where(valid, jnp.clip(h / entropy_target, scale_min, scale_max), one)
  if perplexity_guided:
    perplexity = jnp.exp(jnp.minimum(safe_loss, max_log_perplexity))
    s_p = jnp.where(valid, jnp.clip(perplexity_pivot / perplexity, scale_min, scale_max), one)
    beta1 = jnp.where(valid, jnp.clip(b1 * s_p, beta1_min, beta1_max), b1_const)
  return s_e, s_p, beta1


def velvet_scalings(opt_state: PyTree) -> dict[str, jax.Array]:
  """s_entropy, s_perplexity, beta1 and beta1_product of the Velvet state inside a (chained) state.

  Returns {} when there is no Velvet state (e.g. AdamW), so the train loop can call it unconditionally.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, VelvetState))
           if isinstance(s, VelvetState)]
  if len(found) > 1:
    raise ValueError(f'velvet_scalings: {len(found)} Velvet states in one optimizer state')
  if not found:
    return {}
  s = found[0]
  return {'s_entropy': s.s_entropy, 's_perplexity': s.s_perplexity, 'beta1': s.beta1,
          'beta1_product': s.beta1_product}


# ----------------------------------------------------------------------------------------- the update

def _leaf_update(p, g, m, v, keep, *, step, beta1, one_minus_beta1, c1, c2, b2, eps, weight_decay):
  """The XLA path for one leaf: (u, m, v). kernels/velvet_pallas.py repeats these expressions exactly."""
  g = g.astype(jnp.float32)
  m = one_minus_beta1 * g + beta1 * m
  v = (1 - b2) * (g * g) + b2 * v
  direction = (m / c1) / (jnp.sqrt(v / c2) + eps)
  if weight_decay:
    direction = direction + weight_decay * p.astype(jnp.float32)
  u = step * direction
  if keep is not None:
    u, m, v = (jnp.where(keep, x, 0.0) for x in (u, m, v))
  return u.astype(p.dtype), m, v


def _kernel_update(p, g, m, v, keep, *, scalars, b2, eps, weight_decay, block_size):
  """The Pallas path for one leaf (raveled: a free reshape), returning the update u like optax."""
  from vesper_jax.kernels import velvet_pallas  # pylint: disable=g-import-not-at-top
  keep_flat = None if keep is None else jnp.broadcast_to(keep, p.shape).astype(jnp.int8).reshape(-1)
  u, m, v = velvet_pallas.velvet_update(
      scalars, p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), keep_flat, b2=b2, eps=eps,
      weight_decay=weight_decay, write_params=False, block_size=block_size)
  return u.reshape(p.shape), m.reshape(p.shape), v.reshape(p.shape)


def _per_leaf(mask: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree, what: str) -> list:
  """`mask` (a tree that is a prefix of params, or a function of params) as one entry per params leaf."""
  if mask is None:
    return [None] * len(jax.tree.leaves(params))
  tree = mask(params) if callable(mask) else mask
  try:
    spread = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
  except ValueError as e:
    raise ValueError(f'velvet: the {what} mask does not match the parameter tree: {e}') from None
  return jax.tree.leaves(spread)


# Long on purpose: an optax transformation is a closure over its hyperparameters, and `init_fn` /
# `update_fn` must share them; the update body itself is short (scalings, then one leaf update per leaf).
def velvet(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 0.01, entropy_adaptive: bool = True, perplexity_guided: bool = True,
           sparse_aware: PyTree | Callable[[PyTree], PyTree] | None = None, *,
           vocab_size: int | None = None, mask: PyTree | Callable[[PyTree], PyTree] | None = None,
           entropy_target: float = 0.5, perplexity_pivot: float = 40.0, scale_min: float = 0.5,
           scale_max: float = 2.0, beta1_min: float = 0.5, beta1_max: float = 0.999,
           max_log_perplexity: float = 20.0, kernel: str = 'auto',
           block_size: int = 1024) -> optax.GradientTransformationExtraArgs:
  """The Velvet optimizer; `update(grads, state, params, *, loss=None, entropy=None)`.

  Args:
    learning_rate: a float or an optax schedule of the step count (read before the step, as optax does).
    b1, b2, eps: Adam's; b1 is the momentum before the perplexity scaling.
    weight_decay: decoupled, scaled by lr_t·s_E like the rest of the step.
    entropy_adaptive, perplexity_guided: the two scalings (both off = AdamW).
    sparse_aware: None, or a mask (a tree of bool arrays broadcastable to each leaf, a prefix of params, or
      a function of params returning one): False elements get no update and their moments stay zero.
    vocab_size: V, for Ĥ = min(loss, ln V)/ln V when update() gets no entropy.
    mask: weight-decay mask like optax.adamw's (a tree of bools, a prefix of params, or a function of
      params): False leaves (norms, biases) get no decay.
    entropy_target, perplexity_pivot, scale_min, scale_max, beta1_min, beta1_max, max_log_perplexity:
      the constants of the scalings (H_target, P_pivot, the clip bounds, L_max).
    kernel: 'xla', 'pallas' (kernels/velvet_pallas.py; interpret mode on CPU) or 'auto' (= 'xla': see the
      module docstring).
    block_size: elements per Pallas program.
  """
  if kernel not in KERNELS:
    raise ValueError(f'velvet: kernel={kernel!r}: expected one of {KERNELS}')
  use_kernel = kernel == 'pallas'
  scaling_args = dict(b1=b1, vocab_size=vocab_size, entropy_adaptive=entropy_adaptive,
                      perplexity_guided=perplexity_guided, entropy_target=entropy_target,
                      perplexity_pivot=perplexity_pivot, scale_min=scale_min, scale_max=scale_max,
                      beta1_min=beta1_min, beta1_max=beta1_max, max_log_perplexity=max_log_perplexity)

  def init_fn(params):
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    one = jnp.ones((), jnp.float32)
    return VelvetState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                       nu=jax.tree.map(zeros, params), beta1_product=one, s_entropy=one,
                       s_perplexity=one, beta1=jnp.asarray(b1, jnp.float32))

  def update_fn(updates, state, params=None, *, loss=None, entropy=None, **extra_args):
    del extra_args  # meant for other transformations of a chain
    if params is None:
      raise ValueError('velvet: update() needs params (weight decay and the fused update read them)')
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)
    s_e, s_p, beta1 = scalings(loss, entropy, **scaling_args)
    beta1_product = state.beta1_product * beta1
    if perplexity_guided:
      one_minus_beta1 = 1 - beta1
      c1 = 1 - beta1_product
    else:
      # A constant β1: Python arithmetic and the closed-form product, exactly as optax.adamw rounds them.
      beta1, one_minus_beta1 = b1, 1 - b1
      c1 = 1 - b1**count
    c2 = 1 - b2**count
    step = -(lr * s_e) if entropy_adaptive else -1 * lr
    shared = dict(b2=b2, eps=eps)

    leaves_p, treedef = jax.tree.flatten(params)
    leaves_g = treedef.flatten_up_to(updates)
    leaves_m, leaves_v = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    decays = _per_leaf(mask, params, 'weight-decay')
    keeps = _per_leaf(sparse_aware, params, 'sparse_aware')
    if use_kernel:
      from vesper_jax.kernels import velvet_pallas  # pylint: disable=g-import-not-at-top
      scalars = velvet_pallas.pack_scalars(step, beta1, one_minus_beta1, c1, c2)
    out_u, out_m, out_v = [], [], []
    for p, g, m, v, decay, keep in zip(leaves_p, leaves_g, leaves_m, leaves_v, decays, keeps):
      if decay not in (None, True, False):
        raise ValueError(f'velvet: weight-decay mask leaves must be Python bools, got {decay!r}')
      wd = weight_decay if decay in (None, True) else 0.0
      keep = None if keep is None or keep is True else jnp.asarray(keep, bool)
      if use_kernel:
        u, m, v = _kernel_update(p, g, m, v, keep, scalars=scalars, weight_decay=wd,
                                 block_size=block_size, **shared)
      else:
        u, m, v = _leaf_update(p, g, m, v, keep, step=step, beta1=beta1,
                               one_minus_beta1=one_minus_beta1, c1=c1, c2=c2, weight_decay=wd, **shared)
      out_u.append(u), out_m.append(m), out_v.append(v)
    new_state = VelvetState(
        count=count, mu=treedef.unflatten(out_m), nu=treedef.unflatten(out_v),
        beta1_product=jnp.asarray(beta1_product, jnp.float32), s_entropy=jnp.asarray(s_e, jnp.float32),
        s_perplexity=jnp.asarray(s_p, jnp.float32), beta1=jnp.asarray(beta1, jnp.float32))
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------- flat layout

@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Where each leaf of a parameter tree lives in a few flat buffers, one per (dtype, decay) group.

  A train state that holds `flatten(params)` and calls the model on `unflatten(flat)` gives the optimizer
  two large buffers instead of a hundred leaves; the gradient comes back flat through the same slices.
  The decay group makes weight decay a per-buffer constant, so no mask is read per element.
  """
  treedef: Any
  slots: tuple[tuple[str, int, tuple[int, ...]], ...]  # per leaf: (buffer, offset, shape)
  buffers: tuple[tuple[str, int, str], ...]            # per buffer: (name, elements, dtype)

  def flatten(self, tree: PyTree) -> dict[str, jax.Array]:
    """The leaves of `tree` (params, grads or a same-shaped mask) packed into the flat buffers."""
    leaves = self.treedef.flatten_up_to(tree)
    out = {}
    for name, _, _ in self.buffers:
      # Broadcasting lets a mask give one bool for a whole leaf.
      parts = [jnp.broadcast_to(x, shape).reshape(-1)
               for x, (buf, _, shape) in zip(leaves, self.slots) if buf == name]
      out[name] = jnp.concatenate(parts)
    return out

  def unflatten(self, flat: dict[str, jax.Array]) -> PyTree:
    """The parameter tree, each leaf a static slice of its buffer (fused away by XLA where it is read)."""
    leaves = [flat[buf][off:off + math.prod(shape)].reshape(shape) for buf, off, shape in self.slots]
    return self.treedef.unflatten(leaves)

  def decay_mask(self) -> dict[str, bool]:
    """Velvet's / optax's weight-decay mask for the flat buffers."""
    return {name: name.endswith('/decay') for name, _, _ in self.buffers}


def flat_layout(params: PyTree, decay_mask: PyTree | None = None) -> FlatLayout:
  """The FlatLayout of `params` (arrays or ShapeDtypeStructs); `decay_mask` as for `velvet(mask=)`."""
  leaves, treedef = jax.tree.flatten(params)
  decays = _per_leaf(decay_mask, params, 'weight-decay')
  slots, sizes, dtypes = [], {}, {}
  for x, decay in zip(leaves, decays):
    name = f"{np.dtype(x.dtype).name}/{'decay' if decay in (None, True) else 'no_decay'}"
    slots.append((name, sizes.get(name, 0), tuple(x.shape)))
    sizes[name] = sizes.get(name, 0) + math.prod(x.shape)
    dtypes[name] = np.dtype(x.dtype).name
  return FlatLayout(treedef=treedef, slots=tuple(slots),
                    buffers=tuple((name, sizes[name], dtypes[name]) for name in sizes))
