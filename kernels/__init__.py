"""Kernels for vesper_jax (installed as `vesper_jax.kernels`): Velvet on GPU; attention, the head's
softmax, ERA, the quantized projections and sampling on CPU (cpu_kernels.py)."""
