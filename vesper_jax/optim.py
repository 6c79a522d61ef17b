"""The optimizer from `config.opt`: schedule, clipping, weight-decay mask, AdamW or Velvet.

Two forms of Velvet, one math (velvet.py): the optax transformation over the parameter tree
(opt.kernel 'auto' | 'xla'), and the in-place step over flat buffers that the train state holds
(opt.kernel 'xla_flat' | 'pallas' | 'triton'; `in_place_kernel`, `flat_layout`, `make_in_place`).
"""

import math

import jax
import ml_collections
import optax

from vesper_jax import sharding
from vesper_jax import velvet
from vesper_jax.model import EMBEDDING_NAMES
from vesper_jax.pytree import PyTree, flatten, unflatten



def learning_rate_schedule(opt_config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to peak·min_lr_ratio at `num_steps`."""
  warmup = min(opt_config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=opt_config.learning_rate * opt_config.min_lr_ratio)


def decay_mask(params: PyTree, decay_embeddings: bool) -> PyTree:
  """True where weight decay applies: matrices only (never norms or biases), embeddings optional."""
  # Embeddings are excluded unless `opt.decay_embeddings`: decaying rarely-seen token rows toward zero
  # hurts more than it regularises.
  flat = flatten(params)
  mask = {k: v.ndim >= 2 and (decay_embeddings or k[0] not in EMBEDDING_NAMES) for k, v in flat.items()}
  return unflatten(mask)


def make_optimizer(opt_config: ml_collections.ConfigDict, num_steps: int,
                   params: PyTree, trainable: PyTree | None = None, *,
                   vocab_size: int | None = None) -> optax.GradientTransformationExtraArgs:
  """Builds the optimizer. `update` accepts `loss=` and `entropy=` keyword arguments (Velvet reads them;
  AdamW ignores them), so the train step calls both the same way.

  `trainable` (a tree of bools like params, e.g. flylora.trainable_mask) freezes the False leaves: see
  `freeze`. `vocab_size` gives Velvet ln V for its loss-based entropy when `update` gets no `entropy=`."""
  schedule = learning_rate_schedule(opt_config, num_steps)
  mask = decay_mask(params, opt_config.decay_embeddings)
  if opt_config.name == 'adamw':
    core = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                       weight_decay=opt_config.weight_decay, mask=mask)
  elif opt_config.name == 'velvet':
    o = opt_config
    core = velvet.velvet(
        schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        entropy_adaptive=o.entropy_adaptive, perplexity_guided=o.perplexity_guided, vocab_size=vocab_size,
        mask=mask, entropy_target=o.entropy_target, perplexity_pivot=o.perplexity_pivot,
        scale_min=o.scale_min, scale_max=o.scale_max, beta1_min=o.beta1_min, beta1_max=o.beta1_max,
        max_log_perplexity=o.max_log_perplexity, kernel='xla')  # the in-place kernels: make_in_place
  else:
    raise ValueError(f"opt.name={opt_config.name!r}: expected 'adamw' or 'velvet'")
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(core)
  tx = optax.chain(*parts)
  return tx if trainable is None else freeze(tx, trainable)


# Elements a flat buffer is padded to a multiple of (times the fsdp size when that does not divide it):
# every power-of-two mesh axis up to 4096 splits it evenly, so a resume on another such mesh keeps the
# layout; the padding costs at most 4095 elements per buffer.
FLAT_PAD = 4096


def in_place_kernel(opt_config: ml_collections.ConfigDict) -> str | None:
  """The in-place flat path `opt.kernel` selects for Velvet ('xla_flat', 'pallas', 'triton'), or None
  for the optax tree path. 'auto' is the tree path on every backend until GPU measurements show the
  in-place kernel ahead (README, Velvet)."""
  if opt_config.name != 'velvet' or opt_config.kernel in ('auto', 'xla'):
    return None
  return opt_config.kernel


def flat_layout(opt_config: ml_collections.ConfigDict, params: PyTree, fsdp_size: int) -> velvet.FlatLayout:
  """The flat buffers of the in-place path: decay groups as the optax path's mask, padded to split."""
  return velvet.flat_layout(params, decay_mask(params, opt_config.decay_embeddings),
                            pad_multiple=math.lcm(FLAT_PAD, fsdp_size))


def make_in_place(opt_config: ml_collections.ConfigDict, num_steps: int, layout: velvet.FlatLayout, *,
                  vocab_size: int, mesh: jax.sharding.Mesh | None = None) -> velvet.InPlace:
  """Velvet's in-place step over `layout`'s buffers (clipping is the train step's scalar, not a stage)."""
  o = opt_config
  return velvet.velvet_in_place(
      learning_rate_schedule(o, num_steps), layout.decay_mask(), kernel=in_place_kernel(o), eps=o.eps,
      weight_decay=o.weight_decay, mesh=mesh, shard_axis=sharding.FSDP, b1=o.b1, b2=o.b2,
      entropy_adaptive=o.entropy_adaptive, perplexity_guided=o.perplexity_guided, vocab_size=vocab_size,
      entropy_target=o.entropy_target, perplexity_pivot=o.perplexity_pivot, scale_min=o.scale_min,
      scale_max=o.scale_max, beta1_min=o.beta1_min, beta1_max=o.beta1_max,
      max_log_perplexity=o.max_log_perplexity)


# --- FlyLoRA fine-tuning (flylora.py): frozen parameters.
def freeze(tx: optax.GradientTransformation, trainable: PyTree) -> optax.GradientTransformationExtraArgs:
  """Applies `tx` to the trainable leaves only; frozen leaves get zero updates and no state at all.

  `optax.partition` hands `tx` a masked tree, so its moments exist only for trainable leaves, and
  clipping inside `tx` measures the global norm of the trainable gradients alone. Frozen leaves get
  `set_to_zero` (stateless), so even decoupled weight decay never touches them.
  """
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
  return optax.partition({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def count_state(opt_state: PyTree) -> int:
  """Number of array elements held in an optimizer state (to check nothing is kept for frozen params)."""
  return sum(int(x.size) for x in jax.tree.leaves(opt_state) if hasattr(x, 'size'))
