"""Export to safetensors, and load back with every tensor checked (SPEC §11).

  python -m vesper_jax.export --workdir=runs/medium --out=export/medium --format=vesper|hf
                             [--quantize=int8|int4 [--quantize_head]] [--push_to_hub=OWNER/NAME [--private]]

`--format=vesper` writes `<out>/model.safetensors` in the original's naming, weights `[out, in]` (the
PyTorch orientation: flax kernels are `[in, out]`, so 2-D tensors are transposed, embeddings excepted):

  embeddings.weight                         [V_pad, D]  (vocabulary padded to a multiple of 128)
  layers.{i}.attention.{q,k,v,o}_proj.weight, layers.{i}.attention_norm.weight,
  layers.{i}.ffn.{gate,up,down}_proj.weight,  layers.{i}.ffn_norm.weight,
  final_norm.weight, lm_head.weight         [V_pad, D]  (absent with tied embeddings)
  + `.bias` where biases are on; FlyLoRA: `{proj}.lora_a` [r, in], `.lora_b` [out, r], `.expert_bias` [r]
  metacognition head (model.metacog): metacog.fc1.weight [hidden, inputs] (inputs = D, 4 or D + 4 by
  model.metacog_inputs, which the model config in the metadata carries), metacog.fc1.bias [hidden],
  metacog.fc2.weight [2, hidden], metacog.fc2.bias [2]

and the ModelConfig as JSON in the file's metadata. `load_safetensors` rebuilds the parameter tree and
refuses, naming the tensor, anything missing, unexpected, or of the wrong shape or dtype.

`--quantize=int8|int4` (quantize.py) writes each quantized projection as `{proj}.qweight` (int8 [out, in];
int4: uint8 [out, in/2], two values per byte along `in`, the even index in the low nibble), `{proj}.scales`
(float32 [out], int4: [out, in/G]) and, for int4, `{proj}.mins` (float32 [out, in/G]); the scheme and the
group size are in the metadata (`quantize`, `quantize_group_size`, and in the model config). A float
model and a quantized file, or the reverse, are refused with the reason before any tensor is compared.

Adapters (FlyLoRA / LoRA) also go to a file of their own (`export_adapters`, `load_adapters`): the same
names, `lora_a` as Aᵀ [r, in], `lora_b` as Bᵀ [out, r] (peft's orientation), `expert_bias` d [r], and the
model.lora_* settings in the metadata.

`--format=hf` writes a Hugging Face Llama directory (`config.json`, `model.safetensors`, and
`tokenizer.json` when the workdir has one) for models Llama can express: RMSNorm, SiLU (ERA with λ = 0
and T = 1 is exactly SiLU), no biases, no unmerged adapters; anything else is refused, naming the option.
A metacognition head has no place in Llama: it is left out, with a warning that says so.
The vocabulary is cut to `vocab_size` there, so `transformers` never samples a padding class. The query
and key weights need no permutation: Llama's `rotate_half` RoPE pairs dimension j with j + H/2 of each
head, with frequencies θ^(-2j/H), exactly as `model.apply_rope` does, and both split q/k heads as
contiguous H-sized blocks of the projection's output (`view(B, T, N, H)` there, `reshape` here). The
permutation in Meta's conversion script undoes the interleaved-pair RoPE of Meta's own checkpoints.

Loading never runs code from a file: safetensors holds raw tensors, the metadata is parsed as JSON.
"""

import ast
import dataclasses
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from safetensors import safe_open
from safetensors.numpy import save_file

from vesper_jax import cli
from vesper_jax import flylora
from vesper_jax import hub
from vesper_jax import metacog
from vesper_jax import platforms
from vesper_jax import quantize
from vesper_jax.model import ModelConfig, init_params
from vesper_jax.pytree import Path, PyTree, flatten, unflatten

FLAGS = flags.FLAGS

FORMAT = 'vesper_jax'
ADAPTER_FORMAT = 'vesper_jax.adapters/1'
WEIGHTS_FILE = 'model.safetensors'
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}


def vesper_name(path: Path) -> str:
  """The export name of a parameter path (SPEC §11): the one naming rule for model and adapter files.

  ('layers_3', 'attention', 'q_proj', 'kernel') -> 'layers.3.attention.q_proj.weight';
  ('layers_3', 'ffn', 'up_proj', 'lora_b') -> 'layers.3.ffn.up_proj.lora_b'.
  """
  head, *rest = path
  if head.startswith('layers_'):
    head = 'layers.' + head[len('layers_'):]
  return '.'.join([head, *rest[:-1], _LEAF_NAMES.get(rest[-1], rest[-1])])


