"""VesperLM: a pre-norm decoder-only transformer (SPEC §3).

    h = x + Attention(Norm(x));  y = h + FeedForward(Norm(h));  final Norm;  lm_head

Shape key, for the whole package: a tensor's name ends in its axes (`q_BTNH`), one letter per axis,
each letter with one meaning everywhere (model, flylora, decode, train, losses):

    A  micro-batches of one step (gradient accumulation)    B  batch (sequences)
    T  sequence / query length                              S  key length (the KV cache in decode mode)
    N  query heads        K  key/value heads                H  head dim
    G  query heads per key/value head (N / K)          J  batch × key/value heads (B·K, the KV cache)
    D  d_model            F  d_ff (FFN hidden units)        V  vocabulary (padded where stated)
    I  in features        O  out features of a projection   R  adapter rank (FlyLoRA / LoRA)
    E  ranks selected per token (FlyLoRA's top-k)           P  (padded) prompt length
    C  tokens per decode chunk                              M  tokens, flattened (B·T)
    U  hidden units of the metacognition head (metacog.py)   1, 2  an axis of size one, two

The projections run on flattened [M, D] tokens rather than [B, T, D]. The result is the same, but each
weight gradient is then a dot with one contracting axis, which XLA:CPU runs on the operands as they lie.
With two contracting axes (B and T) it first copied the output gradient into a transposed layout, and
that copy absorbed (and recomputed) the elementwise backward ops that produced it (SiLU, softmax): the
largest entries of a CPU train-step profile, about a quarter of the step (experiments/bench_train.py).

Parameters are float32; `ModelConfig.dtype` is the compute dtype (bfloat16 on GPU). Module names follow
the export naming of SPEC §11 (`layers_{i}/attention/q_proj`, `layers_{i}/ffn/gate_proj`, ...), so export
is a rename rather than a remapping.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vesper_jax import attention_cpu
from vesper_jax import dense
from vesper_jax import flylora
from vesper_jax import losses
from vesper_jax import metacog
from vesper_jax import platforms
from vesper_jax import quantize
from vesper_jax.era import era
from vesper_jax.pytree import PyTree, flatten

ACTIVATIONS = ('era', 'silu', 'gelu')
NORMS = ('layernorm', 'rmsnorm')
VOCAB_MULTIPLE = 128  # the embedding and head are padded so matmuls tile evenly on accelerators


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a VesperLM. Decode variants are made with `.replace(decode=True)`."""
  vocab_size: int = 32000           # the tokenizer's vocabulary may be smaller, never larger
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None   # grouped-query attention when < num_heads; None = num_heads
  d_model: int = 128
  d_ff: int = 384
  max_seq_len: int = 256            # longest context the model is trained or decoded with
  norm: str = 'layernorm'           # 'layernorm' | 'rmsnorm'
  norm_eps: float = 1e-6
  activation: str = 'era'           # 'era' | 'silu' | 'gelu'
  era_temperature: float = 1.0
  era_entropy_weight: float = 0.1
  era_detach_entropy: bool = False
  use_bias: bool = False
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  dtype: str = 'float32'            # compute dtype; parameters stay float32
  remat: bool = False               # recompute each block's activations in the backward pass
  attention_impl: str | None = None  # jax.nn.dot_product_attention: None (auto), 'xla' or 'cudnn'
  decode: bool = False              # KV-cache mode (prefill, then one token per call)
  # Whose choices the model, the loss and decoding make (platforms.py): 'cpu', 'gpu', 'tpu', or None =
  # the default devices'. Set by train.build and the inference loaders from the devices they run on.
  platform: str | None = None
  # --- FlyLoRA adapters (SPEC §5, flylora.py); lora_targets='' builds a plain model.
  lora_targets: str = ''            # comma-separated among q,k,v,o,gate,up,down
  lora_mode: str = 'flylora'        # 'flylora' (frozen sparse routed A) | 'lora' (dense trainable A)
  lora_rank: int = 32               # r
  lora_k: int = 8                   # ranks active per token (FlyLoRA's top-k)
  lora_rho: float | None = None     # density of A's columns; None = lora_k / lora_rank
  lora_alpha: float | None = None   # the adapter's scale is alpha / r; None = 2·r
  lora_bias_rate: float = 1e-3      # u in the expert-bias rule d_i += u·sign(mean(c) − c_i)
  lora_seed: int = 0                # A is generated from this seed and each layer's path
  # --- weight-only quantization for inference (quantize.py); set by quantize.quantize_model, never trained.
  quantize: str = ''                # '' (float) | 'int8' (per output channel) | 'int4' (grouped along I)
  quantize_head: bool = False       # also quantize lm_head (the embeddings always stay in float)
  quantize_group_size: int = 128    # int4: input rows per scale/offset group
  # --- metacognition head (SPEC §9, metacog.py); no parameters exist when off.
  metacog: bool = False             # a confidence / predicted-loss head on the final hidden states
  metacog_hidden: int = 256         # the head's hidden width (D → metacog_hidden → 2)
  metacog_trunk_gradient: bool = False  # let the head's loss reach the trunk (default: stop_gradient)
  # What the head reads: 'hidden' (the final hidden states), 'stats' (the predicted distribution's max
  # probability, entropy and top-1/top-2 margin) or 'both'. 'hidden' here is what a model config without
  # the key meant (older runs and exports); the base config (config.py) sets the default for new runs.
  metacog_inputs: str = 'hidden'

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation={self.activation!r}: expected one of {ACTIVATIONS}')
    if self.norm not in NORMS:
      raise ValueError(f'model.norm={self.norm!r}: expected one of {NORMS}')
    if self.d_model % self.num_heads:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head dim {self.head_dim} must be even for RoPE (d_model / num_heads)')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} is not a multiple of '
                       f'model.num_kv_heads={self.kv_heads}')
    if self.vocab_size <= 0:
      raise ValueError(f'model.vocab_size={self.vocab_size} must be positive')
    if self.platform is not None:
      platforms.check(self.platform)
    flylora.validate(self)
    quantize.validate(self)
    metacog.validate(self)

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def runs_on(self) -> str:
    """The platform whose choices this model makes: `platform`, or the default devices' when None."""
    return platforms.resolve(self.platform)


