"""Training: `python -m vesper_jax.train --config=configs/tiny.py --workdir=runs/tiny` (SPEC §7).

Data flows one way: config → token cache → batches → `train_step` → metrics / checkpoints.
`train_and_evaluate(config, workdir)` is the library entry point (notebooks and experiments call it);
`main` only parses flags.
"""

import dataclasses
import functools
import json
import logging as std_logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vesper_jax import checkpoint as ckpt_lib
from vesper_jax import config as base_config
from vesper_jax import data as data_lib
from vesper_jax import flylora
from vesper_jax import losses
from vesper_jax import metrics_writer
from vesper_jax import optim
from vesper_jax import scaling
from vesper_jax import sharding
from vesper_jax import sources as sources_lib
from vesper_jax import velvet
from vesper_jax.model import ModelConfig, VesperLM, abstract_param_counts, param_counts

PyTree = Any


class NonFiniteError(RuntimeError):
  """Too many consecutive updates had a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 []: optimizer steps taken
  params: PyTree                # trainable and frozen parameters (the `params` collection)
  opt_state: PyTree
  model_state: PyTree           # other variable collections the model carries ({} for a plain model)
  nonfinite_streak: jax.Array   # int32 []: consecutive skipped updates
  nonfinite_total: jax.Array    # int32 []: skipped updates over the whole run


# ----------------------------------------------------------------------------------------- the step

def _loss(params: PyTree, model_state: PyTree, tokens_BT1: jax.Array, model: VesperLM):
  """Mean next-token cross-entropy; aux: the predictive entropy and FlyLoRA's rank counts ({} if none)."""
  variables, inputs_BT, targets_BT = {'params': params, **model_state}, tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  # FlyLoRA layers sow how often each rank was selected, for the expert-bias rule (flylora.py).
  if jax.default_backend() == 'cpu':
    # On CPU the loss applies the head itself, in chunks, and never holds the [B, T, V] logits
    # (losses.py says why). Elsewhere this is unmeasured, so the logits path stays.
    x_BTD, sown = model.apply(variables, inputs_BT, return_hidden=True, mutable=[flylora.COUNTS])
    loss, entropy = losses.head_cross_entropy_and_entropy(x_BTD, *model.head_weights(params), targets_BT)
  else:
    logits_BTV, sown = model.apply(variables, inputs_BT, mutable=[flylora.COUNTS])
    loss, entropy = losses.cross_entropy_and_entropy(logits_BTV, targets_BT)
  return loss, (entropy, sown.get(flylora.COUNTS, {}))