def _transposed(path: Path, ndim: int) -> bool:
  # Flax kernels (and FlyLoRA's A, B) are [in, out]; PyTorch's are [out, in]. Embeddings are [V, D] in both.
  return ndim == 2 and path[-1] != 'embedding'


def _torch_layout(path: Path, value) -> np.ndarray:
  value = np.asarray(value)
  return np.ascontiguousarray(value.T if _transposed(path, value.ndim) else value)


def read_safetensors(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, str], dict]:
  """(metadata, {name: numpy array}) of a safetensors file; ValueError naming the file when it is
  missing, empty, truncated or corrupted (safetensors' own error is not a ValueError)."""
  try:
    with safe_open(str(path), framework='numpy') as f:
      return (f.metadata() or {}), ({name: f.get_tensor(name) for name in f.keys()} if tensors else {})
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: no such safetensors file') from e
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError, a torn header)
    raise ValueError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e})') from e


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str]) -> None:
  """save_file, then the permissions any new file of the user's gets (safetensors writes 0600)."""
  save_file(tensors, str(path), metadata=metadata)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def to_tensors(params: PyTree) -> dict[str, np.ndarray]:
  """The parameter tree as {export name: [out, in] numpy array}."""
  return {vesper_name(path): _torch_layout(path, value) for path, value in flatten(params).items()}


def save_safetensors(params: PyTree, config: ModelConfig, path: str | os.PathLike) -> dict[str, tuple]:
  """Writes the vesper-format file; returns {name: shape}."""
  tensors = to_tensors(params)
  # The platform belongs to the process that loads the file, not to the weights (platforms.py).
  fields = {k: v for k, v in dataclasses.asdict(config.replace(decode=False)).items() if k != 'platform'}
  config_json = json.dumps(fields, sort_keys=True)
  metadata = {'format': FORMAT, 'model_config': config_json}
  if config.quantize:  # also readable without parsing the config
    metadata.update(quantize=config.quantize, quantize_group_size=str(config.quantize_group_size))
  write_safetensors(tensors, path, metadata)
  logging.info('wrote %d tensors to %s', len(tensors), path)
  return {k: v.shape for k, v in tensors.items()}


