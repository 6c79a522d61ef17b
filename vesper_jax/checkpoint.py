"""Orbax checkpoints of the train state, and the workdir metadata that makes a workdir self-contained.

A workdir holds:
  config.json        the full ConfigDict of the run (written once, at start)
  tokenizer.json     a copy of the tokenizer the run used
  flat_layout.json   on the in-place Velvet path only: where each parameter lives in the flat buffers
                     the checkpoints hold (velvet.FlatLayout), so readers rebuild the parameter tree
  checkpoints/<step> orbax checkpoints of the TrainState (params, optimizer state, step, counters)
  metrics.jsonl, events.out.tfevents.*   logs
  damaged_checkpoints/<step>   checkpoints that could not be resumed from, set aside (never deleted)

A damaged checkpoint (a truncated or missing file, unreadable metadata, non-finite values) is never
fatal while an older one restores: resuming and loading fall back to the newest good one and warn with
the path of each one skipped. Inference restores the parameters alone, not the optimizer's moments.
"""

import asyncio
import contextlib
import gc
import json
import logging as std_logging
import os
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from vesper_jax import config as config_lib
from vesper_jax import platforms
from vesper_jax import velvet
from vesper_jax.model import ModelConfig
from vesper_jax.pytree import PyTree


CONFIG_FILE = 'config.json'
LAYOUT_FILE = 'flat_layout.json'
TOKENIZER_FILE = 'tokenizer.json'
CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'


class _SiblingReadErrors(std_logging.Filter):
  """Orbax reads a checkpoint's arrays concurrently; when a file is damaged, the one error we handle is
  raised and the others' (the same damage) surface later as asyncio's 'Task exception was never
  retrieved' with a traceback each. Those add nothing to the warning that names the checkpoint."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'async_deserialize' not in record.getMessage()


std_logging.getLogger('asyncio').addFilter(_SiblingReadErrors())


DRAIN_SECONDS = 10.0  # how long a closing restore loop waits for its cancelled reads


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that cancels and awaits its pending tasks before it closes, as asyncio.run does.

  Orbax runs a restore in a fresh loop and closes it as soon as the first array read fails, with the
  other reads still pending. Those orphaned coroutines were finalised later, by the garbage collector or
  at exit, and orbax turns the GeneratorExit into an exception of its own, so each printed 'Exception
  ignored in: <coroutine ...>' and a page of TensorStore spec after the one-line error (more often the
  busier the machine, the more reads still pending). Cancelled and awaited here, they end inside the
  restore, with their errors retrieved.
  """

  def close(self) -> None:
    if not self.is_closed() and not self.is_running():
      pending = asyncio.all_tasks(self)
      for task in pending:
        task.cancel()
      if pending:
        # Bounded: a read that ignores its cancellation (one did, waiting on TensorStore, and a CI run
        # hung in test_damaged_latest_checkpoint_falls_back) is left to the garbage collector, noisy but
        # not stuck.
        self.run_until_complete(asyncio.wait(pending, timeout=DRAIN_SECONDS))
        for task in pending:
          if task.done() and not task.cancelled():
            task.exception()  # retrieved: no 'Task exception was never retrieved' at exit
    super().close()


class _DrainingLoopPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """Within: the event loops orbax creates drain their pending reads when closed (_DrainingLoop)."""
  # The policy is the one public hook on the loop `asyncio.new_event_loop()` (orbax's run_sync) creates
  # (deprecated from Python 3.14, to go in 3.16: by then, a loop factory if orbax takes one).
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


class Checkpointer:
  """Keeps the last K checkpoints of the train state; saves asynchronously when asked to."""

  def __init__(self, workdir: str | os.PathLike, keep: int, async_save: bool):
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree) -> None:
    """Starts saving `state` at `step` (returns before the write finishes when async)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, abstract_state: PyTree) -> PyTree:
    """Restores onto the shardings and structure of `abstract_state` (ShapeDtypeStructs or arrays)."""
    with _draining_event_loops():
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest_good(self, abstract_state: PyTree) -> tuple[PyTree, int] | None:
    """The newest checkpoint that restores with finite values, as (state, step); None if there is none.

    Each newer one that fails is set aside into <workdir>/damaged_checkpoints/ with a warning naming
    it, so the run's next saves do not collide with it. Raises ValueError naming the directory when
    checkpoints exist but none restores.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      problem = _try(lambda: self.restore(step, abstract_state))
      if not isinstance(problem, str):
        return problem, step
      self._set_aside(step, problem)
    if steps:
      raise ValueError(f'{self._manager.directory}: none of the checkpoints (steps {steps}) could be '
                       f'restored; they were moved to {self._damaged_dir()} (use a new --workdir, or '
                       'inspect them)')
    return None

  def _damaged_dir(self) -> pathlib.Path:
    return pathlib.Path(self._manager.directory).parent / DAMAGED_DIR

  def _set_aside(self, step: int, problem: str) -> None:
    source = pathlib.Path(self._manager.directory) / str(step)
    target = self._damaged_dir() / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    logging.warning('checkpoint %s cannot be resumed from (%s); moved to %s, trying an older one',
                    source, problem, target)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(source), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until any background save has been committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def write_workdir_metadata(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                           tokenizer_path: str | os.PathLike) -> None:
  """Writes config.json and a copy of the tokenizer (process 0 only), atomically."""
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / (CONFIG_FILE + '.tmp')
  tmp.write_text(config.to_json(indent=2, sort_keys=True))
  tmp.replace(workdir / CONFIG_FILE)
  target = workdir / TOKENIZER_FILE
  if pathlib.Path(tokenizer_path).absolute() != target.absolute():
    shutil.copyfile(tokenizer_path, str(target) + '.tmp')
    os.replace(str(target) + '.tmp', target)


