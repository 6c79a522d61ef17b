"""Orbax checkpoints of the train state, and the workdir metadata that makes a workdir self-contained.

A workdir holds:
  config.json        the full ConfigDict of the run (written once, at start)
  tokenizer.json     a copy of the tokenizer the run used
  checkpoints/<step> orbax checkpoints of the TrainState (params, optimizer state, step, counters)
  metrics.jsonl, events.out.tfevents.*   logs
"""

import json
import os
import pathlib
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from vesper_jax.model import ModelConfig
from vesper_jax.pytree import PyTree


CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'
CHECKPOINT_DIR = 'checkpoints'


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
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

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


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no config.json — is {workdir} a vesper_jax workdir?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, PyTree]:
  """The parameter tree of the latest (or given) checkpoint in `workdir`.

  Arrays keep the saved sharding where this process has the same devices; otherwise (trained on 8 GPUs,
  loaded on 1) they land on this process's first device instead of failing on the topology mismatch.
  """
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory}: no checkpoint found')
  fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = manager.restore(step, args=ocp.args.StandardRestore(fallback_sharding=fallback))
  manager.close()
  logging.info('Loaded parameters of step %d from %s', step, directory)
  return step, restored['params']


def load_for_inference(workdir: str | os.PathLike):
  """(ModelConfig, params, Tokenizer) of the latest checkpoint in a training workdir."""
  from vesper_jax.tokenizer import Tokenizer  # deferred: keeps checkpoint importable without tokenizers
  config = read_config(workdir)
  _, params = load_params(workdir)
  tokenizer = Tokenizer.load(pathlib.Path(workdir) / TOKENIZER_FILE)
  return ModelConfig(**config.model), params, tokenizer