# Fields that change no parameter's shape or meaning: a run may resume, or a base model be loaded, with
# any of them changed. Every other field changes the weights (their shapes, or what they compute: the
# norm, the activation, RoPE's base, the adapters' routing...). RoPE has no learned positions, so the
# context length is free. The quantize* fields are weight fields: they replace a projection's float kernel
# by other tensors (int8/uint8 weights, scales, offsets), so a tree made for one setting fits no other.
# metacog_trunk_gradient only decides where the head's gradient stops.
RUNTIME_FIELDS = ('max_seq_len', 'dtype', 'remat', 'attention_impl', 'decode', 'platform',
                  'lora_bias_rate', 'metacog_trunk_gradient')
WEIGHT_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS)
ADAPTER_FIELDS = tuple(f for f in WEIGHT_FIELDS if f.startswith('lora_'))
METACOG_FIELDS = tuple(f for f in WEIGHT_FIELDS if f.startswith('metacog'))


def weight_changes(old: ModelConfig, new: ModelConfig,
                   fields: tuple[str, ...] = WEIGHT_FIELDS) -> list[tuple[str, object, object]]:
  """(field, old value, new value) for each of `fields` on which the two configs' weights differ."""
  return [(f, getattr(old, f), getattr(new, f)) for f in fields if getattr(old, f) != getattr(new, f)]


