"""Training: `python -m vesper_jax.train --config=configs/tiny.py --workdir=runs/tiny` (SPEC §7).

Data flows one way: config → token cache → batches → `train_step` → metrics / checkpoints.
`train_and_evaluate(config, workdir)` is the library entry point (notebooks and experiments call it);
it runs five named stages: validate → data → init or restore → loop → finish (summary and sample).
`main` only parses flags.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import threading
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from ml_collections import config_flags

from vesper_jax import checkpoint as ckpt_lib
from vesper_jax import cli
from vesper_jax import config as base_config
from vesper_jax import data as data_lib
from vesper_jax import evaluate as eval_lib
from vesper_jax import finetune
from vesper_jax import flylora
from vesper_jax import hub
from vesper_jax import losses
from vesper_jax import metacog
from vesper_jax import metrics_writer
from vesper_jax import optim
from vesper_jax import platforms
from vesper_jax import scaling
from vesper_jax import sharding
from vesper_jax import sources as sources_lib
from vesper_jax import velvet
from vesper_jax.model import ModelConfig, VesperLM, abstract_param_counts, param_counts, weight_changes
from vesper_jax.pytree import PyTree


class NonFiniteError(ValueError):
  """Too many consecutive updates had a non-finite loss or gradient (the CLI reports it in one line)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 []: optimizer steps taken
  params: PyTree                # trainable and frozen parameters (the `params` collection); on the
                                # in-place Velvet path, velvet.FlatLayout buffers ({name: [n]})
  opt_state: PyTree
  model_state: PyTree           # other variable collections the model carries ({} for a plain model)
  nonfinite_streak: jax.Array   # int32 []: consecutive skipped updates
  nonfinite_total: jax.Array    # int32 []: skipped updates over the whole run


# ----------------------------------------------------------------------------------------- the step

def _loss(params: PyTree, model_state: PyTree, tokens_BT1: jax.Array, model: VesperLM,
          metacog_weight: float = 0.0):
  """The objective: mean next-token cross-entropy (+ λ_meta times the metacognition head's loss).

  aux: (the cross-entropy alone, the predictive entropy, FlyLoRA's rank counts ({} if none), the
  head's loss terms ({} without the head)).
  """
  variables, inputs_BT, targets_BT = {'params': params, **model_state}, tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  c = model.config
  # The head's targets (nll, correct) and, with model.metacog_inputs 'stats'/'both', its inputs (the
  # predicted distribution's statistics) come from the loss's own softmax: nothing is computed twice.
  per_token = ('stats' if metacog.uses_stats(c) else True) if c.metacog else False
  # FlyLoRA layers sow how often each rank was selected, for the expert-bias rule (flylora.py).
  if c.runs_on == 'cpu':
    # On CPU the loss applies the head itself, in chunks, and never holds the [B, T, V] logits
    # (losses.py says why). Elsewhere this is unmeasured, so the logits path stays.
    x_BTD, sown = model.apply(variables, inputs_BT, return_hidden=True, mutable=[flylora.COUNTS])
    loss, entropy, *stats = losses.head_cross_entropy_and_entropy(
        x_BTD, *model.head_weights(params), targets_BT, per_token=per_token, kernel=True)
  else:
    (logits_BTV, x_BTD), sown = model.apply(variables, inputs_BT, with_hidden=True,
                                            mutable=[flylora.COUNTS])
    loss, entropy = losses.cross_entropy_and_entropy(logits_BTV, targets_BT)
    stats = [losses.token_stats(logits_BTV, targets_BT)] if c.metacog else []
  counts = sown.get(flylora.COUNTS, {})
  if not c.metacog:
    return loss, (loss, entropy, counts, {})
  # --- metacognition (SPEC §9): the head on the same hidden states and softmax, and its loss.
  stats = stats[0]
  meta = metacog.apply(c, params, x_BTD, stats)
  meta_loss, terms = metacog.head_loss(meta, stats['correct'], stats['nll'])
  terms = {'meta_loss': meta_loss, **terms}
  return loss + metacog_weight * meta_loss, (loss, entropy, counts, terms)


