"""tiny: 2 layers, 4 heads, d_model 128, d_ff 384 — tests, CI and the CPU quickstart."""

from vesper_jax import config as base


def get_config():
  # The base is already the tiny model on the built-in corpus; this file names it.
  return base.get_config()
