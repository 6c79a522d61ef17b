"""Generation throughput: prefill and KV-cache decode, batch 1 and 8, small and medium (SPEC §10).

    python experiments/bench_generate.py [--models=small,medium] [--batch_sizes=1,8] [--dtype=bfloat16]
                                         [--quantize=none,int8,int4] [--quantize_head] [--torch]
                                         [--paths=prefill,step,chunk,loop] [--quick]
                                         [--out=experiments/results/bench_generate.json]

Untrained weights (speed does not depend on the values; EOS is off so every row decodes every token).
Per (model, batch) and weight format (--quantize: float, int8, int4 of quantize.py, the output head too
with --quantize_head), medians over --repeats after a warm-up run that compiles everything:
  prefill tok/s  prompt tokens / one jitted `decode.prefill` call (block_until_ready)
  step tok/s     new tokens / decode time of `decode.generate(chunk_size=1)`: one jitted step per token,
                 each token read back to the host as it is produced — the streaming path of the CLIs
  chunk tok/s    the same with `chunk_size=--chunk` (a while_loop per chunk; streams in chunks)
  loop tok/s     one `decode.decode_chunk` call running all the new tokens in a single while_loop,
                 nothing read until the end (the throughput ceiling of this decode code)
  ms/token       the step path's latency per decode step (batch rows share a step)
The weight formats of one (model, batch) are timed side by side: each repeat runs every format in turn,
so a busy shared CPU slows them alike, and the rows' ratios are what to read.

--torch adds an anchor from another stack: the same shapes as a `transformers` LlamaForCausalLM (untied
or tied head as the config says), float32 and `torch.ao.quantization.quantize_dynamic` int8 on every
Linear (the output head included), greedy decoding through its KV cache in eager PyTorch (prefill tok/s
and loop tok/s = the decode loop). It needs torch and transformers (never project dependencies: a side
environment with the project installed editable); without them it says so and skips. Time them in a
process of their own (`--torch --quantize=`): in one process PyTorch's OpenMP threads and XLA's pool
threads wait for work by spinning, and on a small CPU each side then runs several times slower.
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

from vesper_jax import decode, quantize  # noqa: E402
from vesper_jax.model import ModelConfig, cast_for_inference, init_params, param_counts  # noqa: E402
from vesper_jax.sampling import SamplingConfig  # noqa: E402

_MODELS = flags.DEFINE_list('models', ['small', 'medium'], 'Configs (configs/<name>.py) to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens decoded per row.')
_CHUNK = flags.DEFINE_integer('chunk', 16, 'Tokens per while_loop call in the chunked streaming mode.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute and weight dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (median reported).')
_QUANTIZE = flags.DEFINE_list('quantize', ['none'], 'Weight formats to time side by side: none (the '
                              '--dtype floats), int8, int4 (quantize.quantize_model); empty: none.')
_QUANTIZE_HEAD = flags.DEFINE_bool('quantize_head', True, 'int8/int4 also quantize the output head.')
_PATHS = flags.DEFINE_list('paths', ['prefill', 'step', 'chunk', 'loop'], 'What to time (see above).')
_TORCH = flags.DEFINE_bool('torch', False, 'Add PyTorch+transformers float32 and dynamic-int8 rows.')
_QUICK = flags.DEFINE_bool('quick', False, 'tiny model, few tokens, one repeat: checks the script on CPU.')
_OUT = flags.DEFINE_string('out', str(REPO / 'experiments' / 'results' / 'bench_generate.json'),
                           'Results JSON.')

SETTINGS = SamplingConfig()  # the defaults: temperature 0.8, top-k 50, top-p 0.9


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _vesper(config: ModelConfig, params, scheme: str, batch: int, prompts, new_tokens: int) -> dict:
  """The timed functions of one weight format: {path: fn() -> tokens per second}."""
  if scheme != 'none':
    config, params = quantize.quantize_model(config, params, scheme, quantize_head=_QUANTIZE_HEAD.value)
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

  return {'prefill': lambda: batch * P / _seconds(run_prefill), 'step': lambda: run_generate(1),
          'chunk': lambda: run_generate(_CHUNK.value), 'loop': run_loop,
          'weight_bytes': quantize.weight_bytes(params)['total']}


def _torch(config: ModelConfig, scheme: str, batch: int, prompts, new_tokens: int) -> dict | None:
  """The anchor's timed functions (float32 or dynamic int8), or None without torch/transformers."""
  # Without the repository on the path: transformers imports an optional `kernels` package, which the
  # repository's kernels/ folder (installed as vesper_jax.kernels) would shadow.
  saved_path = sys.path[:]
  sys.path[:] = [p for p in sys.path if pathlib.Path(p or '.').resolve() != REPO]
  try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM  # the lazy import happens here
  except ImportError as e:
    print(f'  --torch: skipped ({e}); it needs torch and transformers installed beside the project')
    return None
  finally:
    sys.path[:] = saved_path
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  llama = LlamaConfig(
      vocab_size=config.padded_vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.kv_heads, max_position_embeddings=config.max_seq_len,
      tie_word_embeddings=config.tie_embeddings, attention_bias=config.use_bias, mlp_bias=config.use_bias)
  model = LlamaForCausalLM(llama).eval()
  if scheme == 'int8':
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
  prompt = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed

  @torch.inference_mode()
  def run_prefill():
    out = model(prompt, use_cache=True)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

  @torch.inference_mode()
  def run_loop() -> float:
    cache, token = run_prefill()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):  # greedy, as the untrained vesper rows' cost does not depend on it
      out = model(token, past_key_values=cache, use_cache=True)
      cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * (new_tokens - 1) / (time.perf_counter() - start)

  # Dynamic int8 keeps its weights in packed objects that state_dict does not expose as tensors.
  weight_bytes = None if scheme == 'int8' else sum(t.numel() * t.element_size()
                                                   for t in model.state_dict().values())
  return {'prefill': lambda: prompt.numel() / _seconds(run_prefill), 'loop': run_loop,
          'weight_bytes': weight_bytes}


