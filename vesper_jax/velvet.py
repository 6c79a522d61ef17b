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
parameter). Its per-element math is written once, `velvet_elementwise.update` of a step's
`StepScalars`: the XLA paths call it on whole arrays, the Pallas kernel on each block it loads, and the
Triton kernel, which cannot call JAX, transcribes it under a GPU test. This module turns each step into
those scalars and serves two forms:
  - `velvet(...)`, the optax transformation over the parameter tree (`kernel='xla'`, or `'pallas'` for
    the kernel in its update-only form). Through optax a custom kernel must return the update u that the
    caller then adds (12 more bytes per parameter: XLA cannot fuse into a custom call).
  - `velvet_in_place(...)`, over the flat buffers of a `FlatLayout` that the train state holds: it writes
    p itself, so each buffer is read and written once (`kernel='xla_flat' | 'pallas' | 'triton'`), and
    the clip factor and the non-finite skip are two more scalars rather than passes over the state.
`opt.kernel='auto'` is the tree path on every backend until GPU measurements show the in-place kernel
ahead (README, Velvet); kernels/bench_velvet.py times every path against optax.adamw and a device copy.
"""

import dataclasses
import functools
import json
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vesper_jax import velvet_elementwise
from vesper_jax.pytree import PyTree

OPTAX_KERNELS = ('auto', 'xla', 'pallas')      # velvet(): the optax contract (returns the update u)
IN_PLACE_KERNELS = ('xla_flat', 'pallas', 'triton')  # velvet_in_place(): flat buffers, p written in place
KERNELS = ('auto', 'xla', 'xla_flat', 'pallas', 'triton')  # opt.kernel (optim.py says which is which)


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

def _kernel_update(p, g, m, v, keep, *, scalars: velvet_elementwise.StepScalars, eps, weight_decay,
                   block_size):
  """The Pallas path for one leaf (raveled: a free reshape), returning the update u like optax."""
  from vesper_jax.kernels import velvet_pallas  # pylint: disable=g-import-not-at-top
  keep_flat = None if keep is None else jnp.broadcast_to(keep, p.shape).astype(jnp.int8).reshape(-1)
  u, m, v = velvet_pallas.velvet_update(
      velvet_pallas.pack_scalars(scalars), p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
      keep_flat, eps=eps, weight_decay=weight_decay, write_params=False, block_size=block_size)
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


@dataclasses.dataclass(frozen=True)
class _Hyper:
  """The hyperparameters that turn (state, loss, entropy) into a step's velvet_elementwise.StepScalars."""
  learning_rate: float | optax.Schedule
  b1: float
  b2: float
  entropy_adaptive: bool
  perplexity_guided: bool
  scaling_args: dict

  def init(self, params: PyTree) -> 'VelvetState':
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    one = jnp.ones((), jnp.float32)
    return VelvetState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                       nu=jax.tree.map(zeros, params), beta1_product=one, s_entropy=one,
                       s_perplexity=one, beta1=jnp.asarray(self.b1, jnp.float32))

  def advance(self, state: 'VelvetState', loss, entropy, grad_scale=None, ok=None
              ) -> tuple[velvet_elementwise.StepScalars, 'VelvetState']:
    """This step's scalars and the state's new scalar fields (moments left to the caller).

    With `ok` (a bool scalar, the in-place path), a False step gets the identity scalars and keeps every
    scalar field of the state, so the elementwise pass writes the inputs back unchanged.
    """
    lr = self.learning_rate(state.count) if callable(self.learning_rate) else self.learning_rate
    count = optax.safe_increment(state.count)
    s_e, s_p, beta1 = scalings(loss, entropy, **self.scaling_args)
    beta1_product = state.beta1_product * beta1
    b1, b2 = self.b1, self.b2
    if self.perplexity_guided:
      one_minus_beta1 = 1 - beta1
      c1 = 1 - beta1_product
    else:
      # A constant β1: Python arithmetic and the closed-form product, exactly as optax.adamw rounds them.
      beta1, one_minus_beta1 = b1, 1 - b1
      c1 = 1 - b1**count
    c2 = 1 - b2**count
    step = -(lr * s_e) if self.entropy_adaptive else -1 * lr
    scalars = velvet_elementwise.StepScalars(step=step, beta1=beta1, one_minus_beta1=one_minus_beta1, c1=c1,
                                             c2=c2, b2=b2, one_minus_b2=1 - b2, grad_scale=grad_scale)
    new = state._replace(count=count, beta1_product=jnp.asarray(beta1_product, jnp.float32),
                         s_entropy=jnp.asarray(s_e, jnp.float32), s_perplexity=jnp.asarray(s_p, jnp.float32),
                         beta1=jnp.asarray(beta1, jnp.float32))
    if ok is None:
      return scalars, new
    if grad_scale is None:
      scalars = scalars._replace(grad_scale=1.0)
    # Python floats become float32 here with the same rounding XLA gives them as weak-typed constants.
    scalars = velvet_elementwise.StepScalars(*(jnp.where(ok, jnp.asarray(x, jnp.float32), skip)
                                               for x, skip in zip(scalars, velvet_elementwise.SKIPPED)))
    keep = lambda a, b: jnp.where(ok, a, b)
    new = new._replace(count=keep(new.count, state.count),
                       **{f: keep(getattr(new, f), getattr(state, f))
                          for f in ('beta1_product', 's_entropy', 's_perplexity', 'beta1')})
    return scalars, new