def config_from_safetensors(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig stored in a vesper-format file's metadata."""
  metadata, _ = read_safetensors(path, tensors=False)
  if metadata.get('format') != FORMAT or 'model_config' not in metadata:
    raise ValueError(f'{path}: not a vesper_jax export (metadata format={metadata.get("format")!r}); '
                     'pass the ModelConfig explicitly')
  try:
    return ModelConfig(**json.loads(metadata['model_config'])).replace(platform=platforms.resolve())
  except (TypeError, ValueError) as e:  # a field this version lacks, a bad value, broken JSON
    raise ValueError(f'{path}: the model_config in its metadata is not a valid ModelConfig ({e}); '
                     'pass the ModelConfig explicitly') from e


def load_safetensors(path: str | os.PathLike, config: ModelConfig | None = None) -> PyTree:
  """Reads a vesper-format file into the parameter tree of `config` (default: the file's own config).

  Every tensor the model needs must be present with the exact shape and dtype, and nothing else:
  otherwise ValueError lists each offending tensor by name.
  """
  config = config_from_safetensors(path) if config is None else config
  expected = flatten(jax.eval_shape(lambda: init_params(config.replace(decode=False), jax.random.key(0))))
  metadata, tensors = read_safetensors(path)
  _check_quantization(path, metadata, config)
  problems, flat = [], {}
  for key, spec in sorted(expected.items()):
    name = vesper_name(key)
    shape = tuple(reversed(spec.shape)) if _transposed(key, len(spec.shape)) else tuple(spec.shape)
    want = f'{np.dtype(spec.dtype).name}{list(shape)}'
    if name not in tensors:
      problems.append(f'missing tensor {name} (expected {want})')
      continue
    value = tensors.pop(name)
    if value.shape != shape or value.dtype != spec.dtype:
      problems.append(f'tensor {name} is {value.dtype.name}{list(value.shape)}, expected {want}')
      continue
    flat[key] = jnp.asarray(value.T if _transposed(key, value.ndim) else value)
  problems += [f'unexpected tensor {name} {tensors[name].dtype.name}{list(tensors[name].shape)}'
               for name in sorted(tensors)]
  if problems:
    raise ValueError(f'{path} does not match the model ({len(problems)} problem(s)):\n  ' +
                     '\n  '.join(problems[:20]))
  return unflatten(flat)


def _describe(scheme: str, group_size: str | int) -> str:
  if scheme == 'int4':
    return f'int4 (groups of {group_size})'
  return scheme or 'float'


def _check_quantization(path, metadata: dict[str, str], config: ModelConfig) -> None:
  """Refuses a quantized file for a float model, a float file for a quantized one, or another scheme."""
  if metadata.get('format') != FORMAT:  # no vesper metadata: the tensor names and dtypes decide
    return
  scheme, group = metadata.get('quantize', ''), metadata.get('quantize_group_size', '')
  want = config.quantize
  if scheme == want and (want != 'int4' or group == str(config.quantize_group_size)):
    return
  if not want:
    hint = ('load it with its own config (load_safetensors(path) reads it from the file), or export the '
            'model again without --quantize')
  elif not scheme:
    hint = f'load the float model and quantize it (quantize.quantize_model(config, params, {want!r}))'
  else:
    hint = 'load it with its own config (load_safetensors(path) reads it from the file)'
  raise ValueError(f'{path} holds {_describe(scheme, group)} weights, the model expects '
                   f'{_describe(want, config.quantize_group_size)} weights (model.quantize={want!r}): {hint}')


# ------------------------------------------------------------------------------------------ adapters

def export_adapters(params: PyTree, config: ModelConfig, path: str | os.PathLike) -> dict[str, tuple]:
  """Writes the adapters alone to a safetensors file; returns {name: shape}.

  Names `layers.{i}.{attention|ffn}.{proj}.lora_a | .lora_b | .expert_bias`, oriented like the main
  export's [out, in] weights: `lora_a` is Aᵀ [r, in], `lora_b` is Bᵀ [out, r], `expert_bias` d [r]
  (FlyLoRA only). The model.lora_* settings go in the file's metadata.
  """
  if not flylora.targets(config):
    raise ValueError('export_adapters: the model has no adapters (model.lora_targets is empty)')
  tensors = {vesper_name(path): _torch_layout(path, value) for path, value in flatten(params).items()
             if flylora.is_adapter_leaf(path)}
  metadata = {'format': ADAPTER_FORMAT, **{k: repr(getattr(config, k)) for k in flylora.SETTINGS}}
  write_safetensors(tensors, path, metadata)
  logging.info('wrote %d adapter tensors to %s', len(tensors), path)
  return {k: v.shape for k, v in tensors.items()}


def _adapter_settings(path: str | os.PathLike, metadata: dict[str, str] | None) -> dict:
  if not metadata or metadata.get('format') != ADAPTER_FORMAT:
    raise ValueError(f'{path}: not a vesper_jax adapter file (metadata format '
                     f'{(metadata or {}).get("format")!r}, expected {ADAPTER_FORMAT!r})')
  missing = [k for k in flylora.SETTINGS if k not in metadata]
  if missing:
    raise ValueError(f'{path}: adapter metadata lacks {missing}')
  return {k: ast.literal_eval(metadata[k]) for k in flylora.SETTINGS}  # literals only, never code


def load_adapters(path: str | os.PathLike, base: PyTree,
                  base_config: ModelConfig) -> tuple[PyTree, ModelConfig]:
  """Loads an adapter file onto a plain base model; returns (adapted params, adapted config).

  The adapted config is `base_config` with the file's lora_* settings. Raises ValueError naming the
  tensor on any missing or unexpected tensor, or a shape/dtype mismatch with the base.
  """
  if flylora.targets(base_config):
    raise ValueError(f'load_adapters: the base config already has adapters '
                     f'(model.lora_targets={base_config.lora_targets!r}); load onto a plain base')
  metadata, tensors = read_safetensors(path)
  settings = _adapter_settings(path, metadata)
  config = base_config.replace(**settings)  # ModelConfig validates the lora_* values
  flat = flatten(base)
  leaves = ('lora_a', 'lora_b') + (('expert_bias',) if config.lora_mode == 'flylora' else ())
  expected = {}  # name -> (path, [out, in] shape)
  for key, kernel in flat.items():
    if key[-1] != 'kernel' or not key[0].startswith('layers_') or not flylora.is_target(config, key[-2]):
      continue
    (I, O), R = kernel.shape, config.lora_rank
    for leaf, shape in zip(leaves, ((R, I), (O, R), (R,))):
      expected[vesper_name(key[:-1] + (leaf,))] = (key[:-1] + (leaf,), shape)
  unexpected = sorted(set(tensors) - set(expected))
  if unexpected:
    raise ValueError(f'{path}: unexpected tensor {unexpected[0]} for this base and '
                     f'lora_targets={config.lora_targets!r}')
  for name, (key, shape) in sorted(expected.items()):
    if name not in tensors:
      raise ValueError(f'{path}: missing tensor {name}')
    value = tensors[name]
    if value.shape != shape or value.dtype != np.float32:
      raise ValueError(f'{path}: {name} is {value.dtype}{list(value.shape)}, expected float32{list(shape)}')
    flat[key] = jnp.asarray(value.T if value.ndim == 2 else value)
  return unflatten(flat), config


# ------------------------------------------------------------------------------------------ Hugging Face

def check_llama_compatible(config: ModelConfig) -> None:
  """Raises ValueError naming the first option that a Hugging Face LlamaForCausalLM cannot express."""
  if config.norm != 'rmsnorm':
    raise ValueError(f'cannot export to --format=hf: model.norm={config.norm!r}, Llama uses RMSNorm '
                     "(train with model.norm='rmsnorm'), or use --format=vesper")
  is_silu = config.activation == 'silu' or (
      config.activation == 'era' and config.era_entropy_weight == 0.0 and config.era_temperature == 1.0)
  if not is_silu:
    detail = (f' with era_entropy_weight={config.era_entropy_weight}, era_temperature='
              f'{config.era_temperature} (only λ=0, T=1 is SiLU)' if config.activation == 'era' else '')
    raise ValueError(f'cannot export to --format=hf: model.activation={config.activation!r}{detail}; '
                     "Llama's MLP uses SiLU (train with model.activation='silu'), or use --format=vesper")
  if config.use_bias:
    raise ValueError('cannot export to --format=hf: model.use_bias=True; Llama has no norm or output-head '
                     'biases, or use --format=vesper')
  if config.lora_targets:
    raise ValueError(f'cannot export to --format=hf: model.lora_targets={config.lora_targets!r}; merge the '
                     'adapters into the base weights first (flylora.merge), or use --format=vesper')
  if config.quantize:
    raise ValueError(f'cannot export to --format=hf: model.quantize={config.quantize!r}; the Llama layout '
                     'holds float weights (export the float model), or use --format=vesper')


def hf_config(config: ModelConfig, eos_id: int | None = None, bos_id: int | None = None) -> dict:
  """The `config.json` of the equivalent LlamaForCausalLM."""
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': config.vocab_size,
      'hidden_size': config.d_model,
      'intermediate_size': config.d_ff,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.kv_heads,
      'head_dim': config.head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': config.max_seq_len,
      'rms_norm_eps': config.norm_eps,
      'rope_theta': config.rope_theta,
      'rope_scaling': None,
      'attention_bias': False,
      'attention_dropout': 0.0,
      'mlp_bias': False,
      'tie_word_embeddings': config.tie_embeddings,
      'initializer_range': 0.02,
      'pretraining_tp': 1,
      'use_cache': True,
      'torch_dtype': 'float32',
      'bos_token_id': bos_id,
      'eos_token_id': eos_id,
  }


