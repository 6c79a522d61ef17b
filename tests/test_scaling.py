"""Chinchilla helpers against the paper's Table 3 (SPEC §12)."""

import subprocess
import sys

import pytest

from conftest import REPO
from vesper_jax import scaling


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
