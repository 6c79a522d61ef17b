"""`python -m vesper_jax.scale --tokens=N | --flops=C`: Chinchilla-optimal size and the nearest config.

Prints the compute-optimal parameter count N and token count D (D = 20·N, C = 6·N·D), the nearest
VesperLM config in configs/ (by total parameters at --vocab_size), the steps that budget takes at
--batch_size × --seq_len, and Chinchilla's predicted loss (their data and tokenizer: indicative only).
"""

import pathlib

from absl import app
from absl import flags

from vesper_jax import cli
from vesper_jax import config as base_config
from vesper_jax import scaling

FLAGS = flags.FLAGS

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
  if (FLAGS.tokens is None) == (FLAGS.flops is None):
    raise app.UsageError('give exactly one of --tokens or --flops')
  if FLAGS.flops is not None:
    n, d = scaling.optimal_from_flops(FLAGS.flops)
  else:
    d = FLAGS.tokens
    n = scaling.optimal_params(d)
  c = scaling.training_flops(n, d)
  sizes = config_sizes(FLAGS.configs_dir, FLAGS.vocab_size)
  nearest = scaling.nearest_config(n, sizes)
  steps = scaling.steps_for_tokens(d, FLAGS.batch_size, FLAGS.seq_len)
  print(f'compute-optimal parameters N : {n:,.0f} ({n / 1e6:,.1f}M)')
  print(f'compute-optimal tokens D     : {d:,.0f} ({d / 1e9:,.2f}B)')
  print(f'training compute C = 6ND     : {c:.3g} FLOPs')
  print(f'nearest config               : {nearest} ({sizes[nearest]:,} parameters at vocab {FLAGS.vocab_size:,})')
  print(f"{f'steps at {FLAGS.batch_size} x {FLAGS.seq_len} tokens':<29}: {steps:,}")
  print(f'Chinchilla predicted loss    : {scaling.predicted_loss(n, d):.3f} nats/token (indicative)')


def define_flags() -> None:
  flags.DEFINE_float('tokens', None, 'Training tokens available (D).')
  flags.DEFINE_float('flops', None, 'Training compute budget in FLOPs (C).')
  flags.DEFINE_integer('batch_size', 64, 'Sequences per optimizer step, for the step count.')
  flags.DEFINE_integer('seq_len', 1024, 'Tokens per sequence, for the step count.')
  flags.DEFINE_integer('vocab_size', 32000, 'Vocabulary used to size the configs.')
  flags.DEFINE_string('configs_dir', str(base_config.CONFIGS_DIR),
                      'Directory of the size configs (tiny/small/medium/large).')


if __name__ == '__main__':
  cli.run('vesper_jax.scale', main, define_flags)
