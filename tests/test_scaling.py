"""Scaling arithmetic (scaling.py): the Chinchilla helpers against the paper's Table 3 (SPEC §12), and the
FLOPs per token and MFU against a count by hand."""

import subprocess
import sys

import jax
import pytest

from conftest import REPO, tiny_model_config
from vesper_jax import scaling
from vesper_jax.model import init_params, param_counts


def test_chinchilla_table3_row():
  # Hoffmann et al. 2022, Table 3: 1.92e19 FLOPs → 400M parameters, 8.0B tokens.
  n, d = scaling.optimal_from_flops(1.92e19)
  assert n == pytest.approx(400e6, rel=0.01)
  assert d == pytest.approx(8.0e9, rel=0.01)
  assert scaling.training_flops(n, d) == pytest.approx(1.92e19, rel=1e-9)


def test_fit_and_steps():
  # L(N, D) falls with both N and D and tends to E.
  assert scaling.predicted_loss(1e8, 2e9) > scaling.predicted_loss(1e9, 2e10) > scaling.FIT_E
  assert scaling.steps_for_tokens(1000, 4, 100) == 3
  assert scaling.nearest_config(120e6, {'small': 35e6, 'medium': 134e6, 'large': 374e6}) == 'medium'


def test_scale_cli_flops():
  out = subprocess.run([sys.executable, '-m', 'vesper_jax.scale', '--flops=1.92e19'], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  assert '(400.0M)' in out and '(8.00B)' in out
  assert 'nearest config               : large' in out


# ------------------------------------------------------------------------------ FLOPs and MFU

def test_flops_per_token_against_a_hand_count_of_the_layers():
  """Tiny with grouped-query attention, vocab 1000 (padded to 1024), 64-token windows, counted by hand."""
  config = tiny_model_config(num_kv_heads=2, vocab_size=1000)
  L, D, F, T, V_pad = 2, 128, 384, 64, 1024
  N, K, H = 4, 2, 32
  # Per layer: q and o are D×(N·H), k and v D×(K·H), gate and up D×F, down F×D; two norm scales of D.
  weights = L * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
  norms = L * 2 * D + D  # and the final norm
  head = V_pad * D       # the output head is a matmul even when tied (the embedding is a lookup)
  assert weights + norms == 393_856
  assert param_counts(init_params(config, jax.random.key(0)))['non_embedding'] == weights + norms
  # Forward: 2 FLOPs per weight per token, and per layer QKᵀ and the weighted sum of V, 2·T·D each.
  # Training = forward + a backward twice as costly. (The norm scales count as weights: PaLM's rule.)
  forward = 2 * (weights + norms + head) + L * 2 * (2 * T * D)
  assert 3 * forward == 3_346_176  # golden: update only if the counting convention is changed on purpose
  assert scaling.flops_per_token(config, weights + norms, T) == 3 * forward
  # MFU: 10,000 tokens/s on two H100s.
  assert scaling.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert scaling.mfu(10_000 * 3 * forward, 989e12, 2) == pytest.approx(10_000 * 3_346_176 / (2 * 989e12))


def test_peak_flops_by_device_kind():
  assert scaling.peak_flops('NVIDIA A100-SXM4-40GB') == 312e12
  assert scaling.peak_flops('NVIDIA H200') == 989e12
  assert scaling.peak_flops('TPU v4') == 275e12
  # Whole words, not substrings: an L40S is not an L4, and JAX names a v5e 'TPU v5 lite'.
  assert scaling.peak_flops('NVIDIA L40S') == 362e12 and scaling.peak_flops('NVIDIA L4') == 121e12
  assert scaling.peak_flops('TPU v5 lite') == 197e12
  assert scaling.peak_flops('cpu') is None  # unknown: no MFU is reported
