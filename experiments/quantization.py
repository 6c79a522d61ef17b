"""Weight-only int8 / int4 quantization of a trained model: perplexity, weight bytes, decode speed (SPEC §10).

    python experiments/quantization.py --quick      # tiny model, 400 steps: a few minutes on a CPU
    python experiments/quantization.py              # tiny model, 1500 steps of 16 x 128 (~10 min on 2 cores)

1. Train a model on TinyStories through `train.train_and_evaluate` (a finished run in --workdir is reused).
2. Load its latest checkpoint and build the variants: float32; bfloat16 (weights and compute); int8 and
   int4 (quantize.quantize_model: the seven projections of every layer), each also with the output head
   quantized (`+head`). The embeddings stay float32 in every quantized variant.
3. For each variant: held-out perplexity over the run's validation split (every token of
   `data.build_or_load_cache(...).val` in non-overlapping windows of data.seq_len, predicting each
   window's next tokens); exact weight bytes (scales and offsets included) of the whole model and of the
   projections; decode tokens/s at batch 1 and 8, measured side by side (each repeat times every variant
   in turn, so a busy shared CPU slows them alike; medians reported):
     step tok/s  `decode.generate(chunk_size=1)`: one jitted step per token, read back as produced
     loop tok/s  one `decode.decode_chunk` call running every new token in a single while_loop
   Greedy decoding with EOS off, so every row decodes every token.

Prints a Markdown table and writes JSON to --out (experiments/results/, git-ignored).
"""

import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vesper_jax import checkpoint  # noqa: E402
from vesper_jax import config as base_config  # noqa: E402
from vesper_jax import data, decode, quantize, train  # noqa: E402
from vesper_jax.model import ModelConfig, VesperLM, cast_for_inference  # noqa: E402
from vesper_jax.pytree import PyTree  # noqa: E402
from vesper_jax.sampling import GREEDY  # noqa: E402

RESULTS = REPO / 'experiments' / 'results'

