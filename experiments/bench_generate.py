"""Generation throughput: prefill and KV-cache decode, batch 1 and 8, small and medium (SPEC §10).

    python experiments/bench_generate.py [--models=small,medium] [--batch_sizes=1,8] [--dtype=bfloat16]
                                         [--quick] [--out=experiments/results/bench_generate.json]

Untrained weights (speed does not depend on the values; EOS is off so every row decodes every token).
Per (model, batch) it reports, medians over --repeats after a warm-up run that compiles everything:
  prefill tok/s  prompt tokens / one jitted `decode.prefill` call (block_until_ready)
  step tok/s     new tokens / decode time of `decode.generate(chunk_size=1)`: one jitted step per token,
                 each token read back to the host as it is produced — the streaming path of the CLIs
  chunk tok/s    the same with `chunk_size=--chunk` (a while_loop per chunk; streams in chunks)
  loop tok/s     one `decode.decode_chunk` call running all the new tokens in a single while_loop,
                 nothing read until the end (the throughput ceiling of this decode code)
  ms/token       the step path's latency per decode step (batch rows share a step)
The device (and its kind) is recorded with the numbers; on a shared CPU other processes add noise
(the load average is recorded too).
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
from vesper_jax import config as base_config  # noqa: E402

from vesper_jax import decode  # noqa: E402
from vesper_jax.model import ModelConfig, cast_for_inference, init_params, param_counts  # noqa: E402
from vesper_jax.sampling import SamplingConfig  # noqa: E402

_MODELS = flags.DEFINE_list('models', ['small', 'medium'], 'Configs (configs/<name>.py) to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens decoded per row.')
_CHUNK = flags.DEFINE_integer('chunk', 16, 'Tokens per while_loop call in the chunked streaming mode.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute and weight dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (median reported).')
_QUICK = flags.DEFINE_bool('quick', False, 'tiny model, few tokens, one repeat: checks the script on CPU.')
_OUT = flags.DEFINE_string('out', str(REPO / 'experiments' / 'results' / 'bench_generate.json'),
                           'Results JSON.')

SETTINGS = SamplingConfig()  # the defaults: temperature 0.8, top-k 50, top-p 0.9


def _median_s(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  config = ModelConfig(**base_config.load_config_file(name).model)
  params = init_params(config, jax.random.key(0))
  counts = param_counts(params)
  config, params = cast_for_inference(config, params, _DTYPE.value)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, config.vocab_size, (batch, prompt_len)).tolist()
  prompt_BP, mask_BP = decode.left_pad(prompts)
  prompt_BP, mask_BP = jnp.asarray(prompt_BP), jnp.asarray(mask_BP)
  P = prompt_BP.shape[1]
  statics = dict(config=config, sampling=SETTINGS, eos_id=None)

  def run_prefill():
    state, token_B = decode.prefill(params, prompt_BP, mask_BP, jax.random.key(0),
                                      cache_len=P + new_tokens, **statics)
    jax.block_until_ready((state, token_B))
    return state

  def run_generate(chunk_size: int) -> float:
    stats = decode.GenerationStats()
    decode.generate(params, config, prompts, max_new_tokens=new_tokens, sampling=SETTINGS, eos_id=None,
                      chunk_size=chunk_size, stats=stats)
    return stats.decode_tokens_per_s

  def run_loop() -> float:
    state = run_prefill()
    start = time.perf_counter()
    state, tokens_BC, count = decode.decode_chunk(params, state, jnp.int32(new_tokens - 1),
                                                    chunk=new_tokens - 1, **statics)
    jax.block_until_ready(tokens_BC)
    assert int(count) == new_tokens - 1
    return batch * (new_tokens - 1) / (time.perf_counter() - start)

  # Warm-up: compiles prefill, the step, both chunk sizes.
  run_prefill()
  run_generate(1)
  run_generate(_CHUNK.value)
  run_loop()
  prefill_s = _median_s(run_prefill, repeats)
  step = statistics.median(run_generate(1) for _ in range(repeats))
  chunk = statistics.median(run_generate(_CHUNK.value) for _ in range(repeats))
  loop = statistics.median(run_loop() for _ in range(repeats))
  return {'model': name, 'batch': batch, 'dtype': _DTYPE.value, 'params_total': counts['total'],
          'prompt_len': prompt_len, 'new_tokens': new_tokens, 'prefill_tok_s': batch * prompt_len / prefill_s,
          'prefill_ms': 1000 * prefill_s, 'step_tok_s': step, 'chunk': _CHUNK.value, 'chunk_tok_s': chunk,
          'loop_tok_s': loop, 'step_ms_per_token': 1000 * batch / step}


def main(argv):
  del argv
  models = ['tiny'] if _QUICK.value else _MODELS.value
  prompt_len, new_tokens = (16, 16) if _QUICK.value else (_PROMPT_LEN.value, _NEW_TOKENS.value)
  repeats = 1 if _QUICK.value else _REPEATS.value
  device = jax.devices()[0]
  machine = f'{device.platform}: {device.device_kind} (x{jax.device_count()})'
  print(f'bench_generate on {machine}, {_DTYPE.value}, prompt {prompt_len}, {new_tokens} new tokens, '
        f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs', flush=True)
  results = []
  for name in models:
    for batch in map(int, _BATCH_SIZES.value):
      results.append(bench(name, batch, prompt_len, new_tokens, repeats))
      print(f'  done {name} batch {batch}', flush=True)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': machine, 'load_average': os.getloadavg()[0],
                             'cpu_count': os.cpu_count(), 'results': results}, indent=1))
  print(f'\n| model | params | batch | dtype | prefill tok/s | step tok/s (streaming) | ms/step '
        f'| chunk-{_CHUNK.value} tok/s | loop tok/s |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['model']} | {r['params_total'] / 1e6:.1f}M | {r['batch']} | {r['dtype']} "
          f"| {r['prefill_tok_s']:,.0f} | {r['step_tok_s']:,.1f} | {r['step_ms_per_token']:.2f} "
          f"| {r['chunk_tok_s']:,.1f} | {r['loop_tok_s']:,.1f} |")
  print(f'\n{machine}; results in {out}')


if __name__ == '__main__':
  app.run(main)
