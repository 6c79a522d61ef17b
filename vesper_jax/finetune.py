"""Fine-tuning from a base model (`train.init_from`): checking the request and loading the base.

Full fine-tuning and FlyLoRA/LoRA fine-tuning both start here: the base comes from a training workdir
(its latest checkpoint and tokenizer) or a `.safetensors` export, must share the fine-tuned model's
weight-defining fields (model.WEIGHT_FIELDS, adapters aside) and its tokenizer, and a base that carries
mergeable adapters is merged first. `train.py` is the only caller; the adapter layer (flylora.py) knows
nothing of files.
"""

import pathlib

import ml_collections
from absl import logging

from vesper_jax import checkpoint
from vesper_jax import export
from vesper_jax import flylora
from vesper_jax import metacog
from vesper_jax.model import ADAPTER_FIELDS, METACOG_FIELDS, WEIGHT_FIELDS, ModelConfig, weight_changes
from vesper_jax.pytree import PyTree, flatten, unflatten

# What a base model must share with the model fine-tuned from it: every weight-defining field but the
# adapters' (the base is a plain model; the adapters are added on top) and the metacognition head's
# (a head can be added in fine-tuning, or a base's head left behind).
BASE_FIELDS = tuple(f for f in WEIGHT_FIELDS if f not in ADAPTER_FIELDS + METACOG_FIELDS)


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """Refuses a `train.init_from` that does not exist or would pair the base with another tokenizer."""
  init_from = config.train.init_from
  if not init_from:
    return
  path = pathlib.Path(init_from)
  if path.is_dir():
    base_tokenizer = path / checkpoint.TOKENIZER_FILE
    if not base_tokenizer.is_file():
      raise FileNotFoundError(f'train.init_from={init_from}: no {checkpoint.TOKENIZER_FILE} there '
                              '(not a vesper_jax training workdir?)')
    if not config.data.tokenizer or (
        pathlib.Path(config.data.tokenizer).read_bytes() != base_tokenizer.read_bytes()):
      raise ValueError(f'train.init_from={init_from}: the base model was trained with {base_tokenizer}; '
                       f'set data.tokenizer={base_tokenizer} (data.tokenizer={config.data.tokenizer!r} '
                       'would give the same ids other meanings)')
  elif path.is_file() and path.suffix == '.safetensors':
    if not config.data.tokenizer:
      raise ValueError(f'train.init_from={init_from}: a safetensors file carries no tokenizer; set '
                       "data.tokenizer to the base model's tokenizer.json")
  else:
    raise FileNotFoundError(f'train.init_from={init_from}: expected a training workdir or a '
                            '.safetensors export')


def load_base(init_from: str, config: ModelConfig) -> PyTree:
  """The base model's parameters for fine-tuning `config`, from a workdir or a safetensors export.

  A base that carries mergeable adapters is merged first. Raises ValueError naming the model field on
  which the base and `config` disagree.
  """
  path = pathlib.Path(init_from)
  if path.is_dir():
    base_config, params, _ = checkpoint.load_for_inference(path)
  else:
    try:
      base_config = export.config_from_safetensors(path)
    except ValueError:  # a file without vesper_jax metadata: it must fit this architecture
      base_config = config.replace(lora_targets='')
    if base_config.quantize:  # rounded weights are an inference artefact; training needs float ones
      raise ValueError(f'train.init_from={init_from}: the base is quantized for inference (model.quantize='
                       f'{base_config.quantize!r}); fine-tune from the float export or the training workdir')
    params = export.load_safetensors(str(path), base_config)
  if flylora.targets(base_config):
    params, base_config = flylora.merge(params, base_config)
  changes = weight_changes(base_config, config, BASE_FIELDS)
  if changes:
    field, base_value, value = changes[0]
    raise ValueError(f'train.init_from={init_from}: the base has model.{field}={base_value!r}, '
                     f'this config {value!r}')
  if base_config.metacog and not (config.metacog and config.metacog_hidden == base_config.metacog_hidden
                                  and config.metacog_inputs == base_config.metacog_inputs):
    logging.warning('train.init_from=%s: the base\'s metacognition head is left behind (this config has '
                    'model.metacog=%s, model.metacog_hidden=%d, model.metacog_inputs=%r)', init_from,
                    config.metacog, config.metacog_hidden, config.metacog_inputs)
    params = {k: v for k, v in params.items() if k != metacog.NAME}
  logging.info('Base weights from %s', init_from)
  return params


def graft(params: PyTree, base: PyTree) -> PyTree:
  """The base's weights in the fine-tuned model's tree (flylora.graft_base), keeping the adapters, and
  the freshly initialised metacognition head when the base has none."""
  if metacog.NAME in params and metacog.NAME not in base:
    head = {k: v for k, v in flatten(params).items() if metacog.is_head_path(k)}
    rest = flylora.graft_base({k: v for k, v in params.items() if k != metacog.NAME}, base)
    return unflatten({**flatten(rest), **head})
  return flylora.graft_base(params, base)
