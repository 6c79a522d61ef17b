"""Training throughput: tokens/s (and MFU where the device's peak is known) of the real train step.

  python experiments/bench_train.py --configs=tiny,small --steps=10            # CPU
  python experiments/bench_train.py --configs=medium --optimizers=adamw,velvet # GPU (bf16 from the config)
  python experiments/bench_train.py --configs=small --batch_size=8 --torch     # CPU, with the PyTorch anchor
  python experiments/bench_train.py --configs=medium --optimizers=adamw,velvet \
      --velvet_kernels=xla,pallas,triton --batch_size=32 --torch                # GPU (experiments/gpu_suite.sh)

Times `train.build(...)`'s jitted step on random tokens (data loading is not the bottleneck being
measured), after a compile-and-warmup step; prints a table and writes JSON.

`--torch` adds the same model and step written in PyTorch (eager and `torch.compile`), timed in the
same process in alternating blocks (`--block` JAX steps, then as many eager steps, then compiled steps,
repeated until each has `--steps`), so that a machine whose speed drifts slows all three alike; each row
reports the median step. Each block starts with one untimed step: a framework's thread pool keeps
spinning for a while after its step, and the first step after a switch pays for the other's (interleaved
step by step, torch.compile measured 27% slower and the JAX step 5% slower than alone).
PyTorch is not a dependency of this project: install it beside it to use the flag (the row is skipped,
with the reason printed, when it is missing or the config has no PyTorch counterpart). On a GPU the anchor
is nanoGPT's recipe: float32 parameters, bfloat16 autocast for a bfloat16 config, fused AdamW, SDPA
(flash) attention, and `torch.compile` of the whole step.
"""

import json
import math
import os
import pathlib
import statistics
import time

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from vesper_jax import config as base_config
from vesper_jax import platforms
from vesper_jax import scaling
from vesper_jax import sharding
from vesper_jax import train
from vesper_jax.kernels import attention_cpu_ffi
from vesper_jax.model import abstract_param_counts, attention_implementation, ModelConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
_CONFIGS = flags.DEFINE_list('configs', ['tiny', 'small'], 'Config names under configs/.')
_OPTIMIZERS = flags.DEFINE_list('optimizers', ['adamw'], 'opt.name values to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one warmup step).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Override train.batch_size (0 = the config\'s).')
_ACCUM = flags.DEFINE_integer('grad_accum_steps', -1, 'Override train.grad_accum_steps (-1 = the config\'s; '
                              '0 = auto): the batch as this many micro-batches.')
_TORCH_ACCUM = flags.DEFINE_integer('torch_grad_accum_steps', -1, 'Micro-batches of the PyTorch anchor '
                                    '(-1 = as many as the JAX step uses).')
_SEQ = flags.DEFINE_integer('seq_len', 0, 'Override data.seq_len (0 = the config\'s).')
_DTYPE = flags.DEFINE_string('dtype', '', 'Override model.dtype (e.g. float32 on CPU).')
_ATTENTION = flags.DEFINE_string('attention_impl', '', "Override model.attention_impl ('xla', 'cudnn').")
_ACTIVATION = flags.DEFINE_string('activation', '', "Override model.activation ('era', 'silu', 'gelu').")
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the same model and step in PyTorch (eager and '
                           'torch.compile), in blocks alternating with the JAX step; needs torch.')
_BLOCK = flags.DEFINE_integer('block', 5, 'With --torch: timed steps per framework in a row (after one '
                              'untimed step each time the framework takes over).')
_VELVET_KERNELS = flags.DEFINE_list('velvet_kernels', [], "opt.kernel values to time Velvet with, one row "
                                    "each ('xla', 'xla_flat', 'pallas', 'triton'; default: the config's).")
_CACHE = flags.DEFINE_string('compilation_cache_dir', '', 'Persistent compilation cache (a second run '
                             'with the same directory measures the first step from the cache).')
