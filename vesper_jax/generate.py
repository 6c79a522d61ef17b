"""Sample text from a trained model, streamed to the terminal as it is produced (SPEC §10).

  python -m vesper_jax.generate --workdir=runs/tiny --prompt='Once upon a time'

The continuation goes to stdout as it is decoded (one prompt: token by token; several prompts: each in
full at the end); timings and tokens/s go to stderr, so stdout holds only text.
"""

import sys
from typing import Any

import jax
from absl import app, flags, logging

from vesper_jax import checkpoint, sampling
from vesper_jax.model import ModelConfig
from vesper_jax.tokenizer import Tokenizer

FLAGS = flags.FLAGS


def load_from_flags() -> tuple[ModelConfig, Any, Tokenizer, sampling.SamplingConfig]:
  """The model, tokenizer and sampling settings named by `define_common_flags` (chat uses this too)."""
  if not FLAGS['verbosity'].present:  # library INFO logs would interleave with the text in a terminal
    logging.set_verbosity(logging.WARNING)
  logging.info('devices: %s', jax.devices())
  config, params, tokenizer = checkpoint.load_for_inference(FLAGS.workdir)
  if FLAGS.dtype:
    config, params = sampling.cast_for_inference(config, params, FLAGS.dtype)
  try:
    settings = sampling.SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                       top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty)
  except ValueError as e:  # e.g. --top_p=0: the flag's name and range, without a traceback
    raise app.UsageError(str(e)) from e
  return config, params, tokenizer, settings


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, params, tokenizer, settings = load_from_flags()
  prompts = FLAGS.prompt
  longest = max(len(tokenizer.encode(p)) or 1 for p in prompts)
  max_new_tokens = min(FLAGS.max_new_tokens, config.max_seq_len - longest)
  if max_new_tokens < 1:
    raise app.UsageError(f'the prompt ({longest} tokens) fills the context window '
                         f'(model.max_seq_len={config.max_seq_len})')
  if max_new_tokens < FLAGS.max_new_tokens:
    logging.warning('max_new_tokens capped to %d: the prompt is %d tokens of a %d-token context window',
                    max_new_tokens, longest, config.max_seq_len)
  streaming = len(prompts) == 1

  def on_text(row: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()

  if streaming:
    sys.stdout.write(prompts[0])
    sys.stdout.flush()
  stats = sampling.GenerationStats()
  texts = sampling.generate_text(params, config, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 sampling=settings, seed=FLAGS.seed, stop_strings=FLAGS.stop,
                                 chunk_size=FLAGS.chunk_size, on_text=on_text if streaming else None,
                                 stats=stats)
  if streaming:
    sys.stdout.write('\n')
  else:
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
      sys.stdout.write(f'--- [{i}]\n{prompt}{text}\n')
  sys.stdout.flush()
  print(f'[{stats.prompt_tokens} prompt tokens; first token after {stats.prefill_s:.2f} s (compilation '
        f'included); {stats.new_tokens} new tokens; decode {stats.decode_tokens_per_s:.1f} tokens/s]',
        file=sys.stderr)


def define_common_flags() -> None:
  """The flags generate and chat share: the workdir, the sampling filters, the inference dtype."""
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json, tokenizer.json, '
                      'checkpoints/).', required=True)
  flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
  flags.DEFINE_integer('top_k', 50, '0 = off.')
  flags.DEFINE_float('top_p', 0.9, '1.0 = off.')
  flags.DEFINE_float('repetition_penalty', 1.0, '> 1 discourages repeats; 1.0 = off.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute and weight dtype for '
                    'inference; default: the trained compute dtype with float32 weights.')


def _define_flags():
  define_common_flags()
  flags.DEFINE_multi_string('prompt', [''], 'Prompt text; repeat the flag for a batch of prompts. '
                            'An empty prompt starts a new document.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to sample at most, per prompt '
                       '(capped to what fits the context window).')
  flags.DEFINE_integer('seed', 0, 'The same seed and settings give the same text.')
  flags.DEFINE_multi_string('stop', [], 'Stop strings (repeatable); the text ends before the first.')
  flags.DEFINE_integer('chunk_size', 1, 'Tokens per device call: 1 = a jitted step per token; '
                       'more = a while_loop per chunk (fewer host round trips).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