def _hyper(learning_rate, b1, b2, entropy_adaptive, perplexity_guided, vocab_size, entropy_target,
           perplexity_pivot, scale_min, scale_max, beta1_min, beta1_max, max_log_perplexity) -> _Hyper:
  scaling_args = dict(b1=b1, vocab_size=vocab_size, entropy_adaptive=entropy_adaptive,
                      perplexity_guided=perplexity_guided, entropy_target=entropy_target,
                      perplexity_pivot=perplexity_pivot, scale_min=scale_min, scale_max=scale_max,
                      beta1_min=beta1_min, beta1_max=beta1_max, max_log_perplexity=max_log_perplexity)
  return _Hyper(learning_rate, b1, b2, entropy_adaptive, perplexity_guided, scaling_args)


# Long on purpose: an optax transformation is a closure over its hyperparameters, and `init_fn` /
# `update_fn` must share them; the update body itself is short (scalars, then one leaf update per leaf).
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
      module docstring). The flat in-place paths ('xla_flat', 'triton') are `velvet_in_place`'s.
    block_size: elements per Pallas program.
  """
  if kernel not in OPTAX_KERNELS:
    raise ValueError(f'velvet: kernel={kernel!r}: expected one of {OPTAX_KERNELS} (the in-place paths '
                     f'{IN_PLACE_KERNELS} are velvet_in_place\'s)')
  use_kernel = kernel == 'pallas'
  hyper = _hyper(learning_rate, b1, b2, entropy_adaptive, perplexity_guided, vocab_size, entropy_target,
                 perplexity_pivot, scale_min, scale_max, beta1_min, beta1_max, max_log_perplexity)

  def update_fn(updates, state, params=None, *, loss=None, entropy=None, **extra_args):
    del extra_args  # meant for other transformations of a chain
    if params is None:
      raise ValueError('velvet: update() needs params (weight decay and the fused update read them)')
    scalars, new_state = hyper.advance(state, loss, entropy)
    leaves_p, treedef = jax.tree.flatten(params)
    leaves_g = treedef.flatten_up_to(updates)
    leaves_m, leaves_v = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    decays = _per_leaf(mask, params, 'weight-decay')
    keeps = _per_leaf(sparse_aware, params, 'sparse_aware')
    out_u, out_m, out_v = [], [], []
    for p, g, m, v, decay, keep in zip(leaves_p, leaves_g, leaves_m, leaves_v, decays, keeps):
      if decay not in (None, True, False):
        raise ValueError(f'velvet: weight-decay mask leaves must be Python bools, got {decay!r}')
      wd = weight_decay if decay in (None, True) else 0.0
      keep = None if keep is None or keep is True else jnp.asarray(keep, bool)
      if use_kernel:
        u, m, v = _kernel_update(p, g, m, v, keep, scalars=scalars, eps=eps, weight_decay=wd,
                                 block_size=block_size)
      else:
        u, m, v = velvet_elementwise.update(p, g, m, v, keep, scalars=scalars, eps=eps, weight_decay=wd,
                                            write_params=False)
      out_u.append(u), out_m.append(m), out_v.append(v)
    new_state = new_state._replace(mu=treedef.unflatten(out_m), nu=treedef.unflatten(out_v))
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformationExtraArgs(hyper.init, update_fn)


class InPlace(NamedTuple):
  """Velvet over a FlatLayout's buffers, writing the parameters itself (see `velvet_in_place`)."""
  init: Callable[[dict[str, jax.Array]], VelvetState]
  step: Callable[..., tuple[dict[str, jax.Array], VelvetState]]


