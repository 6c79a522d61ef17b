"""FlyLoRA: sparse, routed low-rank adapters (SPEC §5, after Zou et al., NeurIPS 2025).

For an adapted projection with base kernel W (I × O), rank R and top-k E (`lora_k`):

    z = x·A                  A: I × R, frozen, sparse random: each column has exactly p = round(ρ·I)
                             non-zeros drawn from N(0, 1/R²), generated from `lora_seed` and the layer's path
    m = top_k(|z + d|)       per-token mask over the R ranks; d: R "expert biases", never trained by
                             gradient: after each optimizer step d_i += u·sign(mean(c) − c_i), where c_i
                             counts how often rank i was selected in the step's batch
    y = x·W + (α/R)·(z ⊙ m)·B    B: R × O, trainable, zero-initialised; α = 2R by default

The plain-LoRA mode (`lora_mode='lora'`) has a dense trainable A (the usual uniform ±1/sqrt(I) init), no
routing and no expert biases. Everything lives in the `params` collection (`kernel`, `bias`, `lora_a`,
`lora_b`, `expert_bias`) so that checkpoints, inference and export carry A and d with no extra
plumbing; what trains is decided by `trainable_mask` and enforced by the optimizer (optim.py), and A and d
are behind `stop_gradient` so no gradient is ever computed for them.

The forward pass sows each adapted layer's per-rank selection counts into the `lora_counts` collection
(only when the caller makes it mutable); the train step sums them over micro-batches and calls
`update_expert_biases` once per step.

Shape suffixes follow the package's key (model.py): B batch, T tokens (any leading axes), I in features,
O out features, R rank, E ranks selected per token.

Annotations name `'ModelConfig'` (model.ModelConfig) as a string and this module never imports model:
model.py builds its projections from `LoRADense`, so the import points from model to here only.
Loading a base model for fine-tuning lives with training (finetune.py), adapter files with export.py.
"""

import zlib
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from vesper_jax.pytree import Path, PyTree, flatten, unflatten

TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
MODES = ('flylora', 'lora')
COUNTS = 'lora_counts'  # the variable collection the forward pass sows rank-selection counts into
ADAPTER_LEAVES = ('lora_a', 'lora_b', 'expert_bias')
# The model.lora_* fields an adapter file records: with the base config they rebuild the adapted model.
SETTINGS = ('lora_targets', 'lora_mode', 'lora_rank', 'lora_k', 'lora_rho', 'lora_alpha', 'lora_seed')


# ---------------------------------------------------------------------------------------------- config

def targets(config: 'ModelConfig') -> tuple[str, ...]:
  """The adapted projections, e.g. ('gate', 'up'); () for a plain model."""
  return tuple(t.strip() for t in config.lora_targets.split(',') if t.strip())


def density(config: 'ModelConfig') -> float:
  """ρ, the fraction of non-zeros per column of A (k / rank unless set)."""
  return config.lora_k / config.lora_rank if config.lora_rho is None else config.lora_rho


def scale(config: 'ModelConfig') -> float:
  """α / r, with α = 2r unless set."""
  alpha = 2.0 * config.lora_rank if config.lora_alpha is None else config.lora_alpha
  return alpha / config.lora_rank


def nonzeros_per_column(config: 'ModelConfig', in_features: int) -> int:
  """p = round(ρ·I): the number of non-zeros in every column of A."""
  return int(round(density(config) * in_features))


def validate(config: 'ModelConfig') -> None:
  """Raises ValueError naming the `model.lora_*` key that is out of range."""
  unknown = [t for t in targets(config) if t not in TARGETS]
  if unknown:
    raise ValueError(f'model.lora_targets={config.lora_targets!r}: unknown {unknown}; '
                     f'expected a comma-separated subset of {TARGETS}')
  if config.lora_mode not in MODES:
    raise ValueError(f'model.lora_mode={config.lora_mode!r}: expected one of {MODES}')
  if config.lora_rank < 1:
    raise ValueError(f'model.lora_rank={config.lora_rank} must be >= 1')
  if not 1 <= config.lora_k <= config.lora_rank:
    raise ValueError(f'model.lora_k={config.lora_k} must be in [1, model.lora_rank={config.lora_rank}]')
  if config.lora_rho is not None and not 0.0 < config.lora_rho <= 1.0:
    raise ValueError(f'model.lora_rho={config.lora_rho} must be in (0, 1]')


