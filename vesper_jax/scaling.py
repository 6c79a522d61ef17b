"""Chinchilla scaling helpers (Hoffmann et al. 2022; SPEC §12).

Compute-optimal training uses about 20 tokens per parameter (D ≈ 20·N) and costs C ≈ 6·N·D FLOPs. The
parametric loss fit L(N, D) = E + A/N^α + B/D^β was made on their data and tokenizer: indicative only.
Also the FLOPs arithmetic of a training step (FLOPs per token, peak FLOP/s, model FLOPs utilisation).
"""

import math
import re
from typing import Protocol

TOKENS_PER_PARAM = 20.0
FLOPS_PER_PARAM_TOKEN = 6.0
# Hoffmann et al. 2022, eq. 10 (approach 3), in nats.
FIT_E, FIT_A, FIT_B, FIT_ALPHA, FIT_BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def optimal_from_flops(flops: float) -> tuple[float, float]:
  """(N, D) with C = 6·N·D and D = 20·N."""
  n = math.sqrt(flops / (FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM))
  return n, TOKENS_PER_PARAM * n


def optimal_params(tokens: float) -> float:
  """The compute-optimal parameter count for a token budget."""
  return tokens / TOKENS_PER_PARAM


def optimal_tokens(params: float) -> float:
  """The compute-optimal token count for a parameter count."""
  return TOKENS_PER_PARAM * params


def training_flops(params: float, tokens: float) -> float:
  return FLOPS_PER_PARAM_TOKEN * params * tokens


def predicted_loss(params: float, tokens: float) -> float:
  """Chinchilla's parametric fit, in nats per token (their tokenizer and data)."""
  return FIT_E + FIT_A / params ** FIT_ALPHA + FIT_B / tokens ** FIT_BETA


def steps_for_tokens(tokens: float, batch_size: int, seq_len: int) -> int:
  """Optimizer steps that consume `tokens` at `batch_size` windows of `seq_len` tokens."""
  return max(1, math.ceil(tokens / (batch_size * seq_len)))


def nearest_config(params: float, sizes: dict[str, int]) -> str:
  """The config name whose parameter count is closest on a log scale."""
  return min(sizes, key=lambda name: abs(math.log(sizes[name] / params)))


# ------------------------------------------------------------------------------------------ FLOPs, MFU

class _Shape(Protocol):  # what the FLOPs count reads of a model.ModelConfig
  num_layers: int
  d_model: int
  padded_vocab_size: int


def flops_per_token(config: _Shape, non_embedding_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6·(matmul parameters) + 12·L·T·D for attention (PaLM, appendix B).

  The matmul parameters are the non-embedding ones plus the output head's V_pad·D (the head is a matmul
  whether or not it is tied to the embedding, which is a lookup); 6 = 2 (multiply-add) × 3 (forward,
  and the backward's two matmuls). The attention term counts QKᵀ and the weighted sum of V.
  """
  matmul_params = non_embedding_params + config.padded_vocab_size * config.d_model
  return 6.0 * matmul_params + 12.0 * config.num_layers * config.d_model * seq_len


# Dense bf16 peak FLOP/s per device, by jax's device_kind; MFU is reported only where the kind is known.
# Matched as whole words ('NVIDIA H100 80GB HBM3' has H100; 'NVIDIA L40S' is not an 'L4').
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12,
              'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v4': 275e12}


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak of one device of this kind, or None when unknown (a CPU, say)."""
  words = re.split(r'[\s_-]+', device_kind)  # 'NVIDIA A100-SXM4-80GB' -> [..., 'A100', 'SXM4', ...]
  for kind, flops in PEAK_FLOPS.items():
    kind_words = kind.split()
    if any(words[i:i + len(kind_words)] == kind_words for i in range(len(words))):
      return flops
  return None


def mfu(flops_per_s: float, peak_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices."""
  return flops_per_s / (peak_per_device * num_devices)