def velvet_in_place(learning_rate: float | optax.Schedule, decay: dict[str, bool], *,
                    kernel: str = 'xla_flat', eps: float = 1e-8, weight_decay: float = 0.01,
                    block_size: int = 1024, mesh: jax.sharding.Mesh | None = None,
                    shard_axis: str = 'fsdp', **hyperparameters) -> InPlace:
  """Velvet as the core of a train step whose state holds a FlatLayout's buffers.

  `step(params, grads, state, *, loss, entropy, grad_scale, ok) -> (params, state)`: each buffer is read
  once (p, g, m, v) and written once (p, m, v), the clip factor and the step's other scalars folded in;
  a step with `ok` False writes everything back unchanged (and keeps the state's scalars).

  Args:
    learning_rate: as for `velvet`.
    decay: buffer name → whether weight decay applies (`FlatLayout.decay_mask()`): a per-buffer constant.
    kernel: 'xla_flat' (the same math through XLA, which fuses it into one pass per buffer), 'pallas'
      (kernels/velvet_pallas.py, in place through input_output_aliases; interpret mode on CPU) or
      'triton' (kernels/velvet_triton.py, jax-triton; GPU only).
    eps, weight_decay: as for `velvet`.
    block_size: elements per kernel program.
    mesh, shard_axis: when the buffers are split over `shard_axis` of `mesh`, the kernels run per shard
      (shard_map): the update is elementwise, so no element needs another device's data.
    **hyperparameters: velvet()'s b1, b2, entropy_adaptive, perplexity_guided, vocab_size and scaling
      constants, with the same defaults.
  """
  if kernel not in IN_PLACE_KERNELS:
    raise ValueError(f'velvet_in_place: kernel={kernel!r}: expected one of {IN_PLACE_KERNELS}')
  args = dict(b1=0.9, b2=0.999, entropy_adaptive=True, perplexity_guided=True, vocab_size=None,
              entropy_target=0.5, perplexity_pivot=40.0, scale_min=0.5, scale_max=2.0, beta1_min=0.5,
              beta1_max=0.999, max_log_perplexity=20.0)
  unknown = set(hyperparameters) - set(args)
  if unknown:
    raise TypeError(f'velvet_in_place: unexpected arguments {sorted(unknown)}')
  hyper = _hyper(learning_rate, **(args | hyperparameters))

  def buffer_update(scalars: velvet_elementwise.StepScalars, p, g, m, v, wd: float):
    if kernel == 'xla_flat':
      # One elementwise expression per buffer, which XLA fuses into a single pass (p + u included).
      return velvet_elementwise.update(p, g, m, v, scalars=scalars, eps=eps, weight_decay=wd,
                                       write_params=True)
    if kernel == 'pallas':
      from vesper_jax.kernels import velvet_pallas as impl  # pylint: disable=g-import-not-at-top
    else:
      from vesper_jax.kernels import velvet_triton as impl  # pylint: disable=g-import-not-at-top
    packed = impl.pack_scalars(scalars)
    run = functools.partial(impl.velvet_update, eps=eps, weight_decay=wd, write_params=True,
                            block_size=block_size)
    # Per device whenever there are several: a custom kernel is opaque to XLA's partitioner, which
    # would otherwise gather a split buffer onto every device to run it.
    if mesh is not None and mesh.size > 1:
      spec = jax.sharding.PartitionSpec(shard_axis)
      run = jax.shard_map(run, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),) + (spec,) * 4,
                          out_specs=(spec,) * 3, check_vma=False)
    return run(packed, p, g, m, v)

  def step_fn(params, grads, state, *, loss, entropy, grad_scale, ok):
    scalars, new_state = hyper.advance(state, loss, entropy, grad_scale=grad_scale, ok=ok)
    out_p, out_m, out_v = {}, {}, {}
    for name in params:
      wd = weight_decay if decay[name] else 0.0
      out_p[name], out_m[name], out_v[name] = buffer_update(
          scalars, params[name], grads[name], state.mu[name], state.nu[name], wd)
    return out_p, new_state._replace(mu=out_m, nu=out_v)

  return InPlace(hyper.init, step_fn)


# ----------------------------------------------------------------------------------------- flat layout