def is_target(config: 'ModelConfig', name: str) -> bool:
  """Whether the projection called `name` ('q_proj', 'gate_proj', ...) carries an adapter."""
  return name.endswith('_proj') and name[:-len('_proj')] in targets(config)


# ---------------------------------------------------------------------------------------------- layer

def sparse_projection(key: jax.Array, in_features: int, rank: int, nonzeros: int) -> jax.Array:
  """A (I × R): every column has exactly `nonzeros` non-zeros, drawn from N(0, 1/R²)."""
  if not 1 <= nonzeros <= in_features:
    raise ValueError(f'FlyLoRA: p = round(lora_rho·in) = {nonzeros} must be in [1, in={in_features}]')
  row_key, value_key = jax.random.split(key)
  # A random ordering of the rows of each column; its first p rows are the column's support, so the
  # count is exact (a Bernoulli(ρ) mask would only be right on average).
  order_IR = jnp.argsort(jnp.argsort(jax.random.uniform(row_key, (in_features, rank)), axis=0), axis=0)
  values_IR = jax.random.normal(value_key, (in_features, rank), jnp.float32) / rank
  # A float32 normal draw is exactly 0 with probability ~2^-23; keep the support's size exact anyway.
  values_IR = jnp.where(values_IR == 0, jnp.finfo(jnp.float32).tiny, values_IR)
  return jnp.where(order_IR < nonzeros, values_IR, 0.0)


def route(z_BTR: jax.Array, expert_bias_R: jax.Array, k: int) -> jax.Array:
  """The routing mask: 1.0 on the top-k ranks of |z + d| of each token, else 0.0 (exactly k per token)."""
  score_BTR = jnp.abs(z_BTR.astype(jnp.float32) + expert_bias_R)
  _, top_BTE = jax.lax.top_k(score_BTR, k)  # k distinct indices, so exactly k ranks even on ties
  return jnp.sum(jax.nn.one_hot(top_BTE, z_BTR.shape[-1], dtype=jnp.float32), axis=-2)


def _layer_key(seed: int, path: tuple[str, ...]) -> jax.Array:
  # Each layer's A comes from the seed and the layer's path alone: reproducible without the params RNG,
  # and different for every layer of the same model.
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32('/'.join(path).encode()) & 0x7FFFFFFF)


class LoRADense(nn.Module):
  """A dense projection `x·W (+ bias)` with a FlyLoRA (or plain LoRA) adapter added to its output.

  The base computation is the same `lax.dot_general` as `nn.Dense` and the parameters keep its names
  (`kernel`, `bias`), so with B = 0 the output equals the plain layer's bit for bit.
  """
  config: 'ModelConfig'
  features: int
  kernel_init: Callable[..., jax.Array]

  @nn.compact
  def __call__(self, x_BTI: jax.Array) -> jax.Array:
    c = self.config
    dtype = c.compute_dtype
    I, O, R = x_BTI.shape[-1], self.features, c.lora_rank
    kernel_IO = self.param('kernel', self.kernel_init, (I, O), jnp.float32)
    bias_O = self.param('bias', nn.initializers.zeros, (O,), jnp.float32) if c.use_bias else None
    key = _layer_key(c.lora_seed, tuple(self.scope.path))
    if c.lora_mode == 'flylora':
      p = nonzeros_per_column(c, I)
      a_IR = self.param('lora_a', lambda _: sparse_projection(key, I, R, p))
      expert_bias_R = jax.lax.stop_gradient(self.param('expert_bias', nn.initializers.zeros, (R,),
                                                       jnp.float32))
      a_IR = jax.lax.stop_gradient(a_IR)  # frozen: no gradient is ever computed for A
    else:
      # peft's default (kaiming-uniform, a=√5): U(−1/√I, 1/√I).
      a_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
      a_IR = self.param('lora_a', lambda _: a_init(key, (I, R), jnp.float32))
    b_RO = self.param('lora_b', nn.initializers.zeros, (R, O), jnp.float32)

    x_BTI, kernel_IO, bias_O, a_IR, b_RO = nn.dtypes.promote_dtype(x_BTI, kernel_IO, bias_O, a_IR, b_RO,
                                                                  dtype=dtype)
    contract = (((x_BTI.ndim - 1,), (0,)), ((), ()))
    y_BTO = jax.lax.dot_general(x_BTI, kernel_IO, contract)
    if bias_O is not None:
      y_BTO += jnp.reshape(bias_O, (1,) * (y_BTO.ndim - 1) + (-1,))

    z_BTR = jax.lax.dot_general(x_BTI, a_IR, contract)
    if c.lora_mode == 'flylora':
      mask_BTR = route(z_BTR, expert_bias_R, c.lora_k)
      # Per-rank counts over every token of the batch, for the expert-bias rule (a no-op unless the
      # caller makes `lora_counts` mutable, so inference is unaffected). Not at init: `init` makes every
      # collection mutable, and counts of its dummy input kept in the variables would be added to the
      # first real step's.
      if not self.is_initializing():
        counts_R = jnp.sum(mask_BTR.reshape(-1, R), axis=0).astype(jnp.int32)
        self.sow(COUNTS, 'rank_counts', counts_R, init_fn=lambda: jnp.zeros((R,), jnp.int32),
                 reduce_fn=lambda a, b: a + b)
      z_BTR = z_BTR * mask_BTR.astype(z_BTR.dtype)
    delta_BTO = jax.lax.dot_general(z_BTR, b_RO, contract)
    return y_BTO + jnp.asarray(scale(c), dtype) * delta_BTO


