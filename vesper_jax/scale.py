"""`python -m vesper_jax.scale --tokens=N | --flops=C`: Chinchilla-optimal size and the nearest config.

Prints the compute-optimal parameter count N and token count D (D = 20·N, C = 6·N·D), the nearest
VesperLM config in configs/ (by total parameters at --vocab_size), the steps that budget takes at
--batch_size × --seq_len, and Chinchilla's predicted loss (their data and tokenizer: indicative only).
"""

import pathlib

from absl import app
from absl import flags

from vesper_jax import config as base_config
from vesper_jax import scaling

_TOKENS = flags.DEFINE_float('tokens', None, 'Training tokens available (D).')
_FLOPS = flags.DEFINE_float('flops', None, 'Training compute budget in FLOPs (C).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Sequences per optimizer step, for the step count.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'Tokens per sequence, for the step count.')
_VOCAB = flags.DEFINE_integer('vocab_size', 32000, 'Vocabulary used to size the configs.')
_CONFIGS = flags.DEFINE_string('configs_dir', str(base_config.CONFIGS_DIR),
                               'Directory of the size configs (tiny/small/medium/large).')

SIZES = ('tiny', 'small', 'medium', 'large')


def config_sizes(configs_dir: str, vocab_size: int) -> dict[str, int]:
  """Total parameters of each size config at `vocab_size`, from abstract shapes."""
  from vesper_jax.model import ModelConfig, abstract_param_counts  # deferred: jax only when needed
  sizes = {}
  for name in SIZES:
    config = base_config.load_config_file(pathlib.Path(configs_dir) / f'{name}.py')
    config.model.vocab_size = vocab_size
    sizes[name] = abstract_param_counts(ModelConfig(**config.model))['total']
  return sizes


def main(argv):
  del argv
  if (_TOKENS.value is None) == (_FLOPS.value is None):
    raise app.UsageError('give exactly one of --tokens or --flops')
  if _FLOPS.value is not None:
    n, d = scaling.optimal_from_flops(_FLOPS.value)
  else:
    d = _TOKENS.value
    n = scaling.optimal_params(d)
  c = scaling.training_flops(n, d)
  sizes = config_sizes(_CONFIGS.value, _VOCAB.value)
  nearest = scaling.nearest_config(n, sizes)
  steps = scaling.steps_for_tokens(d, _BATCH.value, _SEQ_LEN.value)
  print(f'compute-optimal parameters N : {n:,.0f} ({n / 1e6:,.1f}M)')
  print(f'compute-optimal tokens D     : {d:,.0f} ({d / 1e9:,.2f}B)')
  print(f'training compute C = 6ND     : {c:.3g} FLOPs')
  print(f'nearest config               : {nearest} ({sizes[nearest]:,} parameters at vocab {_VOCAB.value:,})')
  print(f"{f'steps at {_BATCH.value} x {_SEQ_LEN.value} tokens':<29}: {steps:,}")
  print(f'Chinchilla predicted loss    : {scaling.predicted_loss(n, d):.3f} nats/token (indicative)')


if __name__ == '__main__':
  app.run(main)