def _loss_and_grads(params, model_state, tokens_BT1, model, grad_accum_steps, trainable=None, layout=None,
                    metacog_weight=0.0):
  """Loss, entropy, gradients, FlyLoRA rank counts and the metacognition head's loss terms, summed over
  micro-batches with a scan.

  `trainable` (fine-tuning): frozen leaves sit behind stop_gradient, so their gradients (zeros) cost
  no backward matmuls. `layout` (the in-place Velvet path): `params` are its flat buffers, the model runs
  on their slices, and the gradients come back as flat buffers through the same slices.
  """
  def loss_fn(p, *args):
    p = p if layout is None else layout.unflatten(p)
    return _loss(p if trainable is None else flylora.stop_frozen_gradients(p, trainable), *args,
                 metacog_weight=metacog_weight)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (_, (loss, entropy, counts, terms)), grads = grad_fn(params, model_state, tokens_BT1, model)
    return loss, entropy, grads, counts, terms
  B = tokens_BT1.shape[0]
  # Row i of micro-batch a is row i·A + a: each device keeps its own rows, so splitting the batch into
  # micro-batches moves no data between devices.
  micro_ABT1 = tokens_BT1.reshape(B // grad_accum_steps, grad_accum_steps, -1).swapaxes(0, 1)

  def body(carry, micro_BT1):
    loss_sum, entropy_sum, terms_sum, grad_sum = carry
    (_, (loss, entropy, counts, terms)), grads = grad_fn(params, model_state, micro_BT1, model)
    return (loss_sum + loss, entropy_sum + entropy, jax.tree.map(jnp.add, terms_sum, terms),
            jax.tree.map(jnp.add, grad_sum, grads)), counts

  zeros = jax.tree.map(jnp.zeros_like, params)
  no_terms = ({k: jnp.zeros((), jnp.float32) for k in ('meta_loss', 'meta_bce', 'meta_mse')}
              if model.config.metacog else {})
  (loss, entropy, terms, grads), counts_A = jax.lax.scan(body, (0.0, 0.0, no_terms, zeros), micro_ABT1)
  scale = 1.0 / grad_accum_steps
  counts = jax.tree.map(lambda c: jnp.sum(c, axis=0), counts_A)  # rank counts over the whole step
  return (loss * scale, entropy * scale, jax.tree.map(lambda g: g * scale, grads), counts,
          jax.tree.map(lambda t: t * scale, terms))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: VesperLM,
               tx: optax.GradientTransformationExtraArgs, schedule: optax.Schedule,
               grad_accum_steps: int, trainable: PyTree | None = None,
               layout: velvet.FlatLayout | None = None, in_place: velvet.InPlace | None = None,
               grad_clip_norm: float = 0.0, metacog_weight: float = 0.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Pure: jitted once with explicit shardings and the state donated.

  A step whose loss or gradient norm is not finite changes nothing but the skip counters.
  `trainable` (a tree of bools, fine-tuning with adapters) marks what the optimizer may change.
  `layout` and `in_place` (opt.kernel 'xla_flat' | 'pallas' | 'triton'): the state holds flat buffers and
  `in_place.step` replaces tx, with clipping (`grad_clip_norm`) folded into its scalars.
  `metacog_weight` is λ_meta, the weight of the metacognition head's loss (with model.metacog).
  `loss` in the metrics is the cross-entropy alone; the head's loss is logged as `meta_loss`.
  """
  loss, entropy, grads, counts, meta_terms = _loss_and_grads(
      state.params, state.model_state, batch['tokens'], model, grad_accum_steps, trainable, layout,
      metacog_weight)
  grad_norm = optax.tree.norm(grads)
  meta_ok = jnp.isfinite(meta_terms['meta_loss']) if meta_terms else True
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & meta_ok

  if in_place is not None:
    # --- the in-place Velvet path: one pass over each buffer, the skip and the clip as scalars.
    grad_scale = (jnp.where(grad_norm < grad_clip_norm, 1.0, grad_clip_norm / grad_norm)
                  if grad_clip_norm > 0 else jnp.ones((), jnp.float32))
    params, opt_state = in_place.step(state.params, grads, state.opt_state, loss=loss,
                                      entropy=entropy / math.log(model.config.vocab_size),
                                      grad_scale=grad_scale, ok=ok)
    return _advance(state, params, opt_state, ok, loss, entropy, grad_norm, schedule, meta_terms)

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
  return _advance(state, params, opt_state, ok, loss, entropy, grad_norm, schedule, meta_terms)


def _advance(state: TrainState, params: PyTree, opt_state: PyTree, ok: jax.Array, loss: jax.Array,
             entropy: jax.Array, grad_norm: jax.Array, schedule: optax.Schedule,
             meta_terms: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  """The new state around the optimizer's result (counters), and the step's metrics."""
  streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak,
      nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
  # The optimizer's own step count skips the skipped updates (their state is kept): this is the rate
  # it applied, not schedule(state.step).
  applied_lr = schedule(state.step - state.nonfinite_total)
  metrics = {'loss': loss, 'entropy': entropy, 'grad_norm': grad_norm,
             'learning_rate': applied_lr, 'skipped': (~ok).astype(jnp.int32),
             'nonfinite_streak': streak, **meta_terms}
  # Velvet's current s_E, s_P and β1 (empty for AdamW), so runs can be read against them.
  metrics.update(velvet.velvet_scalings(new_state.opt_state))
  return new_state, metrics


# ----------------------------------------------------------------------------------------- setup

def _compilation_cache(config: ml_collections.ConfigDict) -> None:
  directory = config.logging.compilation_cache_dir or os.path.join(
      sources_lib.default_cache_dir(config.data.cache_dir), 'jax_compilation_cache')
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _init_state(config, model: VesperLM, tx, mesh, seq_len: int, layout=None, in_place=None):
  """Sharded init: shapes first (no memory), shardings from the rules, then a jitted init."""

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    params = variables.pop('params')
    if layout is not None:
      params = layout.flatten(params)
    opt_state = tx.init(params) if in_place is None else in_place.init(params)
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=opt_state,
                      model_state=dict(variables), nonfinite_streak=jnp.array(0, jnp.int32),
                      nonfinite_total=jnp.array(0, jnp.int32))

  rng = jax.random.key(config.train.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(abstract, mesh)
  if layout is not None:  # flat buffers split over 'fsdp' (the layout padded them to split evenly)
    split = lambda tree: jax.tree.map(lambda _: sharding.flat_buffer_sharding(mesh), tree)
    shardings = shardings.replace(params=split(shardings.params), opt_state=shardings.opt_state._replace(
        mu=split(shardings.opt_state.mu), nu=split(shardings.opt_state.nu)))
  return jax.jit(init, out_shardings=shardings), abstract, shardings


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
  eval_fn: Callable               # (params, model_state, batch) -> (nll sum, count); jitted
  layout: velvet.FlatLayout | None = None  # the in-place Velvet path's flat buffers (else None)
  in_place: velvet.InPlace | None = None
  grad_accum_steps: int = 1       # micro-batches per step (train.grad_accum_steps, 0 = auto, resolved)
  platform: str = 'cpu'           # whose choices the model and step make (platforms.py; = model.config.platform)

  def param_tree(self, params: PyTree) -> PyTree:
    """The parameter tree of a state's `params` (a view of the flat buffers on the in-place path)."""
    return params if self.layout is None else self.layout.unflatten(params)

  def abstract_params(self) -> PyTree:
    """ShapeDtypeStructs of the parameter tree."""
    return jax.eval_shape(self.param_tree, self.abstract_state.params)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, platform: str | None = None) -> Parts:
  """Model, optimizer, sharded init and the jitted steps for `config` on `mesh` (nothing runs yet).

  `platform` ('cpu', 'gpu', 'tpu'): whose per-platform choices to make (platforms.py); None = what the
  mesh's devices are. 'gpu' on a CPU mesh runs the code a GPU would run, on the same batches.
  """
  t = config.train
  platform = platforms.resolve(platform, mesh)
  model_cfg = ModelConfig(**config.model).replace(platform=platform)
  model = VesperLM(model_cfg)
  seq_len = config.data.seq_len
  accum = base_config.grad_accum_steps(config, mesh.size, platform)
  params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
  # With adapters the base is frozen: the optimizer keeps no state for it and never updates it.
  trainable = (flylora.trainable_mask(params_shape['params'], model_cfg) if flylora.targets(model_cfg)
               else None)
  if trainable is not None and model_cfg.metacog:  # the head trains with the adapters, the base stays frozen
    trainable = metacog.head_trainable(trainable)
  tx = optim.make_optimizer(config.opt, t.num_steps, params_shape['params'], trainable,
                            vocab_size=model_cfg.vocab_size)
  layout = in_place = None
  if optim.in_place_kernel(config.opt):
    layout = optim.flat_layout(config.opt, params_shape['params'], mesh.shape[sharding.FSDP])
    in_place = optim.make_in_place(config.opt, t.num_steps, layout, vocab_size=model_cfg.vocab_size,
                                   mesh=mesh)
  init_fn, abstract_state, state_shardings = _init_state(config, model, tx, mesh, seq_len, layout, in_place)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx,
                        schedule=optim.learning_rate_schedule(config.opt, t.num_steps),
                        grad_accum_steps=accum, trainable=trainable, layout=layout,
                        in_place=in_place, grad_clip_norm=config.opt.grad_clip_norm,
                        metacog_weight=t.metacog_weight),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=0)
  eval_step = functools.partial(eval_lib.eval_step, model=model)
  eval_fn = jax.jit(lambda params, *args: eval_step(params if layout is None else layout.unflatten(params),
                                                     *args),
                    in_shardings=(state_shardings.params, state_shardings.model_state,
                                  {'tokens': batch_sharding, 'weights': batch_sharding}))
  return Parts(model, tx, trainable, init_fn, abstract_state, state_shardings, batch_sharding, step_fn,
               eval_fn, layout, in_place, accum, platform)