# ---------------------------------------------------------------------------------------------- trees

def is_adapter_leaf(path: Path) -> bool:
  """Whether a parameter path ends in an adapter tensor (A, B or d)."""
  return path[-1] in ADAPTER_LEAVES


def adapted_modules(params: PyTree) -> list[Path]:
  """Paths of the modules that carry a `lora_b` (sorted, so layer order is stable)."""
  return sorted(k[:-1] for k in flatten(params) if k[-1] == 'lora_b')


def trainable_mask(params: PyTree, config: 'ModelConfig') -> PyTree:
  """True where the optimizer updates a parameter.

  With adapters: only B (and A in plain-LoRA mode); the base and FlyLoRA's A and d are frozen.
  Without adapters (full fine-tuning or pretraining): everything.
  """
  flat = flatten(params)
  if not targets(config):
    return unflatten({k: True for k in flat})
  train = ('lora_b',) if config.lora_mode == 'flylora' else ('lora_a', 'lora_b')
  return unflatten({k: k[-1] in train for k in flat})


def base_params(params: PyTree) -> PyTree:
  """The parameter tree without its adapter leaves (what the base model expects)."""
  return unflatten({k: v for k, v in flatten(params).items() if not is_adapter_leaf(k)})


def graft_base(params: PyTree, base: PyTree) -> PyTree:
  """Puts a base model's weights into an adapted model's tree, keeping the adapters.

  Raises ValueError naming the parameter if the base has a tensor the adapted model lacks, lacks one it
  needs, or has a different shape or dtype.
  """
  flat, flat_base = flatten(params), flatten(base)
  for key, value in flat_base.items():
    if is_adapter_leaf(key):
      raise ValueError(f'graft_base: the base tree already holds adapter tensor {"/".join(key)}')
    if key not in flat:
      raise ValueError(f'graft_base: base tensor {"/".join(key)} has no place in the adapted model '
                       '(different architecture?)')
    if value.shape != flat[key].shape or value.dtype != flat[key].dtype:
      raise ValueError(f'graft_base: {"/".join(key)} is {value.dtype}{list(value.shape)} in the base, '
                       f'{flat[key].dtype}{list(flat[key].shape)} in the adapted model')
  missing = [k for k in flat if not is_adapter_leaf(k) and k not in flat_base]
  if missing:
    raise ValueError(f'graft_base: the base lacks {"/".join(missing[0])} (and {len(missing) - 1} more)')
  return unflatten({k: flat_base.get(k, v) for k, v in flat.items()})


def stop_frozen_gradients(params: PyTree, trainable: PyTree) -> PyTree:
  """params with `stop_gradient` on the frozen leaves: their gradients are zeros, never computed."""
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