def _loss_and_grads(params, model_state, tokens_BT1, model, grad_accum_steps, trainable=None):
  """Loss, entropy, gradients and FlyLoRA rank counts, summed over micro-batches with a scan.

  `trainable` (fine-tuning): frozen leaves sit behind stop_gradient, so their gradients (zeros) cost
  no backward matmuls.
  """
  def loss_fn(p, *args):
    return _loss(p if trainable is None else flylora.stop_frozen_gradients(p, trainable), *args)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, (entropy, counts)), grads = grad_fn(params, model_state, tokens_BT1, model)
    return loss, entropy, grads, counts
  B = tokens_BT1.shape[0]
  # Row i of micro-batch a is row i·A + a: each device keeps its own rows, so splitting the batch into
  # micro-batches moves no data between devices.
  micro_ABT1 = tokens_BT1.reshape(B // grad_accum_steps, grad_accum_steps, -1).swapaxes(0, 1)

  def body(carry, micro_BT1):
    loss_sum, entropy_sum, grad_sum = carry
    (loss, (entropy, counts)), grads = grad_fn(params, model_state, micro_BT1, model)
    return (loss_sum + loss, entropy_sum + entropy, jax.tree.map(jnp.add, grad_sum, grads)), counts

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, entropy, grads), counts_A = jax.lax.scan(body, (0.0, 0.0, zeros), micro_ABT1)
  scale = 1.0 / grad_accum_steps
  counts = jax.tree.map(lambda c: jnp.sum(c, axis=0), counts_A)  # rank counts over the whole step
  return loss * scale, entropy * scale, jax.tree.map(lambda g: g * scale, grads), counts


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: VesperLM,
               tx: optax.GradientTransformationExtraArgs, schedule: optax.Schedule,
               grad_accum_steps: int, trainable: PyTree | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Pure: jitted once with explicit shardings and the state donated.

  A step whose loss or gradient norm is not finite changes nothing but the skip counters.
  `trainable` (a tree of bools, fine-tuning with adapters) marks what the optimizer may change.
  """
  loss, entropy, grads, counts = _loss_and_grads(state.params, state.model_state, batch['tokens'],
                                                 model, grad_accum_steps, trainable)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    # Velvet reads the loss and the entropy normalised to [0, 1] by ln V; AdamW ignores both.
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss,
                                   entropy=entropy / math.log(model.config.vocab_size))
    params = optax.apply_updates(params, updates)
    # FlyLoRA load balancing: the expert biases move by their rule, once per step (no-op without FlyLoRA).
    return flylora.update_expert_biases(params, counts, model.config.lora_bias_rate), opt_state

  # A branch rather than jnp.where(ok, new, old) over every leaf: the select read both copies of the
  # parameters and the optimizer state and wrote a third on every step, to serve the rare skipped one.
  params, opt_state = jax.lax.cond(ok, update, lambda params, opt_state: (params, opt_state),
                                   state.params, state.opt_state)
  streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak,
      nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
  # The optimizer's own step count skips the skipped updates (their state is kept): this is the rate
  # it applied, not schedule(state.step).
  applied_lr = schedule(state.step - state.nonfinite_total)
  metrics = {'loss': loss, 'entropy': entropy, 'grad_norm': grad_norm,
             'learning_rate': applied_lr, 'skipped': (~ok).astype(jnp.int32),
             'nonfinite_streak': streak}
  # Velvet's current s_E, s_P and β1 (empty for AdamW), so runs can be read against them.
  metrics.update(velvet.velvet_scalings(new_state.opt_state))
  return new_state, metrics


def eval_step(params: PyTree, model_state: PyTree, batch: dict[str, jax.Array], *,
              model: VesperLM) -> jax.Array:
  loss, _ = _loss(params, model_state, batch['tokens'], model)
  return loss


# ----------------------------------------------------------------------------------------- checks

def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses, before any data work or compilation, a config the run cannot use; names the key."""
  _check_known_keys(config, base_config.get_config(), prefix='')
  model_cfg = ModelConfig(**config.model)  # its __post_init__ checks the model section
  flylora.check_init_from(config)
  t, d = config.train, config.data
  if d.seq_len > model_cfg.max_seq_len:
    raise ValueError(f'data.seq_len={d.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}')
  if d.on_error not in ('skip', 'fail'):
    raise ValueError(f"data.on_error={d.on_error!r}: expected 'skip' or 'fail'")
  for key in ('train.batch_size', 'train.grad_accum_steps', 'train.eval_every', 'train.eval_batches',
              'checkpoint.every_steps', 'checkpoint.keep', 'logging.every_steps'):
    section, name = key.split('.')
    if config[section][name] < 1:  # cadences and counts; 0 would divide by zero mid-run
      raise ValueError(f'{key}={config[section][name]} must be at least 1')
  if t.batch_size % t.grad_accum_steps:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'train.grad_accum_steps={t.grad_accum_steps}')
  if t.num_steps < 1 and not t.auto_scale:
    raise ValueError(f'train.num_steps={t.num_steps} must be at least 1')


def _check_known_keys(config, reference, prefix):
  for key, value in config.items():
    name = f'{prefix}{key}'
    if key not in reference:
      raise ValueError(f'unknown config key {name!r} (not in vesper_jax/config.py)')
    if isinstance(value, ml_collections.ConfigDict):
      _check_known_keys(value, reference[key], prefix=name + '.')


def _check_batch_layout(config: ml_collections.ConfigDict, mesh) -> None:
  t = config.train
  micro = t.batch_size // t.grad_accum_steps
  if micro % mesh.size:
    raise ValueError(f'the micro-batch of {micro} sequences (train.batch_size / train.grad_accum_steps)'
                     f' does not split over {mesh.size} devices')
  if t.batch_size % jax.process_count():
    raise ValueError(f'train.batch_size={t.batch_size} does not split over {jax.process_count()} '
                     'processes')


# ----------------------------------------------------------------------------------------- setup