# ----------------------------------------------------------------------------------------- evaluation

def evaluate(parts: 'Parts', state: TrainState, val_tokens: np.ndarray,
             config: ml_collections.ConfigDict) -> dict[str, float]:
  """Validation loss, perplexity and the number of targets scored: every target of the split up to
  train.eval_tokens, in the same windows as `python -m vesper_jax.evaluate` (evaluate.score).
  With the metacognition head, also its calibration: eval_ece, eval_auroc, eval_aurc, eval_loss_corr
  (Pearson)."""
  t = config.train
  result = eval_lib.score(lambda batch: parts.eval_fn(state.params, state.model_state, batch), val_tokens,
                          seq_len=config.data.seq_len, batch_size=t.batch_size // parts.grad_accum_steps,
                          max_tokens=t.eval_tokens,
                          place=lambda batch: sharding.global_batch(batch, parts.batch_sharding))
  out = {'eval_loss': result['loss'], 'eval_perplexity': result['perplexity'],
         'eval_tokens': result['tokens']}
  if 'metacog' in result:
    m = result['metacog']
    out.update(eval_ece=m['ece'], eval_auroc=m['auroc'], eval_aurc=m['aurc'], eval_loss_corr=m['pearson'])
  return out


# ----------------------------------------------------------------------------------------- stages

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the model `config` describes, writing everything into `workdir`.

  Returns:
    A dict with the final step, last training loss, last eval loss/perplexity, skipped-update count,
    measured tokens/s, and whether the run stopped early on a signal (and a text sample, if asked).
  """
  workdir = pathlib.Path(workdir)
  validate_config(config)
  _compilation_cache(config)
  cache, config = load_data(config)
  check_resumable(workdir, config)
  ckpt_lib.write_workdir_metadata(workdir, config, cache.directory / 'tokenizer.json')
  mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
  parts = build(config, mesh)
  _check_layout(workdir, parts)
  ckpt_lib.write_layout(workdir, parts.layout)  # how checkpoint readers find the tree in flat buffers
  _log_model(config, parts, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
  try:
    state, start = init_or_restore(config, parts, checkpointer)
    state, summary = _loop(config, parts, cache, state, start, checkpointer, mesh, workdir)
  finally:
    checkpointer.close()
  return _finish(config, parts, cache, state, summary)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Stage 1: refuses, before any data work or compilation, a config the run cannot use (names the key)."""
  base_config.validate(config)
  finetune.check_init_from(config)


