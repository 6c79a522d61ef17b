"""Weight-only int8 and int4 quantization for inference (SPEC §10).

Two schemes, for every projection (q, k, v, o, gate, up, down) and, with `quantize_head`, the output head;
the embeddings, norms and biases stay in float:

  int8  symmetric, one float32 scale per output channel:   w[i, o] ≈ q[i, o] · s[o],   q ∈ [-127, 127]
  int4  asymmetric, grouped along the input dimension (G = model.quantize_group_size, 128 by default):
        w[i, o] ≈ q[i, o] · s[g, o] + m[g, o],   g = i // G,   q ∈ [0, 15],
        with s = (max − min) / 15 and m = min over the group's G weights of output o

Why int4 is asymmetric: 4 bits leave 16 levels, and a symmetric grid spends one of them (±7 around 0) and
half of the other 15 on the side of zero that a skewed group does not use; min/max uses all 16 on the
group's actual range (as GPTQ, AWQ and llama.cpp's Q4_1 do). It costs a float32 offset per group
(0.25 bit per weight at G = 128) and nothing at run time: dequantizing is one multiply-add either way.
int8 has 255 levels, so the symmetric grid's lost level does not matter and zero stays exact.

In the parameter tree a quantized projection holds plain arrays (so checkpoints, export, `jax.tree`
and the loaders' checks work unchanged), named after what the export calls them (export.py):

  qweight  int8 [I, O]        (int4: uint8 [I/2, O], two 4-bit values per byte along I: the even input
                               index in the low nibble, the odd one in the high nibble)
  scales   float32 [O]        (int4: [I/G, O])
  mins     float32 [I/G, O]   (int4 only)
  bias     float32 [O]        (when model.use_bias; never quantized)

The weights stay in memory as integers; there is no float copy made at load time. `QuantizedDense`
computes x · w two ways: on a CPU, for at most KERNEL_MAX_ROWS rows (decode steps, short prefills;
float32, one device), a C++ kernel (kernels/quantized_matmul_cpu.cc) reads the integers and dequantizes
in registers, so a step reads
a quarter (int8) or an eighth (int4) of float32's bytes; everywhere else XLA dequantizes inside the
jitted pass (fused into the matmul's operand on a GPU; on a CPU a float copy per call, amortised over
many rows). `quantize_model` turns a float parameter tree into the quantized one.

Shape suffixes follow the package's key (model.py): I in features, O out features, G groups of I,
J = I/2 packed bytes; B, T batch and tokens. This module never imports model (model builds its
projections from `QuantizedDense`): `'ModelConfig'` is named as a string.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vesper_jax.kernels import quantized_matmul_cpu_ffi
from vesper_jax.pytree import Path, PyTree, flatten, unflatten

SCHEMES = ('int8', 'int4')
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
HEAD = 'lm_head'
LEAVES = ('qweight', 'scales', 'mins')  # the parameter names a quantized projection adds
INT8_MAX = 127
INT4_MAX = 15


# ---------------------------------------------------------------------------------------------- config

def validate(config: 'ModelConfig') -> None:
  """Raises ValueError naming the `model.quantize*` setting that cannot apply to this model."""
  if config.quantize not in ('',) + SCHEMES:
    raise ValueError(f"model.quantize={config.quantize!r}: expected '' (float) or one of {SCHEMES}")
  if not config.quantize:
    if config.quantize_head:
      raise ValueError("model.quantize_head=True needs model.quantize='int8' or 'int4'")
    return
  if config.quantize_head and config.tie_embeddings:
    raise ValueError('model.quantize_head=True with model.tie_embeddings=True: the head is the embedding '
                     'matrix, which stays in float')
  if config.lora_targets:
    raise ValueError(f'model.quantize={config.quantize!r} with adapters (model.lora_targets='
                     f'{config.lora_targets!r}): merge them into the base weights first (flylora.merge)')
  if config.quantize == 'int4':
    G = config.quantize_group_size
    if G < 2 or G % 2:
      raise ValueError(f'model.quantize_group_size={G} must be an even number >= 2 (int4 packs two '
                       'values per byte)')
    for field, size, inputs in (('d_model', config.d_model, 'q/k/v/o/gate/up_proj and lm_head'),
                                ('d_ff', config.d_ff, 'ffn.down_proj')):
      if size % G:
        raise ValueError(f'model.quantize=int4 groups the input dimension by model.quantize_group_size='
                         f'{G}: model.{field}={size} (the input of {inputs}) is not a multiple of it')


def is_quantized(config: 'ModelConfig', name: str) -> bool:
  """Whether the projection called `name` ('q_proj', ..., 'lm_head') is quantized under `config`."""
  if not config.quantize:
    return False
  return name in PROJECTIONS or (name == HEAD and config.quantize_head)


# ------------------------------------------------------------------------------------------ the numbers

def quantize_int8(w_IO: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel int8: (q_IO int8, scales_O float32), w ≈ q · scales."""
  w_IO = jnp.asarray(w_IO, jnp.float32)
  absmax_O = jnp.max(jnp.abs(w_IO), axis=0)
  scales_O = jnp.where(absmax_O > 0, absmax_O / INT8_MAX, 1.0)  # an all-zero channel: any scale is exact
  q_IO = jnp.clip(jnp.round(w_IO / scales_O), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return q_IO, scales_O


def dequantize_int8(q_IO: jax.Array, scales_O: jax.Array) -> jax.Array:
  """float32 [I, O] weights of `quantize_int8`'s output."""
  return q_IO.astype(jnp.float32) * scales_O.astype(jnp.float32)


def pack_int4(q_IO: jax.Array) -> jax.Array:
  """[I, O] values in [0, 15] → uint8 [I/2, O]: row 2j in the low nibble, row 2j+1 in the high one."""
  I = q_IO.shape[0]
  if I % 2:
    raise ValueError(f'pack_int4: the input dimension {I} is odd; two 4-bit values go in each byte')
  q_IO = q_IO.astype(jnp.uint8)
  return q_IO[0::2] | (q_IO[1::2] << 4)


def unpack_int4(packed_JO: jax.Array) -> jax.Array:
  """uint8 [I/2, O] → uint8 [I, O] values in [0, 15] (the inverse of `pack_int4`)."""
  J, O = packed_JO.shape
  low_JO, high_JO = packed_JO & 0x0F, packed_JO >> 4
  return jnp.stack([low_JO, high_JO], axis=1).reshape(2 * J, O)


def quantize_int4(w_IO: jax.Array, group_size: int,
                  name: str = 'weight') -> tuple[jax.Array, jax.Array, jax.Array]:
  """Asymmetric int4 in groups of `group_size` input rows: (packed_JO uint8, scales_GO, mins_GO float32).

  w[i, o] ≈ q[i, o] · scales[i // G, o] + mins[i // G, o] with q ∈ [0, 15]. Raises ValueError, naming
  `name`, when the input dimension is not a multiple of the group size.
  """
  w_IO = jnp.asarray(w_IO, jnp.float32)
  I, O = w_IO.shape
  if group_size < 2 or group_size % 2 or I % group_size:
    raise ValueError(f'int4: {name} has input dimension {I}, not a multiple of the group size '
                     f'{group_size} (an even number)')
  w_GkO = w_IO.reshape(I // group_size, group_size, O)  # k: the rows of one group
  min_GO, max_GO = jnp.min(w_GkO, axis=1), jnp.max(w_GkO, axis=1)
  scales_GO = jnp.where(max_GO > min_GO, (max_GO - min_GO) / INT4_MAX, 1.0)  # a constant group: q = 0
  q_GkO = jnp.clip(jnp.round((w_GkO - min_GO[:, None]) / scales_GO[:, None]), 0, INT4_MAX)
  return pack_int4(q_GkO.reshape(I, O)), scales_GO, min_GO


def dequantize_int4(packed_JO: jax.Array, scales_GO: jax.Array, mins_GO: jax.Array) -> jax.Array:
  """float32 [I, O] weights of `quantize_int4`'s output."""
  q_IO = unpack_int4(packed_JO)
  I, O = q_IO.shape
  G = scales_GO.shape[0]
  w_GkO = (q_IO.reshape(G, I // G, O).astype(jnp.float32) * scales_GO[:, None].astype(jnp.float32)
           + mins_GO[:, None].astype(jnp.float32))
  return w_GkO.reshape(I, O)


# ------------------------------------------------------------------------------------------ the layer

# On a CPU, projections of at most this many rows (tokens) run in the C++ kernel, which reads the integers
# and dequantizes in registers (kernels/quantized_matmul_cpu.cc): decode steps of up to 128 sequences, and
# prefills of up to 128 tokens (decode.left_pad pads prompts to multiples of 64: a 32-token prompt is 64
# rows). Past 4 rows the kernel dequantizes 16-column panels once and runs every row of x down each, so x
# is re-read once per panel: its cost grows with the rows while XLA's dequantized copy is amortised over
# them, and longer prefills and scoring keep XLA's formulation. Measured (one medium-sized product each,
# the 2-core AVX2 CPU): at 64 and 128 rows the kernel ran 0.88-2.1x the time of XLA's dequantize-then-dot
# (faster but for I = 2048, equal there), at 256 rows 0.84-1.0x; at 32 the limit sent 64-row prompts to
# XLA, whose float copies took 66 of medium's 138 ms prefill.
KERNEL_MAX_ROWS = 128


class QuantizedDense(nn.Module):
  """A Dense layer whose kernel is stored quantized (int8 or packed int4) and dequantized per call."""
  features: int
  scheme: str                 # 'int8' | 'int4'
  group_size: int             # int4 only
  use_bias: bool
  dtype: jnp.dtype            # compute dtype
  kernel: bool = False        # the CPU kernel for few rows (the CPU platform's choice, platforms.py)

  @nn.compact
  def __call__(self, x_BTI: jax.Array) -> jax.Array:
    I, O = x_BTI.shape[-1], self.features
    # Initial values only give shapes and dtypes (loaders check files against them); real values come
    # from `quantize_model` or a quantized export.
    if self.scheme == 'int8':
      weights = (self.param('qweight', nn.initializers.zeros, (I, O), jnp.int8),
                 self.param('scales', nn.initializers.ones, (O,), jnp.float32))
    else:
      G = I // self.group_size
      weights = (self.param('qweight', nn.initializers.zeros, (I // 2, O), jnp.uint8),
                 self.param('scales', nn.initializers.ones, (G, O), jnp.float32),
                 self.param('mins', nn.initializers.zeros, (G, O), jnp.float32))
    x_MI = x_BTI.reshape(-1, I).astype(self.dtype)
    if self.kernel and x_MI.shape[0] <= KERNEL_MAX_ROWS and quantized_matmul_cpu_ffi.supports(x_MI):
      matmul = (quantized_matmul_cpu_ffi.int8_matmul if self.scheme == 'int8'
                else quantized_matmul_cpu_ffi.int4_matmul)
      y_MO = matmul(x_MI, *weights)
    else:
      w_IO = dequantize_int8(*weights) if self.scheme == 'int8' else dequantize_int4(*weights)
      y_MO = jnp.dot(x_MI, w_IO.astype(self.dtype))
    if self.use_bias:
      y_MO = y_MO + self.param('bias', nn.initializers.zeros, (O,), jnp.float32).astype(self.dtype)
    return y_MO.reshape(*x_BTI.shape[:-1], O)


def dense(config: 'ModelConfig', features: int, name: str) -> QuantizedDense:
  """The quantized projection `name` of a model built from `config` (model._dense calls this)."""
  return QuantizedDense(features, config.quantize, config.quantize_group_size, config.use_bias,
                        config.compute_dtype, kernel=config.runs_on == 'cpu', name=name)


# ------------------------------------------------------------------------------------------ models

def quantize_params(config: 'ModelConfig', params: PyTree) -> PyTree:
  """The float tree `params` with every projection `config` quantizes replaced by its quantized leaves.

  `config` is the quantized config (model.quantize set); `params` the float model's tree.
  """
  flat, out = flatten(params), {}
  for path, value in flat.items():
    *module, leaf = path
    if leaf != 'kernel' or not is_quantized(config, module[-1]):
      out[path] = value
      continue
    name = '/'.join(module)
    if config.quantize == 'int8':
      out[(*module, 'qweight')], out[(*module, 'scales')] = quantize_int8(value)
    else:
      packed, scales, mins = quantize_int4(value, config.quantize_group_size, name)
      out[(*module, 'qweight')], out[(*module, 'scales')], out[(*module, 'mins')] = packed, scales, mins
  return unflatten(out)


def quantize_model(config: 'ModelConfig', params: PyTree, scheme: str, quantize_head: bool = False,
                   group_size: int = 128) -> tuple['ModelConfig', PyTree]:
  """(config, params) of the float model → (quantized config, quantized params), for inference.

  Args:
    config: the float model's config (model.quantize == '').
    params: its parameter tree (float32 or any float dtype).
    scheme: 'int8' (symmetric, per output channel) or 'int4' (asymmetric, grouped along the input).
    quantize_head: also quantize the output head (refused with tied embeddings).
    group_size: int4's group, in input rows.
  Returns:
    the config with model.quantize* set (it builds `QuantizedDense` projections) and the matching tree.
  Raises:
    ValueError naming the setting or projection that cannot be quantized.
  """
  if config.quantize:
    raise ValueError(f'quantize_model: the model is already quantized (model.quantize={config.quantize!r})')
  qconfig = config.replace(quantize=scheme, quantize_head=quantize_head, quantize_group_size=group_size)
  return qconfig, quantize_params(qconfig, params)


def weight_bytes(params: PyTree) -> dict[str, int]:
  """Exact bytes of the tree: the whole model, the seven projections of every layer, and the output head
  (weights with their scales and offsets; biases counted in the total only)."""
  flat = flatten(params)

  def nbytes(select) -> int:
    return sum(int(v.size) * jnp.dtype(v.dtype).itemsize for k, v in flat.items() if select(k))

  return {'total': nbytes(lambda k: True),
          'projections': nbytes(lambda k: len(k) > 1 and k[-2] in PROJECTIONS and k[-1] != 'bias'),
          'head': nbytes(lambda k: k[0] == HEAD and k[-1] != 'bias')}


def is_quantized_leaf(path: Path) -> bool:
  """Whether a parameter path is one of a quantized projection's leaves (qweight, scales, mins)."""
  return path[-1] in LEAVES
