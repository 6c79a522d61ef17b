"""VesperLM (model.py): causality, RoPE, KV-cache decoding, parameter counts, the compute dtype and
cast_for_inference, and the weight-defining fields that decide resumes and fine-tuning bases (SPEC §3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import decode_stepwise, load_config, naive_greedy, tiny_model, tiny_model_config
from vesper_jax import attention_cpu
from vesper_jax import decode
from vesper_jax import model as M
from vesper_jax.sampling import GREEDY


def _params(cfg: M.ModelConfig, seed: int = 0):
  return M.init_params(cfg, jax.random.key(seed))


@pytest.mark.parametrize('overrides', [{}, {'num_kv_heads': 2, 'norm': 'rmsnorm', 'use_bias': True}])
def test_future_tokens_never_change_past_logits(overrides):
  cfg = tiny_model_config(**overrides)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  t = 9
  changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % cfg.vocab_size)
  apply = jax.jit(M.VesperLM(cfg).apply)
  a = np.asarray(apply({'params': params}, tokens))
  b = np.asarray(apply({'params': params}, changed))
  np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])  # bitwise in float32
  assert not np.array_equal(a[:, t + 1:], b[:, t + 1:])      # and the future did change


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 32))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))

  def score(i, j):
    qi = M.apply_rope(q, jnp.array([[i]]))
    kj = M.apply_rope(k, jnp.array([[j]]))
    return float(jnp.sum(qi * kj))

  base = score(5, 2)
  for shift in (1, 17, 100):
    np.testing.assert_allclose(score(5 + shift, 2 + shift), base, rtol=1e-4, atol=1e-5)
  assert abs(score(5, 2) - score(5, 3)) > 1e-3  # the score does depend on i − j


def test_rope_rotates_split_halves():
  # Split-half convention: dims (d, d + H/2) rotate together by angle pos·theta^(−2d/H).
  x = jnp.zeros((1, 1, 1, 8)).at[..., 1].set(1.0)
  out = np.asarray(M.apply_rope(x, jnp.array([[3]]), theta=10000.0))[0, 0, 0]
  angle = 3 * 10000.0 ** (-1 / 4)
  expected = np.zeros(8)
  expected[1], expected[5] = np.cos(angle), np.sin(angle)
  np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize('num_kv_heads', [None, 2, 1])
def test_kv_cache_decoding_equals_full_forward(num_kv_heads):
  cfg = tiny_model_config(num_kv_heads=num_kv_heads)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, cfg.vocab_size)
  full = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens))
  stepwise = np.asarray(decode_stepwise(cfg, params, tokens, prompt_len=7))
  np.testing.assert_allclose(stepwise, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_greedy_tokens_equal_full_forward():
  cfg = tiny_model_config(num_kv_heads=2)
  params = _params(cfg, seed=3)
  prompt = jax.random.randint(jax.random.key(4), (1, 5), 0, cfg.vocab_size)
  # Cached greedy, with the model's own cache API (decode.py's generate is tested in test_decode.py).
  dec = M.VesperLM(cfg.replace(decode=True))
  cache = M.init_cache(cfg, 1, 32)
  step = jax.jit(lambda c, tok, pos: dec.apply({'params': params, 'cache': c}, tok, positions_BT=pos,
                                               mutable=['cache']))
  logits, v = step(cache, prompt, jnp.arange(5)[None])
  out = [int(jnp.argmax(logits[0, -1]))]
  for i in range(11):
    logits, v = step(v['cache'], jnp.array([[out[-1]]]), jnp.array([[5 + i]]))
    out.append(int(jnp.argmax(logits[0, -1])))
  assert out == naive_greedy(cfg, params, prompt[0].tolist(), 12)
  assert len(set(out)) > 3


def test_padded_vocabulary_and_logit_shape():
  cfg = tiny_model_config(vocab_size=1000)
  assert cfg.padded_vocab_size == 1024
  params = _params(cfg)
  assert params['embeddings']['embedding'].shape == (1024, cfg.d_model)
  logits = M.VesperLM(cfg).apply({'params': params}, jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 1000) and logits.dtype == jnp.float32


def test_tied_embeddings_have_no_head():
  cfg = tiny_model_config(tie_embeddings=True)
  params = _params(cfg)
  assert 'lm_head' not in params
  counts = M.param_counts(params)
  assert counts['embedding'] == cfg.padded_vocab_size * cfg.d_model


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """The operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        out += _dot_operand_dtypes(inner)
  return out


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny_model_config(dtype='bfloat16')
  params = _params(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  # Every matmul really runs in bfloat16: 7 projections and 2 attention products per layer (per head
  # group and causal block on CPU: one block of 64 holds these 16 positions), and the head.
  dots = _dot_operand_dtypes(jax.make_jaxpr(
      lambda p, t: M.VesperLM(cfg).apply({'params': p}, t))(params, tokens).jaxpr)
  attention_products = 2 * (attention_cpu._parallel_groups(tokens.shape[0]) if cfg.runs_on == 'cpu' else 1)
  assert len(dots) == (7 + attention_products) * cfg.num_layers + 1
  assert all(d == ('bfloat16', 'bfloat16') for d in dots), dots
  f32_dots = _dot_operand_dtypes(jax.make_jaxpr(
      lambda p, t: M.VesperLM(cfg.replace(dtype='float32')).apply({'params': p}, t))(params, tokens).jaxpr)
  assert all(d == ('float32', 'float32') for d in f32_dots)
  # The logits come back in float32, close to the float32 model's but not equal to them.
  logits = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens))
  want = np.asarray(M.VesperLM(cfg.replace(dtype='float32')).apply({'params': params}, tokens))
  assert logits.dtype == np.float32
  assert 1e-4 < np.abs(logits - want).max() < 0.05 * np.abs(want).max()