def load_data(config: ml_collections.ConfigDict) -> tuple[data_lib.TokenCache, ml_collections.ConfigDict]:
  """Stage 2: the token cache; with train.auto_scale, a copy of `config` with num_steps set from it."""
  cache = data_lib.build_or_load_cache(
      config.data, config.model.vocab_size,
      progress=jax.process_index() == 0 and config.logging.progress_bar)
  pinned = _pinned_hub_specs(config.data, cache.meta)
  if config.train.auto_scale or pinned != (config.data.sources, config.data.tokenizer):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      # hf:// entries at the commit they were read at: config.json then names exactly what the run read.
      config.data.sources, config.data.tokenizer = pinned
      if config.train.auto_scale:
        config.train.num_steps = auto_scale_steps(config, len(cache.train))
  data_lib.check_scale(cache, config)  # refuses a BPE too large for the corpus; warns on epochs, val size
  return cache, config


def _pinned_hub_specs(data_config: ml_collections.ConfigDict, meta: dict) -> tuple[str, str]:
  """(data.sources, data.tokenizer) with each hf:// entry pinned to the commit the cache was built from."""
  origins = [s.get('origin', '') for s in meta.get('sources', [])]
  sources = ','.join(hub.pin(e.strip(), origins) if hub.is_hub(e.strip()) else e
                     for e in data_config.sources.split(','))
  tokenizer = data_config.tokenizer
  if hub.is_hub(tokenizer):
    tokenizer = hub.pin(tokenizer, [meta.get('tokenizer_origin', '')])
  return sources, tokenizer


