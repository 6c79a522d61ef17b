"""vesper_jax: small decoder language models in JAX/Flax."""
