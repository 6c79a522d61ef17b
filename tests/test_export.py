"""Safetensors export (export.py): exact round trips, refusals that name the tensor, adapter files, the
one naming rule, the Hugging Face Llama layout checked against an independent numpy implementation of
transformers' Llama forward pass, and the entry point."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import REPO, make_workdir, random_adapters, tiny_model_config
from vesper_jax import checkpoint, export, flylora
from vesper_jax.model import ModelConfig, VesperLM, init_params



def _params(config: ModelConfig, seed: int = 0):
  """Initialised parameters with every leaf perturbed, so norms are not all ones and biases not zero."""
  params = init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


VARIANTS = {
    'default': {},
    'gqa_rms_tied_bias': dict(num_kv_heads=2, norm='rmsnorm', tie_embeddings=True, use_bias=True),
    'layernorm_bias': dict(use_bias=True),
    'flylora': dict(lora_targets='q,gate'),
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_round_trip_is_bit_exact(variant, tmp_path):
  config = tiny_model_config(**VARIANTS[variant])
  params = _params(config)
  path = tmp_path / 'model.safetensors'
  export.save_safetensors(params, config, path)
  _assert_trees_equal(export.load_safetensors(path, config), params)
  _assert_trees_equal(export.load_safetensors(path), params)  # the config from the file's metadata
  # The weights' config, with the platform of the process that loads it (platforms.py): never stored.
  assert export.config_from_safetensors(path) == config.replace(platform='cpu')
  assert 'platform' not in json.loads(export.read_safetensors(path, tensors=False)[0]['model_config'])


def test_names_and_orientation_follow_the_spec(tmp_path):
  config = tiny_model_config()  # 2 layers, d_model 128, d_ff 384, vocab 4096
  params = _params(config)
  path = tmp_path / 'model.safetensors'
  export.save_safetensors(params, config, path)
  tensors = load_file(path)
  D, F, V = 128, 384, 4096
  want = {'embeddings.weight': (V, D), 'final_norm.weight': (D,), 'lm_head.weight': (V, D)}
  for i in range(2):
    want.update({f'layers.{i}.attention.{p}_proj.weight': (D, D) for p in 'qkvo'})
    want.update({f'layers.{i}.attention_norm.weight': (D,), f'layers.{i}.ffn_norm.weight': (D,),
                 f'layers.{i}.ffn.gate_proj.weight': (F, D), f'layers.{i}.ffn.up_proj.weight': (F, D),
                 f'layers.{i}.ffn.down_proj.weight': (D, F)})
  assert {k: v.shape for k, v in tensors.items()} == want
  # [out, in]: x @ kernel == x @ weight.T
  np.testing.assert_array_equal(tensors['layers.1.ffn.up_proj.weight'],
                                np.asarray(params['layers_1']['ffn']['up_proj']['kernel']).T)
  np.testing.assert_array_equal(tensors['embeddings.weight'], np.asarray(params['embeddings']['embedding']))
  with safe_open(str(path), framework='numpy') as f:
    assert f.metadata()['format'] == 'vesper_jax'


def test_vesper_name_is_one_rule_for_model_and_adapter_tensors():
  assert export.vesper_name(('layers_3', 'attention', 'q_proj', 'kernel')) == 'layers.3.attention.q_proj.weight'
  assert export.vesper_name(('layers_12', 'ffn_norm', 'scale')) == 'layers.12.ffn_norm.weight'
  assert export.vesper_name(('layers_0', 'ffn', 'up_proj', 'bias')) == 'layers.0.ffn.up_proj.bias'
  assert export.vesper_name(('embeddings', 'embedding')) == 'embeddings.weight'
  assert export.vesper_name(('lm_head', 'kernel')) == 'lm_head.weight'
  assert export.vesper_name(('layers_3', 'ffn', 'up_proj', 'lora_b')) == 'layers.3.ffn.up_proj.lora_b'


def test_model_file_and_adapter_file_share_names_and_values(tmp_path):
  config = tiny_model_config(lora_targets='q,gate')
  params = random_adapters(_params(config))
  export.save_safetensors(params, config, tmp_path / 'm.safetensors')
  shapes = export.export_adapters(params, config, tmp_path / 'a.safetensors')
  model_tensors, adapter_tensors = load_file(tmp_path / 'm.safetensors'), load_file(tmp_path / 'a.safetensors')
  assert shapes == {k: v.shape for k, v in adapter_tensors.items()}
  assert set(adapter_tensors) == {f'layers.{i}.{m}.{t}' for i in range(2)
                                  for m in ('attention.q_proj', 'ffn.gate_proj')
                                  for t in ('lora_a', 'lora_b', 'expert_bias')}
  # The adapter file is exactly the adapter part of the model file: same names, same values.
  assert {k for k in model_tensors if k.split('.')[-1] in flylora.ADAPTER_LEAVES} == set(adapter_tensors)
  for name, value in adapter_tensors.items():
    np.testing.assert_array_equal(value, model_tensors[name], err_msg=name)
  assert adapter_tensors['layers.0.attention.q_proj.lora_a'].shape == (32, 128)   # Aᵀ [r, in]
  assert adapter_tensors['layers.0.ffn.gate_proj.lora_b'].shape == (384, 32)      # Bᵀ [out, r]
  np.testing.assert_array_equal(adapter_tensors['layers.0.ffn.gate_proj.lora_b'],
                                np.asarray(params['layers_0']['ffn']['gate_proj']['lora_b']).T)
  assert adapter_tensors['layers.1.ffn.gate_proj.expert_bias'].shape == (32,)
  with safe_open(str(tmp_path / 'a.safetensors'), framework='numpy') as f:
    assert f.metadata()['format'] == export.ADAPTER_FORMAT
  with pytest.raises(ValueError, match='no adapters'):
    export.export_adapters(_params(tiny_model_config()), tiny_model_config(), tmp_path / 'none.safetensors')


def _adapted(config: ModelConfig):
  """(the plain base's params, the adapted model's params over that base with random adapters)."""
  base = init_params(config.replace(lora_targets=''), jax.random.key(0))
  return base, random_adapters(flylora.graft_base(init_params(config, jax.random.key(100)), base))


@pytest.mark.parametrize('mode', ['flylora', 'lora'])
def test_adapters_export_and_load_back_onto_a_base(tmp_path, mode):
  cfg = tiny_model_config(lora_targets='q,down', lora_rank=8, lora_k=2, lora_mode=mode, lora_seed=5, vocab_size=300)
  base, params = _adapted(cfg)
  path = str(tmp_path / 'adapters.safetensors')
  shapes = export.export_adapters(params, cfg, path)
  per_layer = {'lora_a', 'lora_b'} | ({'expert_bias'} if mode == 'flylora' else set())
  assert set(shapes) == {f'layers.{i}.{m}.{t}' for i in range(2)
                         for m in ('attention.q_proj', 'ffn.down_proj') for t in per_layer}
  assert shapes['layers.1.ffn.down_proj.lora_a'] == (8, cfg.d_ff)     # Aᵀ: [r, in]
  assert shapes['layers.1.ffn.down_proj.lora_b'] == (cfg.d_model, 8)  # Bᵀ: [out, r]

  loaded, loaded_cfg = export.load_adapters(path, base, cfg.replace(lora_targets='', lora_mode='lora',
                                                                    lora_rank=4, lora_seed=0))
  assert loaded_cfg == cfg  # the file's lora_* settings, the base's other fields
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(VesperLM(loaded_cfg).apply({'params': loaded}, tokens)),
                                np.asarray(VesperLM(cfg).apply({'params': params}, tokens)))


def test_load_adapters_refuses_mismatches_by_name(tmp_path):
  cfg = tiny_model_config(lora_targets='up', lora_rank=8, lora_k=2, vocab_size=300)
  base, params = _adapted(cfg)
  path = str(tmp_path / 'a.safetensors')
  export.export_adapters(params, cfg, path)
  with safe_open(path, framework='numpy') as f:
    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

  def rewrite(name, metadata=meta, **changes):
    t = dict(tensors)
    t.update(changes)
    t.pop(name, None)
    p = str(tmp_path / 'bad.safetensors')
    save_file(t, p, metadata=metadata)
    return p

  plain_cfg = cfg.replace(lora_targets='')
  with pytest.raises(ValueError, match=r'missing tensor layers\.1\.ffn\.up_proj\.lora_b'):
    export.load_adapters(rewrite('layers.1.ffn.up_proj.lora_b'), base, plain_cfg)
  with pytest.raises(ValueError, match=r'layers\.0\.ffn\.up_proj\.lora_a is float32\[3, 3\]'):
    export.load_adapters(rewrite('', **{'layers.0.ffn.up_proj.lora_a': np.zeros((3, 3), np.float32)}),
                         base, plain_cfg)
  with pytest.raises(ValueError, match=r'unexpected tensor layers\.0\.ffn\.gate_proj\.lora_a'):
    export.load_adapters(rewrite('', **{'layers.0.ffn.gate_proj.lora_a': np.zeros((8, 128), np.float32)}),
                         base, plain_cfg)
  with pytest.raises(ValueError, match=r"adapter metadata lacks \['lora_rank'\]"):
    export.load_adapters(rewrite('', metadata={k: v for k, v in meta.items() if k != 'lora_rank'}),
                         base, plain_cfg)
  with pytest.raises(ValueError, match='model.lora_k=2 must be in'):  # the settings are validated
    export.load_adapters(rewrite('', metadata={**meta, 'lora_rank': '1'}), base, plain_cfg)
  with pytest.raises(ValueError, match='already has adapters'):
    export.load_adapters(path, params, cfg)
  plain = str(tmp_path / 'plain.safetensors')
  save_file({'x': np.zeros(2, np.float32)}, plain)
  with pytest.raises(ValueError, match='not a vesper_jax adapter file'):
    export.load_adapters(plain, base, plain_cfg)


def _rewrite(path, change):
  tensors = load_file(path)
  with safe_open(str(path), framework='numpy') as f:
    metadata = f.metadata()
  change(tensors)
  save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize('change, messages', [
    (lambda t: t.__setitem__('layers.0.attention.q_projection.weight', t.pop('layers.0.attention.q_proj.weight')),
     ['missing tensor layers.0.attention.q_proj.weight', 'unexpected tensor layers.0.attention.q_projection.weight']),
    (lambda t: t.__setitem__('layers.1.ffn.up_proj.weight', t['layers.1.ffn.up_proj.weight'].T.copy()),
     ['tensor layers.1.ffn.up_proj.weight is float32[128, 384], expected float32[384, 128]']),
    (lambda t: t.__setitem__('final_norm.weight', t['final_norm.weight'].reshape(2, 64)),
     ['tensor final_norm.weight is float32[2, 64], expected float32[128]']),
    (lambda t: t.__setitem__('lm_head.weight', t['lm_head.weight'].astype(np.float16)),
     ['tensor lm_head.weight is float16[4096, 128], expected float32[4096, 128]']),
    (lambda t: t.pop('layers.1.ffn_norm.weight'), ['missing tensor layers.1.ffn_norm.weight']),
    (lambda t: t.__setitem__('extra.weight', np.zeros(3, np.float32)), ['unexpected tensor extra.weight']),
])
def test_load_refuses_a_mismatch_naming_the_tensor(change, messages, tmp_path):
  config = tiny_model_config()
  path = tmp_path / 'model.safetensors'
  export.save_safetensors(_params(config), config, path)
  _rewrite(path, change)
  with pytest.raises(ValueError) as error:
    export.load_safetensors(path, config)
  for message in messages:
    assert message in str(error.value)


def test_load_refuses_a_file_for_another_config(tmp_path):
  export.save_safetensors(_params(tiny_model_config()), tiny_model_config(), tmp_path / 'm.safetensors')
  with pytest.raises(ValueError, match=r'layers.0.ffn.gate_proj.weight is float32\[384, 128\], expected '
                                       r'float32\[256, 128\]'):
    export.load_safetensors(tmp_path / 'm.safetensors', tiny_model_config(d_ff=256))


def test_config_from_a_file_with_an_unknown_field_names_the_file(tmp_path):
  path = tmp_path / 'm.safetensors'
  export.save_safetensors(_params(tiny_model_config()), tiny_model_config(), path)
  with safe_open(str(path), framework='numpy') as f:
    metadata = f.metadata()
  metadata['model_config'] = json.dumps({**json.loads(metadata['model_config']), 'qk_norm': True})
  save_file(load_file(path), str(path), metadata=metadata)  # as a newer version might write it
  with pytest.raises(ValueError, match=f"{path}: the model_config .*qk_norm"):
    export.load_safetensors(path)


# ------------------------------------------------------------------------------ Hugging Face Llama

def _llama_forward(tensors: dict, hf: dict, tokens: np.ndarray) -> np.ndarray:
  """transformers' LlamaForCausalLM forward pass in numpy float64, written from its modeling code."""
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  N, K, H = hf['num_attention_heads'], hf['num_key_value_heads'], hf['head_dim']
  eps, T = hf['rms_norm_eps'], len(tokens)

  def rms_norm(x, weight):  # LlamaRMSNorm
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

  def rotate_half(x):
    return np.concatenate([-x[..., H // 2:], x[..., :H // 2]], axis=-1)

  inv_freq = 1.0 / hf['rope_theta'] ** (np.arange(0, H, 2) / H)  # LlamaRotaryEmbedding
  freqs = np.outer(np.arange(T), inv_freq)
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
  x = w['model.embed_tokens.weight'][tokens]
  causal = np.tril(np.ones((T, T), bool))
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}.'
    h = rms_norm(x, w[p + 'input_layernorm.weight'])
    q = (h @ w[p + 'self_attn.q_proj.weight'].T).reshape(T, N, H)
    k = (h @ w[p + 'self_attn.k_proj.weight'].T).reshape(T, K, H)
    v = (h @ w[p + 'self_attn.v_proj.weight'].T).reshape(T, K, H)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)  # repeat_kv
    scores = np.einsum('tnh,snh->nts', q, k) / np.sqrt(H)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum('nts,snh->tnh', probs, v).reshape(T, N * H)
    x = x + attn @ w[p + 'self_attn.o_proj.weight'].T
    h = rms_norm(x, w[p + 'post_attention_layernorm.weight'])
    gate, up = h @ w[p + 'mlp.gate_proj.weight'].T, h @ w[p + 'mlp.up_proj.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + 'mlp.down_proj.weight'].T
  x = rms_norm(x, w['model.norm.weight'])
  head = w['model.embed_tokens.weight'] if hf['tie_word_embeddings'] else w['lm_head.weight']
  return x @ head.T


@pytest.mark.parametrize('overrides', [
    dict(norm='rmsnorm', activation='silu'),
    dict(norm='rmsnorm', activation='era', era_entropy_weight=0.0, num_kv_heads=2, tie_embeddings=True,
         vocab_size=1000, rope_theta=500.0),
])
def test_hf_export_matches_a_numpy_llama(overrides, tmp_path):
  config = tiny_model_config(**overrides)
  params = _params(config)
  export.export_hf(params, config, tmp_path, eos_id=0)
  hf = json.loads((tmp_path / 'config.json').read_text())
  tensors = load_file(tmp_path / 'model.safetensors')
  L, D, F, V, H = config.num_layers, config.d_model, config.d_ff, config.vocab_size, config.head_dim
  KH = config.kv_heads * H
  want = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
  if not config.tie_embeddings:
    want['lm_head.weight'] = (V, D)
  for i in range(L):
    p = f'model.layers.{i}.'
    want.update({p + 'self_attn.q_proj.weight': (D, D), p + 'self_attn.k_proj.weight': (KH, D),
                 p + 'self_attn.v_proj.weight': (KH, D), p + 'self_attn.o_proj.weight': (D, D),
                 p + 'mlp.gate_proj.weight': (F, D), p + 'mlp.up_proj.weight': (F, D),
                 p + 'mlp.down_proj.weight': (D, F), p + 'input_layernorm.weight': (D,),
                 p + 'post_attention_layernorm.weight': (D,)})
  assert {k: v.shape for k, v in tensors.items()} == want
  assert (hf['model_type'], hf['hidden_act'], hf['vocab_size'], hf['num_key_value_heads']) == \
         ('llama', 'silu', V, config.kv_heads)
  with safe_open(str(tmp_path / 'model.safetensors'), framework='numpy') as f:
    assert f.metadata() == {'format': 'pt'}  # what transformers expects of a PyTorch safetensors file

  tokens = np.array([3, 17, 900, 42, 7, 7, 250, 1, 0, 64], np.int32)
  ours = np.asarray(VesperLM(config).apply({'params': params}, jnp.asarray(tokens)[None]))[0]
  theirs = _llama_forward(tensors, hf, tokens)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  assert np.abs(theirs).max() > 0.1  # the logits are not trivially small


@pytest.mark.parametrize('overrides, option', [
    ({}, "model.norm='layernorm'"),
    (dict(norm='rmsnorm'), "model.activation='era' with era_entropy_weight=0.1"),
    (dict(norm='rmsnorm', activation='era', era_entropy_weight=0.0, era_temperature=2.0),
     'era_temperature=2.0'),
    (dict(norm='rmsnorm', activation='gelu'), "model.activation='gelu'"),
    (dict(norm='rmsnorm', activation='silu', use_bias=True), 'model.use_bias=True'),
    (dict(norm='rmsnorm', activation='silu', lora_targets='q'), "model.lora_targets='q'"),
])
def test_hf_export_refuses_what_llama_cannot_express(overrides, option, tmp_path):
  config = tiny_model_config(**overrides)
  with pytest.raises(ValueError, match='cannot export to --format=hf') as error:
    export.export_hf(_params(config), config, tmp_path / 'out')
  assert option in str(error.value)
  assert not (tmp_path / 'out').exists()  # refused before writing anything


# ------------------------------------------------------------------------------ the entry point

def _export_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'vesper_jax.export', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_export_cli_from_a_workdir(tmp_path):
  workdir = make_workdir(tmp_path / 'run', norm='rmsnorm', activation='silu')
  result = _export_cli(f'--workdir={workdir}', f'--out={tmp_path / "vesper"}', '--format=vesper')
  assert result.returncode == 0, result.stderr[-2000:]
  config, params, _ = checkpoint.load_for_inference(workdir)
  _assert_trees_equal(export.load_safetensors(tmp_path / 'vesper' / 'model.safetensors', config), params)
  assert (tmp_path / 'vesper' / 'tokenizer.json').is_file()

  result = _export_cli(f'--workdir={workdir}', f'--out={tmp_path / "hf"}', '--format=hf')
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'model.safetensors', 'tokenizer.json']
  assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['eos_token_id'] == 0

  layernorm = make_workdir(tmp_path / 'run_ln')
  result = _export_cli(f'--workdir={layernorm}', f'--out={tmp_path / "hf2"}', '--format=hf')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert "vesper_jax.export: error: cannot export to --format=hf: model.norm='layernorm'" in result.stderr
  assert not (tmp_path / 'hf2').exists()


def test_written_files_follow_the_umask_and_broken_files_are_named(tmp_path):
  params = init_params(tiny_model_config(), jax.random.key(0))
  old = os.umask(0o022)
  try:
    export.save_safetensors(params, tiny_model_config(), tmp_path / 'm.safetensors')
  finally:
    os.umask(old)
  assert os.stat(tmp_path / 'm.safetensors').st_mode & 0o777 == 0o644  # safetensors alone writes 0600
  whole = (tmp_path / 'm.safetensors').read_bytes()
  for name, content in (('empty', b''), ('torn', whole[:len(whole) // 2]), ('flipped', b'\xff' + whole[1:])):
    (tmp_path / f'{name}.safetensors').write_bytes(content)
    with pytest.raises(ValueError, match=f'{tmp_path / name}.safetensors: not a readable safetensors file'):
      export.load_safetensors(tmp_path / f'{name}.safetensors', tiny_model_config())