def to_hf_tensors(params: PyTree, config: ModelConfig) -> dict[str, np.ndarray]:
  """The parameter tree under Llama's names, `[out, in]`, the vocabulary cut to `vocab_size`."""
  check_llama_compatible(config)
  tensors = to_tensors(params)
  head = sorted(k for k in tensors if k.startswith(f'{metacog.NAME}.'))
  if head:  # not part of the language model: Llama has no place for it
    logging.warning('--format=hf leaves out the metacognition head (%s): LlamaForCausalLM has no place '
                    'for it; export with --format=vesper to keep it', ', '.join(head))
    tensors = {k: v for k, v in tensors.items() if k not in head}
  V = config.vocab_size
  hf = {'model.embed_tokens.weight': tensors.pop('embeddings.weight')[:V],
        'model.norm.weight': tensors.pop('final_norm.weight')}
  if not config.tie_embeddings:
    hf['lm_head.weight'] = tensors.pop('lm_head.weight')[:V]
  renames = {'attention.q_proj': 'self_attn.q_proj', 'attention.k_proj': 'self_attn.k_proj',
             'attention.v_proj': 'self_attn.v_proj', 'attention.o_proj': 'self_attn.o_proj',
             'ffn.gate_proj': 'mlp.gate_proj', 'ffn.up_proj': 'mlp.up_proj', 'ffn.down_proj': 'mlp.down_proj',
             'attention_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm'}
  for i in range(config.num_layers):
    for ours, theirs in renames.items():
      hf[f'model.layers.{i}.{theirs}.weight'] = tensors.pop(f'layers.{i}.{ours}.weight')
  if tensors:  # every tensor must have found its Llama name
    raise ValueError(f'cannot export to --format=hf: no Llama name for {sorted(tensors)}')
  return {k: np.ascontiguousarray(v) for k, v in hf.items()}


