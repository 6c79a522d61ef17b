"""Chinchilla scaling helpers (Hoffmann et al. 2022; SPEC §12).

Compute-optimal training uses about 20 tokens per parameter (D ≈ 20·N) and costs C ≈ 6·N·D FLOPs. The
parametric loss fit L(N, D) = E + A/N^α + B/D^β was made on their data and tokenizer: indicative only.
"""

import math

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