def _compilation_cache(config: ml_collections.ConfigDict) -> None:
  directory = config.logging.compilation_cache_dir or os.path.join(
      sources_lib.default_cache_dir(config.data.cache_dir), 'jax_compilation_cache')
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _init_state(config, model: VesperLM, tx, mesh, seq_len: int):
  """Sharded init: shapes first (no memory), shardings from the rules, then a jitted init."""

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    params = variables.pop('params')
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=dict(variables), nonfinite_streak=jnp.array(0, jnp.int32),
                      nonfinite_total=jnp.array(0, jnp.int32))

  rng = jax.random.key(config.train.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(abstract, mesh)
  return jax.jit(init, out_shardings=shardings), abstract, shardings


def flops_per_token(model_cfg: ModelConfig, counts: dict[str, int], seq_len: int) -> float:
  """Training FLOPs per token: 6·(matmul params) + attention scores/values (PaLM appendix B)."""
  matmul_params = counts['non_embedding'] + model_cfg.padded_vocab_size * model_cfg.d_model
  return 6.0 * matmul_params + 12.0 * model_cfg.num_layers * model_cfg.d_model * seq_len


# Dense bf16 peak FLOP/s per device by device_kind substring; MFU is reported only where known.
_PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'TPU v5e': 197e12,
               'TPU v4': 275e12}


def peak_flops(device) -> float | None:
  for kind, flops in _PEAK_FLOPS.items():
    if kind in device.device_kind:
      return flops
  return None


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves at the next step boundary and returns (cluster preemption)."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass(frozen=True)
class Parts:
  """The compiled pieces of a run, shared by `train_and_evaluate` and the benchmarks."""
  model: VesperLM
  tx: optax.GradientTransformationExtraArgs
  trainable: PyTree | None        # tree of bools when adapters freeze the base, else None
  init_fn: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  step_fn: Callable               # (state, batch) -> (state, metrics); jitted, state donated
  eval_fn: Callable               # (params, model_state, batch) -> loss; jitted


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Parts:
  """Model, optimizer, sharded init and the jitted steps for `config` on `mesh` (nothing runs yet)."""
  t = config.train
  model_cfg = ModelConfig(**config.model)
  model = VesperLM(model_cfg)
  seq_len = config.data.seq_len
  params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
  # With adapters the base is frozen: the optimizer keeps no state for it and never updates it.
  trainable = (flylora.trainable_mask(params_shape['params'], model_cfg) if flylora.targets(model_cfg)
               else None)
  tx = optim.make_optimizer(config.opt, t.num_steps, params_shape['params'], trainable,
                            vocab_size=model_cfg.vocab_size)
  init_fn, abstract_state, state_shardings = _init_state(config, model, tx, mesh, seq_len)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx,
                        schedule=optim.learning_rate_schedule(config.opt, t.num_steps),
                        grad_accum_steps=t.grad_accum_steps, trainable=trainable),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(state_shardings.params, state_shardings.model_state, batch_sharding))
  return Parts(model, tx, trainable, init_fn, abstract_state, state_shardings, batch_sharding, step_fn,
               eval_fn)