def export_hf(params: PyTree, config: ModelConfig, out_dir: str | os.PathLike,
              tokenizer_file: str | os.PathLike | None = None, eos_id: int | None = None,
              bos_id: int | None = None) -> list[pathlib.Path]:
  """Writes a Hugging Face Llama directory; returns the files written."""
  tensors = to_hf_tensors(params, config)  # refuses before anything is written
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'config.json').write_text(json.dumps(hf_config(config, eos_id, bos_id), indent=2) + '\n')
  write_safetensors(tensors, out_dir / WEIGHTS_FILE, {'format': 'pt'})
  written = [out_dir / 'config.json', out_dir / WEIGHTS_FILE]
  if tokenizer_file is not None:
    shutil.copyfile(tokenizer_file, out_dir / 'tokenizer.json')
    written.append(out_dir / 'tokenizer.json')
  return written


def export_workdir(workdir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
                   quantize_scheme: str = '', quantize_head: bool = False) -> list[pathlib.Path]:
  """Exports the latest checkpoint of a training workdir in `fmt` ('vesper' or 'hf'), quantized to
  `quantize_scheme` ('int8', 'int4'; vesper format only) when given."""
  from vesper_jax import checkpoint  # deferred: export's library part needs no orbax
  if quantize_scheme and fmt != 'vesper':
    raise ValueError(f'--quantize={quantize_scheme} needs --format=vesper (the {fmt} layout holds float '
                     'weights)')
  config, params, tokenizer = checkpoint.load_for_inference(workdir)
  if quantize_scheme:
    config, params = quantize.quantize_model(config, params, quantize_scheme, quantize_head=quantize_head)
  if fmt == 'hf':
    return export_hf(params, config, out_dir, tokenizer.path, tokenizer.eos_id, tokenizer.bos_id)
  if fmt != 'vesper':
    raise ValueError(f"unknown export format {fmt!r}: expected 'vesper' or 'hf'")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  save_safetensors(params, config, out_dir / WEIGHTS_FILE)
  shutil.copyfile(tokenizer.path, out_dir / 'tokenizer.json')
  return [out_dir / WEIGHTS_FILE, out_dir / 'tokenizer.json']


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required')
  for path in export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.quantize or '',
                            FLAGS.quantize_head):
    print(path)
  if FLAGS.push_to_hub:  # a HubError is a ValueError: one line, exit 1 (cli.run)
    print(f'pushed {FLAGS.out} to {hub.push(FLAGS.out, FLAGS.push_to_hub, private=FLAGS.private)}')


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A training workdir to export (its latest checkpoint).')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_enum('format', 'vesper', ['vesper', 'hf'], 'vesper: the original naming; '
                    'hf: a Hugging Face Llama directory (Llama-compatible models only).')
  flags.DEFINE_enum('quantize', None, list(quantize.SCHEMES), 'Write weight-only quantized projections '
                    '(int8: per output channel; int4: groups of 128 along the input, packed two per byte).')
  flags.DEFINE_bool('quantize_head', False, 'With --quantize, quantize the output head too.')
  flags.DEFINE_string('push_to_hub', None, 'Then upload --out to this Hugging Face model repo (OWNER/NAME; '
                     'created if missing; a token with write access: HF_TOKEN or `hf auth login`).')
  flags.DEFINE_bool('private', False, 'With --push_to_hub, create the repo as private.')


if __name__ == '__main__':
  cli.run('vesper_jax.export', main, define_flags)
