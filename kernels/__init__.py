"""Kernels for vesper_jax (installed as `vesper_jax.kernels`): Velvet on GPU, attention on CPU."""