def cast_for_inference(config: ModelConfig, params: PyTree, dtype: str) -> tuple[ModelConfig, PyTree]:
  """Computes in `dtype` with the float parameters stored in `dtype` too (halves the bytes read per token).

  Quantized weights and their scales and offsets (quantize.py) keep their dtypes: they are dequantized in
  float32 and then cast to `dtype`.
  """
  jdtype = jnp.dtype(dtype)
  return config.replace(dtype=dtype), jax.tree_util.tree_map_with_path(
      lambda path, x: x if quantize.is_quantized_leaf((path[-1].key,)) else x.astype(jdtype),
      params)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding, split-half ("rotate_half", Llama/NeoX) convention."""
  B, T, N, H = x_BTNH.shape
  half = H // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  # Angles in float32: positions × frequencies loses precision in bfloat16 long before max_seq_len.
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin_BTh, cos_BTh = jnp.sin(angles_BTh), jnp.cos(angles_BTh)
  cos_BT1H = jnp.concatenate([cos_BTh, cos_BTh], axis=-1)[:, :, None, :]
  sin_BT1H = jnp.concatenate([-sin_BTh, sin_BTh], axis=-1)[:, :, None, :]
  # [x1, x2] -> [x2, x1] as a reversal of the two halves, which XLA fuses into the elementwise pass;
  # slicing and concatenating the halves (the same values) made a separate pass in the backward.
  x = x_BTNH.astype(jnp.float32)
  swapped = x.reshape(B, T, N, 2, half)[:, :, :, ::-1].reshape(B, T, N, H)
  return (x * cos_BT1H + swapped * sin_BT1H).astype(x_BTNH.dtype)


def _norm(config: ModelConfig, name: str) -> nn.Module:
  if config.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.compute_dtype, param_dtype=jnp.float32,
                      name=name)
  return nn.LayerNorm(epsilon=config.norm_eps, use_bias=config.use_bias, dtype=config.compute_dtype,
                      param_dtype=jnp.float32, name=name)


def _dense(config: ModelConfig, features: int, name: str, out_proj: bool = False) -> nn.Module:
  # GPT-2 style: projections that write into the residual stream start smaller, by 1/sqrt(2·layers),
  # so the residual's variance does not grow with depth at initialisation.
  std = 0.02 / math.sqrt(2 * config.num_layers) if out_proj else 0.02
  if quantize.is_quantized(config, name):  # same name; int weights and scales instead of the kernel
    return quantize.dense(config, features, name)
  if flylora.is_target(config, name):  # same name and kernel path, plus the adapter's tensors
    return flylora.LoRADense(config, features, nn.initializers.normal(std), name=name)
  return dense.Dense(features, use_bias=config.use_bias, dtype=config.compute_dtype,
                     kernel_init=nn.initializers.normal(std), copy_transpose=config.runs_on == 'cpu',
                     name=name)


# ------------------------------------------------------------------------------ attention


def attention_implementation(c: ModelConfig, unmasked: bool) -> str | None:
  """jax.nn.dot_product_attention's `implementation` for `c.attention_impl` (None = auto).

  Auto on a GPU in bfloat16/float16, for the unmasked causal attention of training, is cuDNN's fused
  flash attention: it never materialises the [B, N, T, S] scores that XLA's version writes and reads
  back in both passes. Its head-dim limit (a multiple of 8, at most 128) is checked here; elsewhere (and
  with a padding mask) auto is XLA's. GPU speed against XLA: README, GPU (pending a GPU measurement).
  """
  if c.attention_impl is not None:
    return c.attention_impl
  cudnn_fits = c.dtype in ('bfloat16', 'float16') and c.head_dim % 8 == 0 and c.head_dim <= 128
  return 'cudnn' if c.runs_on == 'gpu' and cudnn_fits and unmasked else None


class Attention(nn.Module):
  """Causal multi-head (optionally grouped-query) self-attention with RoPE and an optional KV cache."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               attention_mask_BT: jax.Array | None) -> jax.Array:
    c = self.config
    B, T, D = x_BTD.shape
    N, K, H = c.num_heads, c.kv_heads, c.head_dim
    x_MD = x_BTD.reshape(B * T, D)  # flattened tokens: see the module docstring
    q_BTNH = _dense(c, N * H, 'q_proj')(x_MD).reshape(B, T, N, H)
    k_BTKH = _dense(c, K * H, 'k_proj')(x_MD).reshape(B, T, K, H)
    v_BTKH = _dense(c, K * H, 'v_proj')(x_MD).reshape(B, T, K, H)
    q_BTNH = apply_rope(q_BTNH, positions_BT, c.rope_theta)
    k_BTKH = apply_rope(k_BTKH, positions_BT, c.rope_theta)

    if c.decode:
      k_JHS, v_JSH, mask_B1TS = self._update_cache(k_BTKH, v_BTKH, attention_mask_BT)
      out_BTNH = _cached_attention(q_BTNH, k_JHS, v_JSH, mask_B1TS)
    elif c.attention_impl is None and c.runs_on == 'cpu':
      out_BTNH = attention_cpu.causal_attention(q_BTNH, k_BTKH, v_BTKH, attention_mask_BT)
    else:
      mask = None if attention_mask_BT is None else attention_mask_BT.astype(bool)[:, None, None, :]
      out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=True,
                                              implementation=attention_implementation(c, mask is None))
    out_MD = _dense(c, c.d_model, 'o_proj', out_proj=True)(out_BTNH.reshape(B * T, N * H))
    return out_MD.reshape(B, T, c.d_model)

  def _update_cache(self, k_BTKH, v_BTKH, attention_mask_BT):
    """Writes this call's keys/values at the cache index; returns the whole cache and its mask.

    The cache holds keys as [J, H, S] and values as [J, S, H] (J = B·K): the layouts the attention dots
    of `_cached_attention` read in place, updated in place. Stored [B, S, K, H], XLA:CPU copied every
    layer's whole key and value caches into [B, K, H, S] at each decode step (~1 ms per token for small at
    S = 192); with separate B and K axes and B = 1, it fused the update into the dot's operand and into
    the carried cache separately, each on a copy of the cache.
    """
    B, T, K, H = k_BTKH.shape
    k_JHT = k_BTKH.transpose(0, 2, 3, 1).reshape(B * K, H, T)
    v_JTH = v_BTKH.transpose(0, 2, 1, 3).reshape(B * K, T, H)
    initialized = self.has_variable('cache', 'cached_key')
    # On `init`, the input's length sets the cache length (call init with a [B, max_len] input).
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_JHT.shape, k_JHT.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v_JTH.shape, v_JTH.dtype)
    key_valid = self.variable('cache', 'key_valid', jnp.zeros, (B, T), jnp.bool_)
    index = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
    valid_BT = (jnp.ones((B, T), jnp.bool_) if attention_mask_BT is None
                else attention_mask_BT.astype(jnp.bool_))
    if not initialized:
      causal_TT = jnp.tril(jnp.ones((T, T), jnp.bool_))
      return k_JHT, v_JTH, causal_TT[None, None] & valid_BT[:, None, None, :]

    idx = index.value
    S = key_valid.value.shape[1]
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_JHT, (0, 0, idx))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_JTH, (0, idx, 0))
    key_valid.value = jax.lax.dynamic_update_slice(key_valid.value, valid_BT, (0, idx))
    index.value = idx + T
    # Causality in cache slots: query slot idx+t sees key slots ≤ idx+t that hold real (unpadded) tokens.
    q_slot_T = idx + jnp.arange(T)
    causal_TS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
    mask_B1TS = causal_TS[None, None] & key_valid.value[:, None, None, :]
    return cached_key.value, cached_value.value, mask_B1TS


