"""Training throughput: tokens/s (and MFU where the device's peak is known) of the real train step.

  python experiments/bench_train.py --configs=tiny,small --steps=10            # CPU
  python experiments/bench_train.py --configs=medium --optimizers=adamw,velvet # GPU (bf16 from the config)

Times `train.build(...)`'s jitted step on random tokens (data loading is not the bottleneck being
measured), after a compile-and-warmup step; prints a table and writes JSON.
"""

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from vesper_jax import config as base_config
from vesper_jax import scaling
from vesper_jax import sharding
from vesper_jax import train
from vesper_jax.model import abstract_param_counts, ModelConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
_CONFIGS = flags.DEFINE_list('configs', ['tiny', 'small'], 'Config names under configs/.')
_OPTIMIZERS = flags.DEFINE_list('optimizers', ['adamw'], 'opt.name values to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one warmup step).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Override train.batch_size (0 = the config\'s).')
_SEQ = flags.DEFINE_integer('seq_len', 0, 'Override data.seq_len (0 = the config\'s).')
_DTYPE = flags.DEFINE_string('dtype', '', 'Override model.dtype (e.g. float32 on CPU).')
_ATTENTION = flags.DEFINE_string('attention_impl', '', "Override model.attention_impl ('xla', 'cudnn').")
_OUT = flags.DEFINE_string('out', '', 'JSON path (default: $OUT/bench_train.json or experiments/results/).')


def bench(name: str, optimizer: str) -> dict:
  config = base_config.load_config_file(name)
  config.opt.name = optimizer
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  if _SEQ.value:
    config.data.seq_len = _SEQ.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _ATTENTION.value:
    config.model.attention_impl = _ATTENTION.value
  train.validate_config(config)
  mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
  parts = train.build(config, mesh)
  state = parts.init_fn(jax.random.key(0))
  B, T = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch({'tokens': rng.integers(0, config.model.vocab_size, (B, T + 1),
                                                           dtype=np.int32)}, parts.batch_sharding)
             for _ in range(2)]
  t0 = time.perf_counter()
  state, metrics = parts.step_fn(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = parts.step_fn(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / _STEPS.value
  counts = abstract_param_counts(ModelConfig(**config.model))
  tokens_per_s = B * T / step_s
  peak = scaling.peak_flops(jax.devices()[0].device_kind)
  flops_per_s = scaling.flops_per_token(parts.model.config, counts['non_embedding'], T) * tokens_per_s
  mfu = scaling.mfu(flops_per_s, peak, mesh.size) if peak else None
  return {'config': name, 'optimizer': optimizer, 'attention': config.model.attention_impl or 'auto',
          'device': jax.devices()[0].device_kind,
          'devices': mesh.size, 'dtype': config.model.dtype, 'batch_size': B, 'seq_len': T,
          'params': counts['total'], 'step_ms': 1e3 * step_s, 'tokens_per_s': tokens_per_s, 'mfu': mfu,
          'first_step_s': compile_s, 'loss': float(metrics['loss'])}


def main(argv):
  del argv
  rows = [bench(n, o) for n in _CONFIGS.value for o in _OPTIMIZERS.value]
  out = pathlib.Path(_OUT.value or (pathlib.Path(os.environ['OUT']) / 'bench_train.json' if 'OUT' in os.environ
                                    else REPO / 'experiments' / 'results' / 'bench_train.json'))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=2))
  print(f"\n| config | optimizer | attention | device | dtype | batch×seq | params | step ms | tokens/s | MFU |")
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
    print(f"| {r['config']} | {r['optimizer']} | {r['attention']} | {r['devices']}× {r['device']} | {r['dtype']} | "
          f"{r['batch_size']}×{r['seq_len']} | {r['params']:,} | {r['step_ms']:.1f} | "
          f"{r['tokens_per_s']:,.0f} | {mfu} |")
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