# ---------------------------------------------------------------------------------------------- expert biases

def update_expert_biases(params: PyTree, counts: PyTree, rate: float) -> PyTree:
  """The load-balancing rule, once per optimizer step: d_i += rate·sign(mean(c) − c_i).

  Args:
    params: the parameter tree (holding each FlyLoRA layer's `expert_bias`).
    counts: the `lora_counts` collection sown by the step's forward passes (summed over micro-batches):
      per adapted layer, `rank_counts` [R], how many tokens selected each rank.
    rate: u (`model.lora_bias_rate`).
  Returns:
    params with every `expert_bias` moved; a ranks selected more often than average goes down.
  """
  flat = dict(flatten(params))
  for path, c_R in flatten(counts).items():
    key = path[:-1] + ('expert_bias',)
    if key not in flat:
      raise ValueError(f'update_expert_biases: counts for {"/".join(path)} but no {"/".join(key)}')
    c_R = c_R.astype(jnp.float32)
    flat[key] = flat[key] + rate * jnp.sign(jnp.mean(c_R) - c_R)
  return unflatten(flat)


# ---------------------------------------------------------------------------------------------- merge

def merge(params: PyTree, config: 'ModelConfig') -> tuple[PyTree, 'ModelConfig']:
  """Folds the adapters into the base kernels: W' = W + (α/r)·A·B; returns (params, plain config).

  Exact for plain LoRA and for FlyLoRA with k = r (every rank is always selected). Raises ValueError
  for FlyLoRA with k < r, where the update depends on each token's routing.
  """
  if not targets(config):
    raise ValueError('merge: the model has no adapters (model.lora_targets is empty)')
  if config.lora_mode == 'flylora' and config.lora_k < config.lora_rank:
    raise ValueError(
        f'merge refused: FlyLoRA with model.lora_k={config.lora_k} < model.lora_rank={config.lora_rank} '
        'routes each token to its own top-k ranks, so the adapter is x·A⊙m(x)·B with a mask that '
        'depends on x — not a fixed matrix that can be added to W. Only k = r (or lora_mode=lora) merges.')
  flat = dict(flatten(params))
  for module in adapted_modules(params):
    a_IR, b_RO = flat[module + ('lora_a',)], flat[module + ('lora_b',)]
    delta_IO = jnp.matmul(a_IR, b_RO, precision=jax.lax.Precision.HIGHEST)
    flat[module + ('kernel',)] = flat[module + ('kernel',)] + scale(config) * delta_IO
  merged = unflatten({k: v for k, v in flat.items() if not is_adapter_leaf(k)})
  return merged, config.replace(lora_targets='')


# ---------------------------------------------------------------------------------------------- report

def param_report(params: PyTree, config: 'ModelConfig', trainable: PyTree) -> dict[str, float]:
  """Trainable vs total, and against LoRA of the same rank and full fine-tuning of the base.

  Returns:
    total (every tensor, A and d included), trainable, full_finetune (the base's parameters),
    lora_same_rank (r·(I + O) per adapted projection), and the reductions 1 − trainable/that.
  """
  flat, mask = flatten(params), flatten(trainable)
  total = sum(int(v.size) for v in flat.values())
  n_trainable = sum(int(flat[k].size) for k, m in mask.items() if m)
  full = sum(int(v.size) for k, v in flat.items() if not is_adapter_leaf(k))
  lora = sum(int(flat[m + ('kernel',)].shape[0] + flat[m + ('kernel',)].shape[1]) * config.lora_rank
             for m in adapted_modules(params))
  report = {'total': total, 'trainable': n_trainable, 'full_finetune': full, 'lora_same_rank': lora,
            'reduction_vs_full': 1.0 - n_trainable / full,
            'reduction_vs_lora': (1.0 - n_trainable / lora) if lora else 0.0}
  logging.info('parameters: %d trainable of %d total (%.4f%%); full fine-tuning %d (-%.2f%%); '
               'LoRA of rank %d %d (-%.2f%%)', n_trainable, total, 100.0 * n_trainable / total, full,
               100.0 * report['reduction_vs_full'], config.lora_rank, lora,
               100.0 * report['reduction_vs_lora'])
  return report