# ----------------------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the model `config` describes, writing everything into `workdir`.

  Returns:
    A dict with the final step, last training loss, last eval loss/perplexity, skipped-update count,
    measured tokens/s, and whether the run stopped early on a signal.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  t, lead = config.train, jax.process_index() == 0
  _compilation_cache(config)

  cache = data_lib.build_or_load_cache(config.data, config.model.vocab_size,
                                       progress=lead and config.logging.progress_bar)
  if t.auto_scale:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.train.num_steps = auto_scale_steps(config, len(cache.train))
    t = config.train
  _refuse_changed_model(workdir, config)
  ckpt_lib.write_workdir_metadata(workdir, config, cache.directory / 'tokenizer.json')

  mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp)
  _check_batch_layout(config, mesh)
  parts = build(config, mesh)
  model_cfg, trainable, seq_len = parts.model.config, parts.trainable, config.data.seq_len
  init_fn, abstract_state, state_shardings = parts.init_fn, parts.abstract_state, parts.state_shardings
  counts = param_counts(abstract_state.params)
  logging.info('Model: %s parameters (%s non-embedding) on mesh %s over %d devices (%s)',
               f"{counts['total']:,}", f"{counts['non_embedding']:,}", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind)
  if trainable is not None:
    flylora.param_report(abstract_state.params, model_cfg, trainable)
    logging.info('Optimizer state: %s elements', f'{optim.count_state(abstract_state.opt_state):,}')

  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
  start = checkpointer.latest_step()
  if start is None:
    state, start = init_fn(jax.random.key(t.seed)), 0
    if t.init_from:  # fine-tuning: the base's weights replace the random ones (adapters stay as built)
      params = flylora.graft_base(state.params, flylora.load_base(t.init_from, model_cfg))
      state = state.replace(params=jax.device_put(params, state_shardings.params))
  else:
    state = checkpointer.restore(start, jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_shardings))
    logging.info('Resumed from the checkpoint of step %d in %s', start, workdir)

  batch_sharding, step_fn, eval_fn = parts.batch_sharding, parts.step_fn, parts.eval_fn

  def place(local: np.ndarray) -> dict[str, jax.Array]:
    return sharding.global_batch({'tokens': local}, batch_sharding)

  def batch_for(step: int) -> dict[str, jax.Array]:
    return place(data_lib.get_batch(cache.train, seed=t.seed, step=step, batch_size=t.batch_size,
                                    seq_len=seq_len, process_index=jax.process_index(),
                                    process_count=jax.process_count()))

  def evaluate(state) -> dict[str, float]:
    # The same validation windows at every evaluation and across resumes, micro-batch sized.
    eval_size = t.batch_size // t.grad_accum_steps
    total = 0.0
    for i in range(t.eval_batches):
      batch = place(data_lib.eval_batch(cache.val, index=i, batch_size=eval_size, seq_len=seq_len,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()))
      total += float(eval_fn(state.params, state.model_state, batch))
    loss = total / t.eval_batches
    return {'eval_loss': loss, 'eval_perplexity': float(math.exp(min(loss, 50.0)))}

  writer = metrics_writer.MetricsWriter(workdir, tensorboard=config.logging.tensorboard, enabled=lead)
  tokens_per_step = t.batch_size * seq_len
  flops = flops_per_token(model_cfg, counts, seq_len) * tokens_per_step
  peak = peak_flops(jax.devices()[0])
  progress = metrics_writer.Progress(t.num_steps, start, enabled=lead and config.logging.progress_bar)
  prefetch = data_lib.Prefetcher(batch_for, start_step=start)
  summary: dict[str, Any] = {'stopped_by_signal': False}
  last_eval: dict[str, float] = {}
  try:
    if start == 0:  # the starting point of the validation curve
      last_eval = evaluate(state)
      writer.write(0, last_eval)
      progress.note(f"step 0: eval loss {last_eval['eval_loss']:.4f}")
    with _StopFlag() as stop:
      pending = None  # the previous step's metrics, read while the current step runs
      window_start, window_steps = time.perf_counter(), 0
      for step in range(start, t.num_steps):
        state, metrics = step_fn(state, next(prefetch))
        window_steps += 1
        if pending is not None:
          _check_nonfinite(pending, t.max_nonfinite_steps)
        pending = metrics
        done = step + 1
        if done % config.logging.every_steps == 0 or done == t.num_steps:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - window_start
          values['tokens_per_s'] = window_steps * tokens_per_step / elapsed
          if peak:
            values['mfu'] = window_steps * flops / elapsed / (peak * mesh.size)
          writer.write(done, values)
          progress.update(done, values)
          window_start, window_steps = time.perf_counter(), 0
          summary.update(loss=values['loss'], tokens_per_s=values['tokens_per_s'])
        if done % t.eval_every == 0 or done == t.num_steps:
          last_eval = evaluate(state)
          writer.write(done, last_eval)
          progress.note(f"step {done}: eval loss {last_eval['eval_loss']:.4f}")
        # Read the flag once: a signal on a checkpoint step must not save that step twice (orbax refuses).
        stopping = stop.signal is not None
        if stopping:
          logging.warning('Signal %d: saving step %d and stopping', stop.signal, done)
        if done % config.checkpoint.every_steps == 0 or done == t.num_steps or stopping:
          checkpointer.save(done, state)
        if stopping:
          summary['stopped_by_signal'] = True
          break
      if pending is not None:
        _check_nonfinite(pending, t.max_nonfinite_steps)
  finally:
    prefetch.close()
    progress.close()
    checkpointer.close()
    writer.close()
  summary.update(step=int(state.step), skipped_updates=int(state.nonfinite_total), **last_eval)
  if lead and not summary['stopped_by_signal'] and t.sample_prompt:
    summary['sample'] = _sample(model_cfg, state.params, cache.tokenizer, t)
  return summary


