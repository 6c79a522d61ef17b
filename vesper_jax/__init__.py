"""vesper_jax: small decoder language models in JAX/Flax."""

from vesper_jax import host_memory as _host_memory

# Importing the package keeps freed host memory for reuse in a CPU-only process (host_memory.py: without
# it a CPU train step page-faults its whole working set back in every step, ~13% of the step). Here, not
# only in the entry points, so a script or notebook that trains gets the same step; not where JAX runs on
# an accelerator; VESPER_SYSTEM_MALLOC=1 opts out. The token cache is tokenized in a child process that
# keeps glibc's defaults (tokenizer.BatchEncoder): the tokenizer's threads would queue on the one arena.
_host_memory.apply_default()