def write_layout(workdir: str | os.PathLike, layout: velvet.FlatLayout | None) -> None:
  """Writes flat_layout.json when the state holds flat buffers; removes a stale one otherwise."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(workdir) / LAYOUT_FILE
  if layout is None:
    path.unlink(missing_ok=True)
    return
  tmp = path.with_suffix('.tmp')
  tmp.write_text(layout.to_json())
  tmp.replace(path)


def read_layout(workdir: str | os.PathLike) -> velvet.FlatLayout | None:
  """The FlatLayout of a workdir's checkpoints, or None when they hold the parameter tree itself."""
  path = pathlib.Path(workdir) / LAYOUT_FILE
  return velvet.layout_from_json(path.read_text()) if path.is_file() else None


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run's config.json laid over this version's base config: a key the file lacks (a run from an
  older version) gets its default, and a key this version no longer has is dropped (logged)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no config.json — is {workdir} a vesper_jax workdir?')
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: unreadable ({e})') from e
  config = config_lib.get_config()
  _overlay(config, saved, path, prefix='')
  config_lib.older_meanings(config, saved)
  return config


def _overlay(config: ml_collections.ConfigDict, saved: dict, path: pathlib.Path, prefix: str) -> None:
  for key, value in saved.items():
    if key not in config:
      logging.info('%s: %s%s is not a key of this version; ignored', path, prefix, key)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _overlay(config[key], value, path, prefix=f'{prefix}{key}.')
    else:
      with config.ignore_type():
        config[key] = value


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, PyTree]:
  """The parameter tree of the newest good (or the given) checkpoint in `workdir`, parameters only.

  Arrays land on this process's first device (a run trained on 8 GPUs loads on 1). Without `step`, a
  checkpoint that does not restore or holds non-finite values is skipped with a warning naming it.
  Raises FileNotFoundError without checkpoints, ValueError naming the directory if none restores.
  """
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory}: no checkpoints (is {workdir} a training workdir?)')
  manager = ocp.CheckpointManager(directory)
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  manager.close()
  if not steps:
    raise FileNotFoundError(f'{directory}: no checkpoint found')
  problems = []
  layout = read_layout(workdir)
  for candidate in steps:
    params = _try(lambda: _as_tree(_restore_params(directory / str(candidate) / 'default'), layout))
    if not isinstance(params, str):
      if problems:
        logging.warning('loaded step %d of %s; newer checkpoints skipped: %s', candidate, directory,
                        '; '.join(problems))
      logging.info('Loaded parameters of step %d from %s', candidate, directory)
      return candidate, params
    problems.append(f'{directory / str(candidate)} ({params})')
  raise ValueError(f'{directory}: no checkpoint could be loaded: {"; ".join(problems)}')


def _restore_params(item_dir: pathlib.Path) -> PyTree:
  """The `params` subtree of a saved TrainState, restored alone (partial restore: no moments read)."""
  with _draining_event_loops(), ocp.PyTreeCheckpointer() as checkpointer:
    absl_logger = std_logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)  # read from the item directory, orbax warns that the step's
    try:                                     # own metadata file is not there: it is one level up
      saved = checkpointer.metadata(item_dir)
    finally:
      absl_logger.setLevel(level)
    saved = getattr(saved, 'item_metadata', saved)
    saved = getattr(saved, 'tree', saved)
    if not isinstance(saved, dict) or 'params' not in saved:
      raise ValueError('its metadata is missing or unreadable')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                   saved['params'])}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), item)
    return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))['params']


def _as_tree(params: PyTree, layout: velvet.FlatLayout | None) -> PyTree:
  """The parameter tree of restored `params`: as saved, or rebuilt from the flat buffers of `layout`."""
  if layout is None or not isinstance(params, dict) or set(params) != {b[0] for b in layout.buffers}:
    return params
  # Copies, not views: the leaves must not keep the whole buffers alive.
  return jax.tree.map(jnp.copy, layout.unflatten(params))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _is_closed_loop_noise(unraisable) -> bool:
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)


def _quiet_unraisable_hook(previous):
  def hook(unraisable):
    if not _is_closed_loop_noise(unraisable):
      previous(unraisable)
  return hook


# A failed orbax read leaves coroutines that are finalised (by the garbage collector, or by tensorstore's
# threads calling back into a loop orbax already closed) after the error was handled; Python reports each
# as an unraisable 'Event loop is closed' with a traceback, which says nothing the warning naming the
# checkpoint does not. Only that exact error is dropped; every other unraisable still reaches the hook.
sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)


def _collect_quietly() -> None:
  """Collects what a failed orbax read left behind now, while its noise is known to be harmless."""
  gc.collect()


def _try(restore) -> PyTree | str:
  """restore()'s result if it succeeds with finite values, else a one-line reason (a str)."""
  try:
    tree = restore()
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
    _collect_quietly()
    return f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}'
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  if floats and not bool(_all_finite(floats)):
    return 'non-finite values'
  return tree


def load_for_inference(workdir: str | os.PathLike):
  """(ModelConfig, params, Tokenizer) of the latest checkpoint in a training workdir."""
  from vesper_jax.tokenizer import Tokenizer  # deferred: keeps checkpoint importable without tokenizers
  config = read_config(workdir)
  _, params = load_params(workdir)
  tokenizer = Tokenizer.load(pathlib.Path(workdir) / TOKENIZER_FILE, config.data.eos_token)
  # The platform is this process's devices', decided here once for everything the model is used for.
  return ModelConfig(**config.model).replace(platform=platforms.resolve()), params, tokenizer