def auto_scale_steps(config: ml_collections.ConfigDict, cached_tokens: int) -> int:
  """train.auto_scale: steps for Chinchilla's D = 20·N tokens, capped at one pass over the cache."""
  n_params = abstract_param_counts(ModelConfig(**config.model))['total']
  tokens = min(scaling.optimal_tokens(n_params), cached_tokens)
  steps = scaling.steps_for_tokens(tokens, config.train.batch_size, config.data.seq_len)
  logging.info('train.auto_scale: %d steps = %s tokens (optimal %s for %s parameters; %s cached)',
               steps, f'{tokens:,.0f}', f'{scaling.optimal_tokens(n_params):,.0f}', f'{n_params:,}',
               f'{cached_tokens:,}')
  return steps


def _check_nonfinite(metrics: dict[str, jax.Array], limit: int) -> None:
  streak = int(metrics['nonfinite_streak'])
  if streak:
    logging.warning('Non-finite loss or gradient: update skipped (%d in a row)', streak)
  if streak >= limit:
    raise NonFiniteError(f'{streak} consecutive updates had a non-finite loss or gradient '
                         f'(train.max_nonfinite_steps={limit}); stopping. The last checkpoint holds '
                         'the last good state.')


def _refuse_changed_model(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Resuming a workdir with a different model would load mismatched weights: refuse it by key."""
  if not (workdir / ckpt_lib.CONFIG_FILE).is_file():
    return
  old = ckpt_lib.read_config(workdir).model
  changed = [k for k in config.model if k in old and old[k] != config.model[k]]
  if changed:
    raise ValueError(f'{workdir} was trained with a different model ({", ".join(f"model.{k}" for k in changed)}'
                     f' changed); use a new --workdir')


def _sample(model_cfg: ModelConfig, params: PyTree, tokenizer, t: ml_collections.ConfigDict) -> str:
  """A short text sample from the trained model, logged at the end of the run."""
  from vesper_jax import sampling  # deferred: only the end of a run needs it
  continuation, = sampling.generate_text(params, model_cfg, tokenizer, [t.sample_prompt],
                                        max_new_tokens=t.sample_tokens, seed=t.seed)
  text = t.sample_prompt + continuation
  logging.info('Sample: %r', text)
  return text


# ----------------------------------------------------------------------------------------- CLI

def _maybe_initialize_distributed(config: ml_collections.ConfigDict, flag_values) -> None:
  """jax.distributed.initialize() when asked for, or when a cluster launcher (SLURM) set the stage."""
  explicit = flag_values.coordinator_address is not None
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if not (config.train.distributed or explicit or slurm):
    return
  jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                             num_processes=flag_values.num_processes,
                             process_id=flag_values.process_id)
  logging.info('Process %d of %d; %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (a line per file per save), keeping its warnings and errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  config = flag_values.config
  _maybe_initialize_distributed(config, flag_values)
  workdir = flag_values.workdir or os.path.join('runs', pathlib.Path(flag_values['config'].config_filename).stem)
  if jax.process_index() == 0:
    print(f'vesper_jax.train: {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), '
          f'workdir {workdir}', flush=True)
  try:
    summary = train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError) as e:  # bad config or data: say which, without a traceback
    if logging.get_verbosity() >= logging.DEBUG:  # --verbosity=1 shows where it came from
      raise
    sys.exit(f'vesper_jax.train: error: {e}')
  if jax.process_index() == 0:
    if 'sample' in summary:
      print(f"\n--- sample ---\n{summary.pop('sample')}\n--------------", flush=True)
    print(json.dumps(summary, indent=2), flush=True)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs). Default: runs/<config name>.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
  flags.mark_flags_as_required(['config'])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with an unknown `--config.a.b` override reported by name instead of a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    missing = str(e).strip('"\'')
    culprits = [a for a in argv if a.startswith('--config.') and f'.{missing}' in a.split('=')[0]]
    sys.exit(f"vesper_jax.train: error: unknown config key {missing!r} in {' '.join(culprits) or argv}"
             ' (see vesper_jax/config.py for the keys)')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
