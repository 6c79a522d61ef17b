"""vesper_jax: small decoder language models in JAX/Flax."""

from vesper_jax import host_memory

# Must run before JAX starts its CPU backend to have any effect: host_memory.py says why and what.
host_memory.retain_freed_memory()
