"""GPU kernels for vesper_jax (installed as `vesper_jax.kernels`)."""