_OUT = flags.DEFINE_string('out', '', 'JSON path (default: $OUT/bench_train.json or experiments/results/).')


def load(name: str, optimizer: str, kernel: str = ''):
  config = base_config.load_config_file(name)
  config.opt.name = optimizer
  if kernel:
    config.opt.kernel = kernel
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  if _SEQ.value:
    config.data.seq_len = _SEQ.value
  if _ACCUM.value >= 0:
    config.train.grad_accum_steps = _ACCUM.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _ATTENTION.value:
    config.model.attention_impl = _ATTENTION.value
  if _ACTIVATION.value:
    config.model.activation = _ACTIVATION.value
  train.validate_config(config)
  return config


def jax_step(config):
  """(step, first_step_s): `step()` runs one real train step and waits for it."""
  mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
  parts = train.build(config, mesh)
  B, T = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch({'tokens': rng.integers(0, config.model.vocab_size, (B, T + 1),
                                                           dtype=np.int32)}, parts.batch_sharding)
             for _ in range(2)]
  holder = {'state': parts.init_fn(jax.random.key(0)), 'i': 0}

  def step():
    holder['state'], metrics = parts.step_fn(holder['state'], batches[holder['i'] % 2])
    holder['i'] += 1
    jax.block_until_ready((holder['state'], metrics))
    return metrics

  t0 = time.perf_counter()
  step()
  return step, time.perf_counter() - t0, parts, mesh


def bench(name: str, optimizer: str, kernel: str = '') -> dict:
  config = load(name, optimizer, kernel)
  step, compile_s, parts, mesh = jax_step(config)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    metrics = step()
  step_s = (time.perf_counter() - t0) / _STEPS.value
  return _row(config, name, 'vesper_jax', parts.grad_accum_steps, step_s, compile_s, float(metrics['loss']),
              parts, mesh)


def _row(config, name, framework, accum, step_s, first_step_s, loss, parts=None, mesh=None) -> dict:
  counts = abstract_param_counts(ModelConfig(**config.model))
  B, T = config.train.batch_size, config.data.seq_len
  on_device = framework == 'vesper_jax' or platforms.hardware() == 'gpu'  # the anchor follows JAX to a GPU
  tokens_per_s = B * T / step_s
  mfu = None
  if parts is not None:
    peak = scaling.peak_flops(jax.devices()[0].device_kind)
    if peak:
      flops_per_s = scaling.flops_per_token(parts.model.config, counts['non_embedding'], T) * tokens_per_s
      mfu = scaling.mfu(flops_per_s, peak, mesh.size)
  return {'config': name, 'framework': framework, 'optimizer': config.opt.name,
          'kernel': config.opt.kernel if config.opt.name == 'velvet' else '-',
          'activation': config.model.activation,
          'attention': _attention(config) if framework == 'vesper_jax' else 'sdpa',
          'device': jax.devices()[0].device_kind if on_device else 'cpu',
          'devices': mesh.size if mesh is not None else 1, 'dtype': config.model.dtype,
          'batch_size': B, 'seq_len': T, 'grad_accum_steps': accum,
          'params': counts['total'], 'step_ms': 1e3 * step_s,
          'tokens_per_s': tokens_per_s, 'mfu': mfu, 'first_step_s': first_step_s, 'loss': loss}


def _micro(row) -> str:
  A = row.get('grad_accum_steps', 1)
  return f' ({A}×{row["batch_size"] // A})' if A > 1 else ''


def _attention(config) -> str:
  """The attention the JAX step really runs (model.attention_implementation resolves 'auto')."""
  c = ModelConfig(**config.model).replace(platform=platforms.resolve())  # as train.build decides it
  if c.attention_impl is None and c.runs_on == 'cpu':
    qkv = jax.ShapeDtypeStruct((1, 1, c.num_heads, c.head_dim), jnp.dtype(c.dtype))
    return 'cpu kernel' if attention_cpu_ffi.supports(qkv, qkv, qkv) else 'cpu (jax)'
  return attention_implementation(c, unmasked=True) or 'xla'


