"""Kernels for vesper_jax (installed as `vesper_jax.kernels`): Velvet on GPU; attention, the head's
softmax and ERA on CPU (cpu_kernels.py)."""