def test_cast_for_inference_stores_the_weights_in_bfloat16():
  config, params = tiny_model()
  config16, params16 = M.cast_for_inference(config, params, 'bfloat16')
  assert config16 == config.replace(dtype='bfloat16')
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # the originals are untouched
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]])
  logits16 = np.asarray(M.VesperLM(config16).apply({'params': params16}, tokens))
  # bfloat16 compute already rounds each weight to bfloat16 as it reads it: storing them so changes
  # nothing but the bytes, so the logits equal those of bfloat16 compute over float32 weights, bit for bit.
  np.testing.assert_array_equal(logits16, np.asarray(M.VesperLM(config16).apply({'params': params}, tokens)))
  assert np.abs(logits16 - np.asarray(M.VesperLM(config).apply({'params': params}, tokens))).max() > 1e-4
  # And decoding runs on the cast tree (a bfloat16 KV cache) with the same tokens.
  out16 = decode.generate(params16, config16, [[1, 2, 3]], max_new_tokens=8, sampling=GREEDY)
  assert out16 == decode.generate(params, config16, [[1, 2, 3]], max_new_tokens=8, sampling=GREEDY)
  assert len(out16[0]) == 8


def test_bad_config_is_refused_with_the_key():
  with pytest.raises(ValueError, match='num_kv_heads'):
    tiny_model_config(num_kv_heads=3)
  with pytest.raises(ValueError, match='activation'):
    tiny_model_config(activation='relu')


def test_param_counts_of_the_four_configs(capsys):
  """Counts from the real (abstract) trees with a 32,000-token vocabulary; printed for the README."""
  rows = {}
  for name in ('tiny', 'small', 'medium', 'large'):
    cfg = M.ModelConfig(**load_config(name).model).replace(vocab_size=32000)
    rows[name] = M.abstract_param_counts(cfg)
  with capsys.disabled():
    for name, c in rows.items():
      print(f"\n{name:>7}: total {c['total']:>11,}  embedding {c['embedding']:>11,}  "
            f"non-embedding {c['non_embedding']:>11,}")
  # medium: 12 × (4·768² + 3·768·2048) + norms ≈ 85M non-embedding (SPEC §3).
  assert 84e6 < rows['medium']['non_embedding'] < 86e6
  d, f, layers = 768, 2048, 12
  assert rows['medium']['non_embedding'] == layers * (4 * d * d + 3 * d * f + 2 * d) + d
  assert rows['medium']['embedding'] == 2 * 32000 * 768
  assert rows['tiny']['non_embedding'] < rows['small']['non_embedding'] < rows['large']['non_embedding']


def test_last_only_logits_equal_the_last_row_of_the_full_forward():
  cfg = tiny_model_config(num_kv_heads=2)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
  full = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens))
  last = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens, last_only=True))
  assert last.shape == (2, 1, cfg.vocab_size)
  np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ weight-defining fields

def test_runtime_and_weight_fields_partition_the_config():
  import dataclasses
  names = {f.name for f in dataclasses.fields(M.ModelConfig)}
  assert set(M.RUNTIME_FIELDS) | set(M.WEIGHT_FIELDS) == names
  assert not set(M.RUNTIME_FIELDS) & set(M.WEIGHT_FIELDS)
  assert {'dtype', 'remat', 'attention_impl', 'max_seq_len'} <= set(M.RUNTIME_FIELDS)
  assert {'d_model', 'activation', 'norm', 'vocab_size', 'rope_theta', 'lora_rank'} <= set(M.WEIGHT_FIELDS)
  assert set(M.ADAPTER_FIELDS) == {f for f in M.WEIGHT_FIELDS if f.startswith('lora_')}
  assert 'lora_bias_rate' not in M.ADAPTER_FIELDS  # a training-rate setting, not a weight