# ----------------------------------------------------------------------------------- the PyTorch anchor

def torch_skip_reason(config) -> str | None:
  """Why this config has no PyTorch counterpart here (None when it has one)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return 'torch is not installed (pip install torch beside the project)'
  m = config.model
  if m.lora_targets:
    return 'FlyLoRA adapters have no PyTorch counterpart here'
  if config.opt.name != 'adamw':
    return f'opt.name={config.opt.name}: the PyTorch anchor uses torch.optim.AdamW'
  on_gpu = platforms.hardware() == 'gpu'
  if on_gpu and not torch.cuda.is_available():
    return 'JAX runs on a GPU but this torch has no CUDA'
  if m.dtype not in ('float32', 'bfloat16') or (m.dtype == 'bfloat16' and not on_gpu):
    return f'model.dtype={m.dtype}: the PyTorch anchor is float32 (CPU, GPU) or bfloat16 autocast (GPU)'
  return None


def torch_step(config, compiled: bool, accum: int):
  """(step, first_step_s): the model and step of `config` in PyTorch, on random tokens.

  The same computation as the JAX step: embedding, pre-norm blocks with split-half RoPE, causal
  (grouped-query) attention and the gated FFN (ERA, SiLU or tanh-GELU), final norm, head over the padded
  vocabulary, float32 cross-entropy over the real one; then global-norm clipping and AdamW with weight
  decay on matrices only (the embeddings and head too iff opt.decay_embeddings). Not done here: the
  learning-rate schedule (a scalar), the non-finite check and the entropy metric the JAX step also
  computes. With `accum` = A, the gradient is accumulated over A micro-batches of B / A sequences (each
  loss scaled by 1 / A), as the JAX step does with train.grad_accum_steps = A.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  m, o = ModelConfig(**config.model), config.opt
  A = accum
  B, T = config.train.batch_size // A, config.data.seq_len  # B: the micro-batch
  D, N, K, H, V = m.d_model, m.num_heads, m.kv_heads, m.head_dim, m.vocab_size
  torch.manual_seed(0)
  device = 'cuda' if platforms.hardware() == 'gpu' else 'cpu'
  # nanoGPT's mixed precision: float32 parameters, the forward under bfloat16 autocast.
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=m.dtype == 'bfloat16')

  def norm():
    if m.norm == 'rmsnorm':
      return nn.RMSNorm(D, eps=m.norm_eps)
    return nn.LayerNorm(D, eps=m.norm_eps, bias=m.use_bias)

  half = H // 2
  angles_TH = (torch.arange(T, dtype=torch.float32)[:, None]
               * (1.0 / m.rope_theta ** (torch.arange(half, dtype=torch.float32) / half)))
  cos_TH, sin_TH = angles_TH.cos().to(device), angles_TH.sin().to(device)

  def rope(x_BNTH):
    x1, x2 = x_BNTH[..., :half], x_BNTH[..., half:]
    # Back to the input's dtype: under bfloat16 autocast the float32 tables would promote q and k, and
    # SDPA needs q, k and v in one dtype.
    return torch.cat([x1 * cos_TH - x2 * sin_TH, x2 * cos_TH + x1 * sin_TH], dim=-1).to(x_BNTH.dtype)

  def activation(x):
    if m.activation == 'silu':
      return F.silu(x)
    if m.activation == 'gelu':
      return F.gelu(x, approximate='tanh')  # jax.nn.gelu's default
    z = x / m.era_temperature
    g = torch.sigmoid(z)
    y = x * g
    if m.era_entropy_weight == 0.0:
      return y
    h = (F.softplus(z) - z * g).mean(dim=-1, keepdim=True) / math.log(2.0)
    if m.era_detach_entropy:
      h = h.detach()
    return y * (1.0 + m.era_entropy_weight * h)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attention_norm, self.ffn_norm = norm(), norm()
      self.q, self.o = nn.Linear(D, N * H, bias=m.use_bias), nn.Linear(N * H, D, bias=m.use_bias)
      self.k, self.v = nn.Linear(D, K * H, bias=m.use_bias), nn.Linear(D, K * H, bias=m.use_bias)
      self.gate, self.up = nn.Linear(D, m.d_ff, bias=m.use_bias), nn.Linear(D, m.d_ff, bias=m.use_bias)
      self.down = nn.Linear(m.d_ff, D, bias=m.use_bias)

    def forward(self, x):
      h = self.attention_norm(x)
      q = rope(self.q(h).view(B, T, N, H).transpose(1, 2))
      k = rope(self.k(h).view(B, T, K, H).transpose(1, 2))
      v = self.v(h).view(B, T, K, H).transpose(1, 2)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != N)
      x = x + self.o(a.transpose(1, 2).reshape(B, T, N * H))
      h = self.ffn_norm(x)
      return x + self.down(activation(self.gate(h)) * self.up(h))

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embeddings = nn.Embedding(m.padded_vocab_size, D)
      nn.init.normal_(self.embeddings.weight, std=0.02)  # as VesperLM (N(0, 1) would start far off)
      self.layers = nn.ModuleList(Block() for _ in range(m.num_layers))
      self.final_norm = norm()
      self.lm_head = None if m.tie_embeddings else nn.Linear(D, m.padded_vocab_size, bias=m.use_bias)

    def forward(self, inputs_BT, targets_BT):
      x = self.embeddings(inputs_BT)
      for layer in self.layers:
        x = layer(x)
      x = self.final_norm(x)
      logits = x @ self.embeddings.weight.T if self.lm_head is None else self.lm_head(x)
      return F.cross_entropy(logits[..., :V].reshape(B * T, V), targets_BT.reshape(B * T))

  model = LM().to(device)
  # Same model, same parameters: a count that differs means the two have drifted apart.
  n_params = sum(p.numel() for p in model.parameters())
  if n_params != abstract_param_counts(m)['total']:
    raise RuntimeError(f'PyTorch model has {n_params:,} parameters, VesperLM '
                       f"{abstract_param_counts(m)['total']:,}: the anchor no longer matches the model")
  embedding_names = ('embeddings.', 'lm_head.')
  decayed = [p for n, p in model.named_parameters()
             if p.ndim >= 2 and (o.decay_embeddings or not n.startswith(embedding_names))]
  others = [p for n, p in model.named_parameters()
            if not (p.ndim >= 2 and (o.decay_embeddings or not n.startswith(embedding_names)))]
  optimizer = torch.optim.AdamW([{'params': decayed, 'weight_decay': o.weight_decay},
                                 {'params': others, 'weight_decay': 0.0}],
                                lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                fused=device == 'cuda')

  def train_step(inputs_ABT, targets_ABT):
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for inputs_BT, targets_BT in zip(inputs_ABT, targets_ABT):
      with autocast:
        loss = model(inputs_BT, targets_BT) / A
      loss.backward()
      total = total + loss.detach()
    loss = total
    if o.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    optimizer.step()
    return loss

  if compiled:
    train_step = torch.compile(train_step)
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, V, (A, B, T + 1))).long()
  inputs_ABT = tokens[..., :-1].contiguous().to(device)
  targets_ABT = tokens[..., 1:].contiguous().to(device)

  def step():
    return train_step(inputs_ABT, targets_ABT).item()

  t0 = time.perf_counter()
  step()
  first_step_s = time.perf_counter() - t0
  step()  # torch.compile may compile a second graph on the second call (the optimizer's state exists)
  return step, first_step_s