@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Where each leaf of a parameter tree lives in a few flat buffers, one per (decay group, dtype).

  A train state that holds `flatten(params)` and calls the model on `unflatten(flat)` gives the optimizer
  two large buffers instead of a hundred leaves; the gradient comes back flat through the same slices.
  The decay group makes weight decay a per-buffer constant, so no mask is read per element. Buffers end
  in zeros up to a multiple of `pad_multiple` (so they split evenly over a mesh axis); a zero element
  with a zero gradient and zero moments stays zero under the update.
  """
  treedef: Any
  slots: tuple[tuple[str, int, tuple[int, ...]], ...]  # per leaf: (buffer, offset, shape)
  buffers: tuple[tuple[str, int, str], ...]            # per buffer: (name, elements with padding, dtype)

  def flatten(self, tree: PyTree) -> dict[str, jax.Array]:
    """The leaves of `tree` (params, grads or a same-shaped mask) packed into the flat buffers."""
    leaves = self.treedef.flatten_up_to(tree)
    out = {}
    for name, size, dtype in self.buffers:
      # Broadcasting lets a mask give one bool for a whole leaf.
      parts = [jnp.broadcast_to(x, shape).reshape(-1)
               for x, (buf, _, shape) in zip(leaves, self.slots) if buf == name]
      used = sum(x.size for x in parts)
      parts.append(jnp.zeros((size - used,), parts[0].dtype if parts else dtype))
      out[name] = jnp.concatenate(parts)
    return out

  def unflatten(self, flat: dict[str, jax.Array]) -> PyTree:
    """The parameter tree, each leaf a static slice of its buffer (fused away by XLA where it is read)."""
    leaves = [flat[buf][off:off + math.prod(shape)].reshape(shape) for buf, off, shape in self.slots]
    return self.treedef.unflatten(leaves)

  def decay_mask(self) -> dict[str, bool]:
    """Velvet's / optax's weight-decay mask for the flat buffers."""
    return {name: name.startswith('decay_') for name, _, _ in self.buffers}

  def to_json(self) -> str:
    """The layout as JSON (leaf paths instead of the treedef), for a checkpoint's reader."""
    paths = [jax.tree_util.keystr(path, simple=True, separator='/')
             for path, _ in jax.tree_util.tree_flatten_with_path(
                 self.treedef.unflatten(list(range(len(self.slots)))))[0]]
    return json.dumps({'buffers': [list(b) for b in self.buffers],
                       'slots': [[path, buf, off, list(shape)]
                                 for path, (buf, off, shape) in zip(paths, self.slots)]})


def layout_from_json(text: str) -> FlatLayout:
  """The FlatLayout `FlatLayout.to_json` wrote; its tree is nested dicts keyed by the path parts."""
  data = json.loads(text)
  tree = {}
  for index, (path, _, _, _) in enumerate(data['slots']):
    node = tree
    *parents, last = path.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = index
  order = jax.tree.leaves(tree)  # dict keys sort as jax sorts them: the index of each leaf, in order
  slots = tuple((data['slots'][i][1], data['slots'][i][2], tuple(data['slots'][i][3])) for i in order)
  return FlatLayout(treedef=jax.tree.structure(tree), slots=slots,
                    buffers=tuple((n, s, d) for n, s, d in data['buffers']))


def flat_layout(params: PyTree, decay_mask: PyTree | None = None, pad_multiple: int = 1) -> FlatLayout:
  """The FlatLayout of `params` (arrays or ShapeDtypeStructs); `decay_mask` as for `velvet(mask=)`.

  Buffer names are `decay_<dtype>` and `no_decay_<dtype>` (plain words: checkpoint keys).
  """
  leaves, treedef = jax.tree.flatten(params)
  decays = _per_leaf(decay_mask, params, 'weight-decay')
  slots, sizes, dtypes = [], {}, {}
  for x, decay in zip(leaves, decays):
    name = f"{'decay' if decay in (None, True) else 'no_decay'}_{np.dtype(x.dtype).name}"
    slots.append((name, sizes.get(name, 0), tuple(x.shape)))
    sizes[name] = sizes.get(name, 0) + math.prod(x.shape)
    dtypes[name] = np.dtype(x.dtype).name
  padded = {name: -(-size // pad_multiple) * pad_multiple for name, size in sizes.items()}
  return FlatLayout(treedef=treedef, slots=tuple(slots),
                    buffers=tuple((name, padded[name], dtypes[name]) for name in sizes))