def _cached_attention(q_BTNH: jax.Array, k_JHS: jax.Array, v_JSH: jax.Array,
                      mask_B1TS: jax.Array) -> jax.Array:
  """Attention of this call's queries over the KV cache, in the cache's layouts (`_update_cache`).

  XLA's dot_product_attention written for them: logits accumulated and softmaxed in float32, masked keys
  set to a large negative number. Query head n reads key/value head n // G (grouped-query attention).
  """
  B, T, N, H = q_BTNH.shape
  K = k_JHS.shape[0] // B
  G = N // K
  q_JGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B * K, G, T, H)
  logits_JGTS = jnp.einsum('JGTH,JHS->JGTS', q_JGTH, k_JHS, preferred_element_type=jnp.float32)
  logits_JGTS = logits_JGTS * jnp.float32(1 / math.sqrt(H))
  S = logits_JGTS.shape[-1]
  mask_J1TS = jnp.broadcast_to(mask_B1TS, (B, K, T, S)).reshape(B * K, 1, T, S)
  logits_JGTS = jnp.where(mask_J1TS, logits_JGTS, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
  probs_JGTS = jax.nn.softmax(logits_JGTS, axis=-1).astype(v_JSH.dtype)
  out_JGTH = jnp.einsum('JGTS,JSH->JGTH', probs_JGTS, v_JSH)
  return out_JGTH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


class FeedForward(nn.Module):
  """Gated FFN: down(act(gate(x)) * up(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    c = self.config
    x_MD = x_BTD.reshape(-1, x_BTD.shape[-1])  # flattened tokens: see the module docstring
    gate_MF = _dense(c, c.d_ff, 'gate_proj')(x_MD)
    up_MF = _dense(c, c.d_ff, 'up_proj')(x_MD)
    if c.activation == 'era':
      act_MF = era(gate_MF, c.era_temperature, c.era_entropy_weight, c.era_detach_entropy,
                   kernel=c.runs_on == 'cpu')
    elif c.activation == 'silu':
      act_MF = jax.nn.silu(gate_MF)
    else:
      act_MF = jax.nn.gelu(gate_MF)
    return _dense(c, c.d_model, 'down_proj', out_proj=True)(act_MF * up_MF).reshape(x_BTD.shape)


class Block(nn.Module):
  """One pre-norm transformer block."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               attention_mask_BT: jax.Array | None) -> jax.Array:
    c = self.config
    x_BTD = x_BTD + Attention(c, name='attention')(_norm(c, 'attention_norm')(x_BTD), positions_BT,
                                                   attention_mask_BT)
    return x_BTD + FeedForward(c, name='ffn')(_norm(c, 'ffn_norm')(x_BTD))


class VesperLM(nn.Module):
  """The decoder. Returns float32 logits over the real (unpadded) vocabulary."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               attention_mask_BT: jax.Array | None = None, last_only: bool = False,
               return_hidden: bool = False, with_metacog: bool = False, with_hidden: bool = False
               ) -> jax.Array | tuple[jax.Array, ...]:
    """Args:
      tokens_BT: int token ids.
      positions_BT: RoPE positions; default 0..T-1. Required in decode mode (the cache does not know
        where each sequence is; with left-padded prompts the positions differ per row).
      attention_mask_BT: 1 for real tokens, 0 for padding (never attended to); default all real.
      last_only: compute logits for the last position only (prefill needs no others: skipping them
        saves the head's T×D×V matmul).
      return_hidden: return the final-normed hidden states instead of the logits, for a loss that
        applies the head itself (losses.head_cross_entropy_and_entropy, with `head_weights`).
      with_metacog: also return the metacognition head's predictions on the same hidden states and
        logits (needs config.metacog; with model.metacog_inputs 'stats' or 'both' the head reads
        losses.distribution_stats of these logits).
      with_hidden: also return the final-normed hidden states beside the logits, for a caller that
        applies the head itself to statistics it computes from the logits (metacog.apply).
    Returns:
      logits_BTV, float32, V = config.vocab_size; T = 1 when last_only. With return_hidden: x_BTD in
      the compute dtype. With with_metacog: (that, metacog.Outputs); with with_hidden: (logits_BTV, x_BTD).
    """
    c = self.config
    B, T = tokens_BT.shape
    if positions_BT is None:
      if c.decode:
        raise ValueError('VesperLM in decode mode needs explicit positions_BT')
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    embed = nn.Embed(c.padded_vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02),
                     dtype=c.compute_dtype, param_dtype=jnp.float32, name='embeddings')
    x_BTD = embed(tokens_BT)
    block_cls = nn.remat(Block) if c.remat else Block
    for i in range(c.num_layers):
      x_BTD = block_cls(c, name=f'layers_{i}')(x_BTD, positions_BT, attention_mask_BT)
    if last_only:
      x_BTD = x_BTD[:, -1:]
    x_BTD = _norm(c, 'final_norm')(x_BTD)
    if with_metacog and not c.metacog:
      raise ValueError('with_metacog=True needs a model with the metacognition head (model.metacog=True)')
    if with_metacog and return_hidden:
      raise ValueError('with_metacog=True computes the logits the head may read: it cannot be combined '
                       'with return_hidden=True (apply the head with metacog.apply)')
    if return_hidden and not self.is_initializing():  # init still creates the head's parameters
      return x_BTD
    x_MD = x_BTD.reshape(-1, c.d_model)  # flattened tokens: see the module docstring
    if c.tie_embeddings:
      logits_MV = embed.attend(x_MD)
    elif quantize.is_quantized(c, 'lm_head'):
      logits_MV = quantize.dense(c, c.padded_vocab_size, 'lm_head')(x_MD)
    else:
      logits_MV = nn.Dense(c.padded_vocab_size, use_bias=c.use_bias, dtype=c.compute_dtype,
                           param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                           name='lm_head')(x_MD)
    # The loss and the samplers work in float32; the padded classes are never real tokens.
    logits_BTV = logits_MV.reshape(*x_BTD.shape[:2], -1)[..., :c.vocab_size].astype(jnp.float32)
    # The head only when asked for (init creates its parameters): plain decoding never pays for it.
    if c.metacog and (with_metacog or self.is_initializing()):
      stats = losses.distribution_stats(logits_BTV) if metacog.uses_stats(c) else None
      meta = metacog.MetacogHead(c, name=metacog.NAME)(x_BTD, stats)
      if with_metacog:
        return logits_BTV, meta
    if with_hidden:
      return logits_BTV, x_BTD
    return logits_BTV

  def head_weights(self, params: PyTree) -> tuple[jax.Array, jax.Array | None]:
    """The head as (kernel_DV, bias_V or None), cut to the real vocabulary: the logits are
    x_BTD·kernel_DV + bias_V for x_BTD = `apply(..., return_hidden=True)`. Needs no `apply`."""
    c, V = self.config, self.config.vocab_size
    if quantize.is_quantized(c, 'lm_head'):
      raise ValueError('model.quantize_head: a quantized head is for inference; train the float model')
    if c.tie_embeddings:
      return params['embeddings']['embedding'][:V].T, None
    head = params['lm_head']
    return head['kernel'][:, :V], (head['bias'][:V] if c.use_bias else None)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> PyTree:
  """Initialises the parameter tree (no cache) of a VesperLM."""
  model = VesperLM(config.replace(decode=False))
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> PyTree:
  """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (no parameters built)."""
  model = VesperLM(config.replace(decode=True))
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, positions_BT=tokens), jax.random.key(0), tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


EMBEDDING_NAMES = ('embeddings', 'lm_head')  # top-level names of the embedding matrices


def abstract_param_counts(config: ModelConfig) -> dict[str, int]:
  """`param_counts` of the model `config` describes, from shapes alone (no memory, no compute)."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return param_counts(shapes)


def param_counts(params: PyTree, trainable: PyTree | None = None) -> dict[str, int]:
  """Counts from the real tree: total, embedding (embeddings + lm_head), non_embedding, trainable.

  Args:
    params: the parameter tree (the `params` collection).
    trainable: optional tree of bools with the same structure; default: everything is trainable.
  """
  flat = flatten(params)
  total = sum(int(v.size) for v in flat.values())
  embedding = sum(int(v.size) for k, v in flat.items() if k[0] in EMBEDDING_NAMES)
  if trainable is None:
    n_trainable = total
  else:
    mask = flatten(trainable)
    n_trainable = sum(int(flat[k].size) for k, m in mask.items() if m)
  return {'total': total, 'embedding': embedding, 'non_embedding': total - embedding,
          'trainable': n_trainable}