def bench_with_torch(name: str, optimizer: str, kernel: str = '') -> list[dict]:
  """The JAX step and its PyTorch counterparts, in alternating blocks; medians of per-step times."""
  config = load(name, optimizer, kernel)
  jstep, jax_first_s, parts, mesh = jax_step(config)
  reason = torch_skip_reason(config)
  accum = _TORCH_ACCUM.value if _TORCH_ACCUM.value >= 1 else parts.grad_accum_steps
  if reason is not None:
    print(f'{name}: PyTorch anchor skipped: {reason}', flush=True)
    runners = {'vesper_jax': (jstep, jax_first_s)}
  else:
    import torch  # pylint: disable=import-outside-toplevel
    print(f'{name}: PyTorch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)
    if config.train.batch_size % accum:
      raise ValueError(f'--torch_grad_accum_steps={accum} does not divide the batch of '
                       f'{config.train.batch_size}')
    runners = {'vesper_jax': (jstep, jax_first_s), 'torch eager': torch_step(config, False, accum),
               'torch.compile': torch_step(config, True, accum)}
  times = {k: [] for k in runners}
  losses = {}
  while len(times['vesper_jax']) < _STEPS.value:
    block = min(_BLOCK.value, _STEPS.value - len(times['vesper_jax']))
    for framework, (step, _) in runners.items():
      step()  # untimed: absorbs the previous framework's spinning threads (see the module docstring)
      for _ in range(block):
        t0 = time.perf_counter()
        loss = step()
        times[framework].append(time.perf_counter() - t0)
      losses[framework] = float(loss['loss']) if framework == 'vesper_jax' else loss
  rows = []
  for framework, (_, first_s) in runners.items():
    row = _row(config, name, framework, parts.grad_accum_steps if framework == 'vesper_jax' else accum,
               statistics.median(times[framework]), first_s, losses[framework],
               *((parts, mesh) if framework == 'vesper_jax' else ()))
    row['step_ms_min'] = 1e3 * min(times[framework])
    rows.append(row)
  return rows


def main(argv):
  del argv
  if _CACHE.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  out = pathlib.Path(_OUT.value or (pathlib.Path(os.environ['OUT']) / 'bench_train.json' if 'OUT' in os.environ
                                    else REPO / 'experiments' / 'results' / 'bench_train.json'))
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  for n in _CONFIGS.value:
    for o in _OPTIMIZERS.value:
      for kernel in (_VELVET_KERNELS.value or ['']) if o == 'velvet' else ['']:
        try:
          rows += bench_with_torch(n, o, kernel) if _TORCH.value else [bench(n, o, kernel)]
        except Exception as e:  # pylint: disable=broad-except
          # e.g. opt.kernel='triton' without jax-triton, or a kernel that fails to build on this GPU:
          # one line, and the other rows still run.
          print(f'{n} {o} {kernel}: skipped: {type(e).__name__}: {str(e).strip()[:300]}', flush=True)
        # Written after every row: a run cut short by a time limit keeps what it measured.
        out.write_text(json.dumps(rows, indent=2))
  print('\n| config | framework | optimizer | kernel | activation | attention | device | dtype | batch×seq '
        '| params | step ms | tokens/s | first step s | MFU |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
    print(f"| {r['config']} | {r['framework']} | {r['optimizer']} | {r['kernel']} | {r['activation']} | "
          f"{r['attention']} | "
          f"{r['devices']}× {r['device']} | {r['dtype']} | {r['batch_size']}×{r['seq_len']}{_micro(r)} | "
          f"{r['params']:,} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['first_step_s']:.1f} | {mfu} |")
  # vesper_jax against each anchor of the same config (measured in this run).
  for r in rows:
    if r['framework'] == 'vesper_jax':
      continue
    for j in rows:  # every JAX row of the config (AdamW and each Velvet kernel) against the AdamW anchor
      if j['framework'] == 'vesper_jax' and j['config'] == r['config']:
        print(f"{r['config']}: vesper_jax {j['optimizer']}/{j['kernel']} / {r['framework']} = "
              f"{j['tokens_per_s'] / r['tokens_per_s']:.3f}×")
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