def bench(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
  """Rows for every weight format of one (model, batch), timed in turn within each repeat."""
  config = ModelConfig(**base_config.load_config_file(name).model)
  params = init_params(config, jax.random.key(0))
  counts = param_counts(params)
  config, params = cast_for_inference(config, params, _DTYPE.value)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, config.vocab_size, (batch, prompt_len)).tolist()
  cases = {(f'vesper {_DTYPE.value}' if scheme == 'none' else f'vesper {scheme}'):
           _vesper(config, params, scheme, batch, prompts, new_tokens) for scheme in _QUANTIZE.value}
  if _TORCH.value:
    for scheme in ('float32', 'int8'):
      case = _torch(config, scheme, batch, prompts, new_tokens)
      if case is None:
        break
      cases[f'torch {scheme}' + (' (dynamic)' if scheme == 'int8' else '')] = case
  paths = [path for path in _PATHS.value]
  for case in cases.values():  # warm-up: compiles prefill, the step, both chunk sizes
    for path in paths:
      if path in case:
        case[path]()
  times = {(label, path): [] for label, case in cases.items() for path in paths if path in case}
  for _ in range(repeats):
    for label, case in cases.items():
      for path in paths:
        if path in case:
          times[label, path].append(case[path]())
  rows = []
  for label, case in cases.items():
    row = {'model': name, 'batch': batch, 'weights': label, 'params_total': counts['total'],
           'weight_bytes': case['weight_bytes'], 'prompt_len': prompt_len, 'new_tokens': new_tokens,
           'chunk': _CHUNK.value}
    for path in paths:
      if path in case:
        row[f'{path}_tok_s'] = statistics.median(times[label, path])
    if 'step_tok_s' in row:
      row['step_ms_per_token'] = 1000 * batch / row['step_tok_s']
    rows.append(row)
  return rows


def _cell(row: dict, key: str, digits: int) -> str:
  return f'{row[key]:,.{digits}f}' if key in row else '-'


def main(argv):
  del argv
  models = ['tiny'] if _QUICK.value else _MODELS.value
  prompt_len, new_tokens = (16, 16) if _QUICK.value else (_PROMPT_LEN.value, _NEW_TOKENS.value)
  repeats = 1 if _QUICK.value else _REPEATS.value
  for scheme in _QUANTIZE.value:
    if scheme != 'none' and scheme not in quantize.SCHEMES:
      raise app.UsageError(f'--quantize={scheme}: expected none or one of {quantize.SCHEMES}')
  device = jax.devices()[0]
  machine = f'{device.platform}: {device.device_kind} (x{jax.device_count()})'
  print(f'bench_generate on {machine}, {_DTYPE.value}, prompt {prompt_len}, {new_tokens} new tokens, '
        f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs', flush=True)
  results = []
  for name in models:
    for batch in map(int, _BATCH_SIZES.value):
      results.extend(bench(name, batch, prompt_len, new_tokens, repeats))
      print(f'  done {name} batch {batch}', flush=True)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': machine, 'load_average': os.getloadavg()[0],
                             'cpu_count': os.cpu_count(), 'quantize_head': _QUANTIZE_HEAD.value,
                             'results': results}, indent=1))
  print(f'\n| model | params | batch | weights | MB | prefill tok/s | step tok/s (streaming) | ms/step '
        f'| chunk-{_CHUNK.value} tok/s | loop tok/s | loop vs first row |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  first = {}
  for r in results:
    base = first.setdefault((r['model'], r['batch']), r)
    ratio = f"{r['loop_tok_s'] / base['loop_tok_s']:.2f}x" if 'loop_tok_s' in r else '-'
    megabytes = '-' if r['weight_bytes'] is None else f"{r['weight_bytes'] / 1e6:.0f}"
    print(f"| {r['model']} | {r['params_total'] / 1e6:.1f}M | {r['batch']} | {r['weights']} "
          f"| {megabytes} | {_cell(r, 'prefill_tok_s', 0)} | {_cell(r, 'step_tok_s', 1)} "
          f"| {_cell(r, 'step_ms_per_token', 2)} | {_cell(r, 'chunk_tok_s', 1)} | {_cell(r, 'loop_tok_s', 1)} "
          f"| {ratio} |")
  print(f'\n{machine}; results in {out}')


if __name__ == '__main__':
  app.run(main)