def check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume `workdir` with a model whose weights mean something else (model.WEIGHT_FIELDS),
  or with an optimizer whose state has another structure (opt.name, clipping on/off); names the key.

  Fields that change no weight (dtype, remat, attention_impl, max_seq_len...) may change on resume.
  """
  if not (workdir / ckpt_lib.CONFIG_FILE).is_file():
    return
  try:
    old = ModelConfig(**ckpt_lib.read_config(workdir).model)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{workdir / ckpt_lib.CONFIG_FILE}: its model section is not a valid ModelConfig '
                     f'({e}); use a new --workdir') from e
  old_opt = ckpt_lib.read_config(workdir).opt
  clipping = 'opt.grad_clip_norm > 0'
  flat = "opt.kernel in ('xla_flat', 'pallas', 'triton') (a flat state)"
  for key, was, now in (('opt.name', old_opt.name, config.opt.name),
                        (clipping, old_opt.grad_clip_norm > 0, config.opt.grad_clip_norm > 0),
                        (flat, bool(optim.in_place_kernel(old_opt)), bool(optim.in_place_kernel(config.opt)))):
    if was != now:  # the optimizer state's structure differs: orbax could only say "trees do not match"
      raise ValueError(f'{workdir} was trained with {key} = {was!r}, this config has {now!r}: its optimizer '
                       'state cannot be restored; use a new --workdir (or train.init_from to start from its '
                       'weights)')
  changes = weight_changes(old, ModelConfig(**config.model))
  if changes:
    what = ', '.join(f'model.{k} {a!r} -> {b!r}' for k, a, b in changes)
    raise ValueError(f'{workdir} was trained with a different model ({what}): its checkpoints cannot '
                     'be resumed with these weights; use a new --workdir')


def _check_layout(workdir: pathlib.Path, parts: 'Parts') -> None:
  """Refuses to resume flat checkpoints whose buffers are laid out differently (another padding, from an
  fsdp size that does not divide 4096, or another decay grouping): restoring them would fail, and a
  checkpoint that fails to restore is set aside as damaged."""
  old = ckpt_lib.read_layout(workdir)
  if old is None or parts.layout is None or not (workdir / ckpt_lib.CHECKPOINT_DIR).is_dir():
    return
  if old.to_json() != parts.layout.to_json():
    raise ValueError(f'{workdir} holds flat checkpoints laid out as {[b[:2] for b in old.buffers]}; this '
                     f'config lays them out as {[b[:2] for b in parts.layout.buffers]} (train.mesh_fsdp or '
                     'opt.decay_embeddings changed): resume with the old values, or use a new --workdir')


def _log_model(config: ml_collections.ConfigDict, parts: 'Parts', mesh: jax.sharding.Mesh) -> None:
  counts = param_counts(parts.abstract_params())
  logging.info('Model: %s parameters (%s non-embedding) on mesh %s over %d devices (%s)',
               f"{counts['total']:,}", f"{counts['non_embedding']:,}", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind)
  B, A = config.train.batch_size, parts.grad_accum_steps
  logging.info('Batch: %d sequences of %d tokens per step, as %d micro-batch%s of %d%s', B,
               config.data.seq_len, A, 'es' if A > 1 else '', B // A,
               ' (train.grad_accum_steps=0: auto)' if not config.train.grad_accum_steps else '')
  if parts.trainable is not None:
    flylora.param_report(parts.abstract_params(), parts.model.config, parts.trainable)
    logging.info('Optimizer state: %s elements', f'{optim.count_state(parts.abstract_state.opt_state):,}')


def init_or_restore(config: ml_collections.ConfigDict, parts: 'Parts',
                    checkpointer: ckpt_lib.Checkpointer) -> tuple[TrainState, int]:
  """Stage 3: the latest checkpoint's state, or a fresh one (with a base's weights when fine-tuning)."""
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          parts.abstract_state, parts.state_shardings)
  restored = checkpointer.restore_latest_good(abstract)  # damaged newer checkpoints set aside, with a warning
  if restored is not None:
    state, start = restored
    logging.info('Resuming from the checkpoint of step %d', start)
    return state, start
  state = parts.init_fn(jax.random.key(config.train.seed))
  if config.train.init_from:  # fine-tuning: the base's weights replace the random ones (adapters stay)
    base = finetune.load_base(config.train.init_from, parts.model.config)
    params = finetune.graft(parts.param_tree(state.params), base)
    params = params if parts.layout is None else parts.layout.flatten(params)
    state = state.replace(params=jax.device_put(params, parts.state_shardings.params))
  return state, 0


def _loop(config: ml_collections.ConfigDict, parts: 'Parts', cache: data_lib.TokenCache,
          state: TrainState, start: int, checkpointer: ckpt_lib.Checkpointer, mesh: jax.sharding.Mesh,
          workdir: pathlib.Path) -> tuple[TrainState, dict[str, Any]]:
  """Stage 4: steps up to train.num_steps; logs, evaluates and saves on their cadences (and at the end);
  on SIGTERM/SIGINT saves the current step and returns."""
  t, lead = config.train, jax.process_index() == 0
  writer = metrics_writer.MetricsWriter(workdir, tensorboard=config.logging.tensorboard, enabled=lead,
                                        resume_step=start)
  progress = metrics_writer.Progress(t.num_steps, start, enabled=lead and config.logging.progress_bar)
  throughput = _throughput(config, parts, mesh)
  prefetch = data_lib.Prefetcher(functools.partial(_train_batch, config, cache.train, parts), start)
  summary: dict[str, Any] = {'stopped_by_signal': False}

  def evaluate_and_log(step: int) -> None:
    summary.update(evaluate(parts, state, cache.val, config), eval_step=step)
    writer.write(step, {k: summary[k] for k in ('eval_loss', 'eval_perplexity', 'eval_tokens', 'eval_ece',
                                                'eval_auroc', 'eval_loss_corr') if k in summary})
    progress.note(f"step {step}: eval loss {summary['eval_loss']:.4f} ({summary['eval_tokens']:,} tokens)")

  try:
    if start == 0:  # the starting point of the validation curve
      evaluate_and_log(0)
    with _StopFlag() as stop:
      pending = None  # the previous step's metrics, read while the current step runs
      for step in range(start, t.num_steps):
        state, metrics = parts.step_fn(state, next(prefetch))
        throughput.tick()
        if pending is not None:
          _check_nonfinite(pending, t.max_nonfinite_steps)
        pending, done = metrics, step + 1
        if done % config.logging.every_steps == 0 or done == t.num_steps:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()} | throughput.read()
          writer.write(done, values)
          progress.update(done, values)
          summary.update(loss=values['loss'], tokens_per_s=values['tokens_per_s'])
        if done % t.eval_every == 0 or done == t.num_steps:
          evaluate_and_log(done)
        # Read the flag once: a signal on a checkpoint step must not save that step twice (orbax refuses).
        stopping = _stop_agreed(stop.signal is not None, done, config)
        if stopping:
          logging.warning('Signal %s: saving step %d and stopping', stop.signal or 'on another process', done)
        if done % config.checkpoint.every_steps == 0 or done == t.num_steps or stopping:
          checkpointer.save(done, state)
        if stopping:
          summary['stopped_by_signal'] = True
          break
      if pending is not None:
        _check_nonfinite(pending, t.max_nonfinite_steps)
  except NonFiniteError as e:
    checkpointer.wait()
    saved = checkpointer.latest_step()
    raise NonFiniteError(f'{e}. Last checkpoint: ' + (f'step {saved} in {workdir}' if saved is not None
                         else 'none (the run never saved)') + '; skipped updates leave the state as it '
                         'was, so it holds the parameters from before the non-finite streak') from None
  finally:
    prefetch.close()
    progress.close()
    writer.close()
  return state, summary


def _stop_agreed(signalled: bool, done: int, config: ml_collections.ConfigDict) -> bool:
  """Whether every process stops after step `done`: true if any process was signalled.

  A preemption signal reaches the processes of a multi-host run at different moments (or only one of
  them), and a checkpoint save is collective: each process deciding alone would leave some waiting in
  the save forever. So the processes agree, with a tiny all-gather of the flag, at the steps where the
  loop already waits for the device (the logging cadence), the same steps on every process.
  """
  if jax.process_count() == 1:
    return signalled
  if done % config.logging.every_steps:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array([signalled]))))


def _finish(config: ml_collections.ConfigDict, parts: 'Parts', cache: data_lib.TokenCache,
            state: TrainState, summary: dict[str, Any]) -> dict[str, Any]:
  """Stage 5: the run's summary, and a text sample from the trained model (process 0, unless stopped)."""
  t = config.train
  summary.update(step=int(state.step), skipped_updates=int(state.nonfinite_total))
  if jax.process_index() == 0 and not summary['stopped_by_signal'] and t.sample_prompt:
    summary['sample'] = _sample(parts.model.config, parts.param_tree(state.params), cache.tokenizer, t)
  return summary