def test_weight_changes_names_only_what_changes_the_weights():
  cfg = tiny_model_config()
  assert M.weight_changes(cfg, cfg.replace(dtype='bfloat16', remat=True, attention_impl='xla',
                                           max_seq_len=512)) == []
  assert M.weight_changes(cfg, cfg.replace(d_model=256, activation='silu')) == [
      ('d_model', 128, 256), ('activation', 'era', 'silu')]
  adapted = cfg.replace(lora_targets='q', lora_rank=8, lora_k=2)
  assert M.weight_changes(cfg, adapted, fields=M.ADAPTER_FIELDS) == [
      ('lora_targets', '', 'q'), ('lora_rank', 32, 8), ('lora_k', 8, 2)]


@pytest.mark.parametrize('num_kv_heads,padded,block_tokens', [
    (None, False, 64), (None, False, 5), (2, True, 4), (1, True, 5), (4, True, 3)])
def test_cpu_attention_equals_dot_product_attention(num_kv_heads, padded, block_tokens):
  # The CPU formulation (causal blocks, head groups, a hand-written backward): its output and all three
  # gradients against jax.nn.dot_product_attention's XLA version, with grouped-query heads, padded keys,
  # one block (64 > T), uneven blocks (12 positions padded to 3 blocks of 5) and even ones (4 or 3 each).
  B, T, N, H = 2, 12, 4, 8
  K = num_kv_heads or N
  keys = jax.random.split(jax.random.key(6), 5)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k, v = jax.random.normal(keys[1], (B, T, K, H)), jax.random.normal(keys[2], (B, T, K, H))
  weights = jax.random.normal(keys[3], (B, T, N, H))  # a loss that weighs every output differently
  mask = (jax.random.uniform(keys[4], (B, T)) < 0.7).at[:, 0].set(True) if padded else None

  def loss(attention, *qkv):
    return jnp.sum(attention(*qkv) * weights)

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :],
                                        is_causal=True, implementation='xla')

  ours = lambda q, k, v: attention_cpu.causal_attention(q, k, v, mask, block_tokens=block_tokens,
                                                        kernel=False)
  np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=2e-6)
  for got, want in zip(jax.grad(functools.partial(loss, ours), (0, 1, 2))(q, k, v),
                       jax.grad(functools.partial(loss, reference), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cpu_attention_head_groups_change_nothing(monkeypatch):
  # The sequences are split into independent groups (one per core) only for speed: 1, 2 and 4 groups
  # give the same output and gradients (to float32 rounding: the dot kernels tile a batch differently).
  B, T, N, H = 4, 16, 4, 8
  q, k, v, w = (jax.random.normal(key, (B, T, N, H)) for key in jax.random.split(jax.random.key(3), 4))
  results = []
  for groups in (1, 2, 4):
    monkeypatch.setattr(attention_cpu, '_parallel_groups', lambda B, groups=groups: groups)
    f = lambda q, k, v: jnp.sum(attention_cpu.causal_attention(q, k, v, block_tokens=8, kernel=False) * w)
    results.append(jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v))
  for other in results[1:]:
    for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(results[0])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('overrides', [{}, {'tie_embeddings': True}, {'use_bias': True, 'vocab_size': 1000}])
def test_hidden_states_through_head_weights_are_the_logits(overrides):
  # The fused loss (losses.head_cross_entropy_and_entropy) applies the head itself from these two.
  cfg = tiny_model_config(**overrides)
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, cfg.vocab_size)
  logits = M.VesperLM(cfg).apply({'params': params}, tokens)
  x = M.VesperLM(cfg).apply({'params': params}, tokens, return_hidden=True)
  kernel, bias = M.VesperLM(cfg).head_weights(params)
  assert kernel.shape == (cfg.d_model, cfg.vocab_size) and (bias is None) == (not cfg.use_bias)
  np.testing.assert_allclose(x @ kernel + (0 if bias is None else bias), logits, atol=1e-5, rtol=1e-5)


def test_auto_attention_is_cudnn_for_half_precision_training_on_gpu_only():
  cfg = tiny_model_config(dtype='bfloat16')  # head_dim 32
  assert M.attention_implementation(cfg, unmasked=True) is None  # CPU: the model's own CPU attention
  assert M.attention_implementation(cfg.replace(platform='cpu'), unmasked=True) is None
  cfg = cfg.replace(platform='gpu')  # the rule only; nothing runs
  assert M.attention_implementation(cfg, unmasked=True) == 'cudnn'
  assert M.attention_implementation(cfg, unmasked=False) is None  # padding masks stay on XLA
  assert M.attention_implementation(cfg.replace(dtype='float32'), unmasked=True) is None
  assert M.attention_implementation(cfg.replace(attention_impl='xla'), unmasked=True) == 'xla'
