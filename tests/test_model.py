"""VesperLM: causality, RoPE, KV-cache decoding, parameter counts (SPEC §3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vesper_jax import model as M


def _tiny(**overrides) -> M.ModelConfig:
  return M.ModelConfig(**load_config('tiny').model).replace(**overrides)


def _params(cfg: M.ModelConfig, seed: int = 0):
  return M.init_params(cfg, jax.random.key(seed))


@pytest.mark.parametrize('overrides', [{}, {'num_kv_heads': 2, 'norm': 'rmsnorm', 'use_bias': True}])
def test_future_tokens_never_change_past_logits(overrides):
  cfg = _tiny(**overrides)
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


def _decode_stepwise(cfg, params, tokens, prompt_len):
  B, T = tokens.shape
  dec = M.VesperLM(cfg.replace(decode=True))
  cache = M.init_cache(cfg, B, T + 4)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  step = jax.jit(lambda c, tok, pos: dec.apply({'params': params, 'cache': c}, tok, positions_BT=pos,
                                               mutable=['cache']))
  logits, variables = step(cache, tokens[:, :prompt_len], positions[:, :prompt_len])
  outs = [logits]
  for t in range(prompt_len, T):
    logits, variables = step(variables['cache'], tokens[:, t:t + 1], positions[:, t:t + 1])
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize('num_kv_heads', [None, 2, 1])
def test_kv_cache_decoding_equals_full_forward(num_kv_heads):
  cfg = _tiny(num_kv_heads=num_kv_heads)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, cfg.vocab_size)
  full = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens))
  stepwise = np.asarray(_decode_stepwise(cfg, params, tokens, prompt_len=7))
  np.testing.assert_allclose(stepwise, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_greedy_tokens_equal_full_forward():
  cfg = _tiny(num_kv_heads=2)
  params = _params(cfg, seed=3)
  apply = jax.jit(M.VesperLM(cfg).apply)
  prompt = jax.random.randint(jax.random.key(4), (1, 5), 0, cfg.vocab_size)
  # Naive greedy: recompute the whole sequence for every new token.
  seq = prompt
  for _ in range(12):
    nxt = jnp.argmax(apply({'params': params}, seq)[:, -1], axis=-1)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  # Cached greedy.
  dec = M.VesperLM(cfg.replace(decode=True))
  cache = M.init_cache(cfg, 1, 32)
  step = jax.jit(lambda c, tok, pos: dec.apply({'params': params, 'cache': c}, tok, positions_BT=pos,
                                               mutable=['cache']))
  logits, v = step(cache, prompt, jnp.arange(5)[None])
  out = [int(jnp.argmax(logits[0, -1]))]
  for i in range(11):
    logits, v = step(v['cache'], jnp.array([[out[-1]]]), jnp.array([[5 + i]]))
    out.append(int(jnp.argmax(logits[0, -1])))
  assert out == [int(t) for t in seq[0, 5:]]


def test_padded_vocabulary_and_logit_shape():
  cfg = _tiny(vocab_size=1000)
  assert cfg.padded_vocab_size == 1024
  params = _params(cfg)
  assert params['embeddings']['embedding'].shape == (1024, cfg.d_model)
  logits = M.VesperLM(cfg).apply({'params': params}, jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 1000) and logits.dtype == jnp.float32


def test_tied_embeddings_have_no_head():
  cfg = _tiny(tie_embeddings=True)
  params = _params(cfg)
  assert 'lm_head' not in params
  counts = M.param_counts(params)
  assert counts['embedding'] == cfg.padded_vocab_size * cfg.d_model


def test_bfloat16_compute_keeps_float32_params():
  cfg = _tiny(dtype='bfloat16')
  params = _params(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = M.VesperLM(cfg).apply({'params': params}, jnp.ones((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_bad_config_is_refused_with_the_key():
  with pytest.raises(ValueError, match='num_kv_heads'):
    _tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match='activation'):
    _tiny(activation='relu')


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
  cfg = _tiny(num_kv_heads=2)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
  full = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens))
  last = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens, last_only=True))
  assert last.shape == (2, 1, cfg.vocab_size)
  np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('num_kv_heads,padded', [(None, False), (2, True), (1, True)])
def test_cpu_attention_equals_dot_product_attention(num_kv_heads, padded):
  # The CPU formulation has a hand-written backward: check its output and all three gradients against
  # jax.nn.dot_product_attention's XLA version, with grouped-query heads and padded keys.
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

  ours = lambda q, k, v: M.causal_attention_cpu(q, k, v, mask)
  np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=2e-6)
  for got, want in zip(jax.grad(functools.partial(loss, ours), (0, 1, 2))(q, k, v),
                       jax.grad(functools.partial(loss, reference), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('overrides', [{}, {'tie_embeddings': True}, {'use_bias': True, 'vocab_size': 1000}])
def test_hidden_states_through_head_weights_are_the_logits(overrides):
  # The fused loss (losses.head_cross_entropy_and_entropy) applies the head itself from these two.
  cfg = _tiny(**overrides)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, cfg.vocab_size)
  logits = M.VesperLM(cfg).apply({'params': params}, tokens)
  x = M.VesperLM(cfg).apply({'params': params}, tokens, return_hidden=True)
  kernel, bias = M.VesperLM(cfg).head_weights(params)
  assert kernel.shape == (cfg.d_model, cfg.vocab_size) and (bias is None) == (not cfg.use_bias)
  np.testing.assert_allclose(x @ kernel + (0 if bias is None else bias), logits, atol=1e-5, rtol=1e-5)