def _train_batch(config: ml_collections.ConfigDict, tokens: np.ndarray, parts: 'Parts',
                 step: int) -> dict[str, jax.Array]:
  """The global batch of `step` (this process reads only its rows), placed on the mesh."""
  t = config.train
  local = data_lib.get_batch(tokens, seed=t.seed, step=step, batch_size=t.batch_size,
                             seq_len=config.data.seq_len, process_index=jax.process_index(),
                             process_count=jax.process_count())
  return sharding.global_batch({'tokens': local}, parts.batch_sharding)


def _throughput(config: ml_collections.ConfigDict, parts: 'Parts',
                mesh: jax.sharding.Mesh) -> metrics_writer.Throughput:
  tokens_per_step = config.train.batch_size * config.data.seq_len
  counts = param_counts(parts.abstract_params())
  flops = scaling.flops_per_token(parts.model.config, counts['non_embedding'], config.data.seq_len)
  return metrics_writer.Throughput(tokens_per_step, flops * tokens_per_step,
                                   scaling.peak_flops(jax.devices()[0].device_kind), mesh.size)


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
                         f'(train.max_nonfinite_steps={limit}); stopping')


def _sample(model_cfg: ModelConfig, params: PyTree, tokenizer, t: ml_collections.ConfigDict) -> str:
  """A short text sample from the trained model, logged at the end of the run."""
  from vesper_jax import generate  # deferred: only the end of a run needs it
  continuation, = generate.generate_text(params, model_cfg, tokenizer, [t.sample_prompt],
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


def main(argv):
  del argv
  flag_values = flags.FLAGS
  config = flag_values.config
  _maybe_initialize_distributed(config, flag_values)
  workdir = flag_values.workdir or os.path.join('runs', pathlib.Path(flag_values['config'].config_filename).stem)
  if jax.process_index() == 0:
    print(f'vesper_jax.train: {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), '
          f'workdir {workdir}', flush=True)
  summary = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    if 'sample' in summary:
      print(f"\n--- sample ---\n{summary.pop('sample')}\n--------------", flush=True)
    print(json.dumps(summary, indent=2), flush=True)


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs). Default: runs/<config name>.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
  flags.mark_flags_as_required(['config'])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with an unknown `--config.a.b` override reported by name instead of a traceback."""
  try:
    return flags.FLAGS(argv)  # a value of the wrong type raises flags.Error: cli.run reports it
  except (KeyError, AttributeError) as e:
    missing = str(e).strip('"\'')
    culprits = [a for a in argv if a.startswith('--config.') and f'.{missing}' in a.split('=')[0]]
    cli.usage_error('vesper_jax.train', f"unknown config key {missing!r} in {' '.join(culprits) or argv}"
                    ' (see vesper_jax/config.py for the keys)')


if __name__ == '__main__':
  cli.run('vesper_jax.train', main, define_flags, flags_parser=_parse_flags)