_QUICK = flags.DEFINE_bool('quick', False, 'Fewer training steps and decode tokens: a few minutes on a CPU.')
_CONFIG = flags.DEFINE_string('config', 'tiny', 'configs/<name>.py of the trained model.')
_DATA = flags.DEFINE_string('data', 'download:tinystories', 'Training text (data.sources).')
_STEPS = flags.DEFINE_integer('steps', None, 'Training steps; default 400 with --quick, else 1500.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Training batch (sequences).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Training window, and the perplexity window.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', None, 'Decoded tokens per row; default 32 with --quick, '
                                   'else 128.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 16, 'Prompt tokens per row (from the validation split).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats per variant and batch size (median).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (default: experiments/results/'
                               'quantization[_quick]/run); a finished run there is reused.')
_OUT = flags.DEFINE_string('out', None, 'Results JSON (default: experiments/results/quantization[_quick].json).')

BATCH_SIZES = (1, 8)
_EVAL_BATCH = 16  # windows per perplexity forward pass


def _train(workdir: pathlib.Path, steps: int):
  """Trains (or reuses) the run; returns its config."""
  config = base_config.short_run(base_config.load_config_file(_CONFIG.value), steps)
  config.data.sources = _DATA.value
  config.data.seq_len = _SEQ_LEN.value
  config.data.cache_dir = str(workdir.parent / 'cache')
  config.train.batch_size = _BATCH.value
  summary = train.train_and_evaluate(config, workdir)
  return config, summary


def _variants(config: ModelConfig, params: PyTree) -> dict[str, tuple[ModelConfig, PyTree]]:
  variants = {'float32': (config, params), 'bfloat16': cast_for_inference(config, params, 'bfloat16')}
  for scheme in quantize.SCHEMES:
    variants[scheme] = quantize.quantize_model(config, params, scheme)
    variants[f'{scheme}+head'] = quantize.quantize_model(config, params, scheme, quantize_head=True)
  return variants


def perplexity(config: ModelConfig, params: PyTree, tokens: np.ndarray, seq_len: int) -> dict[str, float]:
  """exp(mean next-token loss) over `tokens` in non-overlapping windows of `seq_len` predictions."""
  n = (len(tokens) - 1) // seq_len
  inputs_NT = np.asarray(tokens[:n * seq_len], np.int32).reshape(n, seq_len)
  targets_NT = np.asarray(tokens[1:n * seq_len + 1], np.int32).reshape(n, seq_len)

  @jax.jit
  def nll_sum(params, inputs_BT, targets_BT, weight_B):
    logits_BTV = VesperLM(config).apply({'params': params}, inputs_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BT * weight_B[:, None])

  total = 0.0
  for start in range(0, n, _EVAL_BATCH):  # the last batch is padded with zero-weight windows
    rows = np.arange(start, start + _EVAL_BATCH) % n
    weight_B = (np.arange(start, start + _EVAL_BATCH) < n).astype(np.float32)
    total += float(nll_sum(params, inputs_NT[rows], targets_NT[rows], weight_B))
  loss = total / (n * seq_len)
  return {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': n * seq_len}


def _decode_timers(config: ModelConfig, params: PyTree, prompts: list[list[int]], new_tokens: int):
  """(step, loop) functions that each decode once and return tokens/s."""
  prompt_BP, mask_BP = decode.left_pad(prompts)
  B, P = prompt_BP.shape
  statics = dict(config=config, sampling=GREEDY, eos_id=None)

  def step() -> float:
    stats = decode.GenerationStats()
    decode.generate(params, config, prompts, max_new_tokens=new_tokens, sampling=GREEDY, eos_id=None,
                    chunk_size=1, stats=stats)
    return stats.decode_tokens_per_s

  def loop() -> float:
    state, token_B = decode.prefill(params, prompt_BP, mask_BP, jax.random.key(0),
                                    cache_len=P + new_tokens, **statics)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, tokens_BC, count = decode.decode_chunk(params, state, jnp.int32(new_tokens - 1),
                                                  chunk=new_tokens - 1, **statics)
    jax.block_until_ready(tokens_BC)
    return B * int(count) / (time.perf_counter() - start)

  return step, loop


def decode_speed(variants: dict, val: np.ndarray, new_tokens: int, repeats: int) -> dict[str, dict]:
  """{variant: {'b1_step': tok/s, 'b1_loop': ..., 'b8_step': ..., 'b8_loop': ...}}, medians, side by side."""
  speeds = {name: {} for name in variants}
  for batch in BATCH_SIZES:
    L = _PROMPT_LEN.value
    prompts = [val[i * L:(i + 1) * L].tolist() for i in range(batch)]
    timers = {name: _decode_timers(c, p, prompts, new_tokens) for name, (c, p) in variants.items()}
    for step, loop in timers.values():  # warm-up: compiles every variant's prefill, step and loop
      step()
      loop()
    samples = {name: ([], []) for name in variants}
    for _ in range(repeats):
      for name, (step, loop) in timers.items():
        samples[name][0].append(step())
        samples[name][1].append(loop())
    for name, (steps, loops) in samples.items():
      speeds[name][f'b{batch}_step'] = statistics.median(steps)
      speeds[name][f'b{batch}_loop'] = statistics.median(loops)
  return speeds


def main(argv):
  del argv
  quick = _QUICK.value
  suffix = '_quick' if quick else ''
  steps = _STEPS.value or (400 if quick else 1500)
  new_tokens = _NEW_TOKENS.value or (32 if quick else 128)
  workdir = pathlib.Path(_WORKDIR.value or RESULTS / f'quantization{suffix}' / 'run')
  out = pathlib.Path(_OUT.value or RESULTS / f'quantization{suffix}.json')
  device = jax.devices()[0]
  machine = f'{device.platform}: {device.device_kind} (x{jax.device_count()}), {os.cpu_count()} CPUs'
  print(f'quantization on {machine}; training {_CONFIG.value} for {steps} steps of '
        f'{_BATCH.value}x{_SEQ_LEN.value} in {workdir}', flush=True)

  start = time.perf_counter()
  run_config, summary = _train(workdir, steps)
  train_s = time.perf_counter() - start
  cache = data.build_or_load_cache(run_config.data, run_config.model.vocab_size, progress=False)
  config, params, _ = checkpoint.load_for_inference(workdir)
  variants = _variants(config, params)

  results = {name: {} for name in variants}
  for name, (c, p) in variants.items():
    results[name].update(perplexity(c, p, cache.val, _SEQ_LEN.value))
    results[name].update({f'bytes_{k}': v for k, v in quantize.weight_bytes(p).items()})
    print(f"  {name}: perplexity {results[name]['perplexity']:.3f}", flush=True)
  load = os.getloadavg()[0]
  for name, speed in decode_speed(variants, cache.val, new_tokens, _REPEATS.value).items():
    results[name].update(speed)

  ref = results['float32']
  for r in results.values():
    r['perplexity_change'] = r['perplexity'] / ref['perplexity'] - 1
    r['bytes_ratio'] = r['bytes_total'] / ref['bytes_total']
    r['projection_bytes_ratio'] = r['bytes_projections'] / ref['bytes_projections']
  out.parent.mkdir(parents=True, exist_ok=True)
  record = {'machine': machine, 'load_average_before_timing': load, 'config': _CONFIG.value,
            'train_steps': steps, 'batch_size': _BATCH.value, 'seq_len': _SEQ_LEN.value,
            'train_seconds': train_s, 'train_summary': {k: v for k, v in summary.items()
                                                        if isinstance(v, (int, float, str, bool))},
            'val_tokens': ref['tokens'], 'new_tokens': new_tokens, 'prompt_len': _PROMPT_LEN.value,
            'repeats': _REPEATS.value, 'int4_group_size': 128, 'results': results}
  out.write_text(json.dumps(record, indent=1))

  print(f'\n{_CONFIG.value} model, {steps} steps of {_BATCH.value}x{_SEQ_LEN.value} on TinyStories; '
        f"perplexity over {ref['tokens']:,} held-out tokens; decode {new_tokens} tokens after a "
        f'{_PROMPT_LEN.value}-token prompt, greedy, median of {_REPEATS.value}\n')
  print('| variant | perplexity | change | weight bytes (all) | vs float32 | projection bytes | vs float32 '
        '| b1 step tok/s | b1 loop tok/s | b8 step tok/s | b8 loop tok/s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for name, r in results.items():
    print(f"| {name} | {r['perplexity']:.3f} | {100 * r['perplexity_change']:+.2f}% "
          f"| {r['bytes_total']:,} | {r['bytes_ratio']:.3f} | {r['bytes_projections']:,} "
          f"| {r['projection_bytes_ratio']:.3f} | {r['b1_step']:,.0f} | {r['b1_loop']:,.0f} "
          f"| {r['b8_step']:,.0f} | {r['b8_loop']:,.0f} |")
  print(f'\n{machine}; load average {load:.1f} before timing; results in {out}')


if __name__ == '__main__':
  app.run(main)
