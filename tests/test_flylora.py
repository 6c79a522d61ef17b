"""FlyLoRA (flylora.py, SPEC §5): sparse A, routing, gradients, expert biases, merge, freezing, and the
rule at work in a fine-tuning run. Adapter files are tested in test_export.py, loading a base in
test_finetune.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import base_run_config, decode_stepwise, load_config, random_adapters, tiny_model_config
from vesper_jax import flylora as F
from vesper_jax import model as M
from vesper_jax import optim
from vesper_jax.pytree import flatten, unflatten

ALL = 'q,k,v,o,gate,up,down'
_tiny = functools.partial(tiny_model_config, vocab_size=300)  # a small vocabulary: the adapters are the subject


def _adapted(cfg: M.ModelConfig, seed: int = 0):
  """(base params, adapted params with the base grafted in) for cfg and its plain twin."""
  base = M.init_params(cfg.replace(lora_targets=''), jax.random.key(seed))
  return base, F.graft_base(M.init_params(cfg, jax.random.key(seed + 100)), base)


def _tokens(cfg, shape=(2, 16), seed=3):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


# ------------------------------------------------------------------------------------------ A

def test_sparse_a_has_exactly_p_nonzeros_per_column_and_follows_the_seed():
  cfg = _tiny(lora_targets='gate,down', lora_rank=16, lora_k=4, lora_rho=0.3)
  a = flatten(M.init_params(cfg, jax.random.key(0)))
  # The params RNG plays no part: another init key gives the same A; another lora_seed a different one.
  b = flatten(M.init_params(cfg, jax.random.key(7)))
  c = flatten(M.init_params(cfg.replace(lora_seed=1), jax.random.key(0)))
  gate, down = ('layers_1', 'ffn', 'gate_proj', 'lora_a'), ('layers_1', 'ffn', 'down_proj', 'lora_a')
  for key, in_features in ((gate, cfg.d_model), (down, cfg.d_ff)):
    A = np.asarray(a[key])
    assert A.shape == (in_features, 16)
    p = round(0.3 * in_features)
    np.testing.assert_array_equal((A != 0).sum(axis=0), np.full(16, p))
    np.testing.assert_array_equal(A, np.asarray(b[key]))
    assert not np.array_equal(A, np.asarray(c[key]))
    # Values N(0, 1/r²): the sample std of the non-zeros is near 1/r.
    assert abs(A[A != 0].std() * 16 - 1.0) < 0.15
  # Remat (a lifted transform) does not change the layer's path, so not its A either.
  remat = flatten(M.init_params(cfg.replace(remat=True), jax.random.key(0)))
  np.testing.assert_array_equal(np.asarray(remat[gate]), np.asarray(a[gate]))
  # Every layer gets its own A.
  assert not np.array_equal(np.asarray(a[gate]), np.asarray(a[('layers_0', 'ffn', 'gate_proj', 'lora_a')]))


def test_default_density_is_k_over_r():
  cfg = _tiny(lora_targets='up', lora_rank=32, lora_k=8)
  assert F.nonzeros_per_column(cfg, 128) == 32
  A = np.asarray(M.init_params(cfg, jax.random.key(0))['layers_0']['ffn']['up_proj']['lora_a'])
  np.testing.assert_array_equal((A != 0).sum(axis=0), np.full(32, 32))


# ------------------------------------------------------------------------------------------ step 0

@pytest.mark.parametrize('overrides', [
    {'lora_targets': ALL},
    {'lora_targets': 'q,v,up', 'use_bias': True, 'norm': 'rmsnorm', 'remat': True},
    {'lora_targets': 'gate,up', 'lora_mode': 'lora'},
])
def test_adapted_logits_equal_base_logits_exactly_at_init(overrides):
  cfg = _tiny(**overrides)
  base, params = _adapted(cfg)
  tokens = _tokens(cfg)
  plain = M.VesperLM(cfg.replace(lora_targets='')).apply({'params': base}, tokens)
  adapted = M.VesperLM(cfg).apply({'params': params}, tokens)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))  # B = 0: bitwise
  # ... and the adapter is live: a non-zero B changes them.
  moved = M.VesperLM(cfg).apply({'params': random_adapters(params)}, tokens)
  assert not np.allclose(np.asarray(moved), np.asarray(plain), atol=1e-4)


def test_kv_cache_decoding_with_adapters_equals_full_forward():
  cfg = _tiny(lora_targets=ALL, lora_rank=8, lora_k=3)
  params = random_adapters(_adapted(cfg)[1])
  tokens = _tokens(cfg, (2, 12))
  full = np.asarray(M.VesperLM(cfg).apply({'params': params}, tokens))
  stepwise = np.asarray(decode_stepwise(cfg, params, tokens, prompt_len=5))
  np.testing.assert_allclose(stepwise, full, atol=1e-5, rtol=1e-5)


def test_graft_base_names_the_offending_tensor():
  cfg = _tiny(lora_targets='up')
  base, params = _adapted(cfg)
  bad = jax.tree.map(lambda x: x, base)
  bad['layers_0']['ffn']['up_proj']['kernel'] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match='layers_0/ffn/up_proj/kernel'):
    F.graft_base(params, bad)
  missing = jax.tree.map(lambda x: x, base)
  del missing['final_norm']
  with pytest.raises(ValueError, match='final_norm'):
    F.graft_base(params, missing)


# ------------------------------------------------------------------------------------------ routing

def _layer(R=8, K=3, I=12, O=5, mode='flylora'):
  cfg = _tiny(lora_targets='q', lora_rank=R, lora_k=K, lora_mode=mode, lora_rho=0.5)
  layer = F.LoRADense(cfg, O, jax.nn.initializers.normal(0.5), name='q_proj')
  x = jax.random.normal(jax.random.key(1), (2, 7, I))
  params = layer.init(jax.random.key(0), x)['params']
  params['expert_bias'] = 0.3 * jax.random.normal(jax.random.key(2), (R,))
  return cfg, layer, params, x


def test_route_selects_exactly_k_ranks_per_token_by_abs_z_plus_d():
  z = jax.random.normal(jax.random.key(0), (3, 11, 16))
  d = 0.5 * jax.random.normal(jax.random.key(1), (16,))
  mask = np.asarray(F.route(z, d, 5))
  np.testing.assert_array_equal(mask.sum(-1), np.full((3, 11), 5))
  score = np.abs(np.asarray(z, np.float64) + np.asarray(d, np.float64))
  kth = np.sort(score, -1)[..., -5:-4]
  np.testing.assert_array_equal(mask, (score >= kth).astype(np.float32))
  # Ties still give exactly k.
  np.testing.assert_array_equal(np.asarray(F.route(jnp.ones((4, 16)), jnp.zeros(16), 5)).sum(-1), 5)


def _numpy_layer(params, x, cfg):
  """The layer in float64 numpy, straight from SPEC §5."""
  A, B, W = (np.asarray(params[n], np.float64) for n in ('lora_a', 'lora_b', 'kernel'))
  d = np.asarray(params['expert_bias'], np.float64)
  x = np.asarray(x, np.float64)
  z = x @ A
  score = np.abs(z + d)
  mask = (score >= np.sort(score, -1)[..., -cfg.lora_k:-cfg.lora_k + 1]).astype(np.float64)
  return x @ W + F.scale(cfg) * (z * mask) @ B, mask


def test_layer_matches_a_numpy_reference():
  cfg, layer, params, x = _layer()
  params['lora_b'] = jax.random.normal(jax.random.key(5), params['lora_b'].shape)
  out, mutated = layer.apply({'params': params}, x, mutable=[F.COUNTS])
  ref, mask = _numpy_layer(params, x, cfg)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(mutated[F.COUNTS]['rank_counts']), mask.reshape(-1, 8).sum(0))
  assert F.scale(cfg) == 2.0  # α = 2r by default


def test_gradients_reach_only_the_selected_ranks_rows_of_b():
  cfg, layer, params, x = _layer(R=16, K=4)
  x1 = x[:1, :1]  # one token: its k selected ranks are the only rows of B that may learn
  params['lora_b'] = jax.random.normal(jax.random.key(5), params['lora_b'].shape)
  _, mask = _numpy_layer(params, x1, cfg)
  selected = mask.reshape(16) > 0
  assert selected.sum() == 4

  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x1) ** 2))(params)
  row_norm = np.abs(np.asarray(grads['lora_b'])).sum(axis=1)
  assert np.all(row_norm[selected] > 0)
  np.testing.assert_array_equal(row_norm[~selected], 0.0)
  # A and d are frozen behind stop_gradient: nothing flows to them.
  np.testing.assert_array_equal(np.asarray(grads['lora_a']), 0.0)
  np.testing.assert_array_equal(np.asarray(grads['expert_bias']), 0.0)


def test_plain_lora_mode_is_dense_and_trains_a():
  cfg, layer, params, x = _layer(mode='lora')
  assert 'expert_bias' not in layer.init(jax.random.key(0), x)['params']
  params = {k: v for k, v in params.items() if k != 'expert_bias'}
  A = np.asarray(params['lora_a'])
  assert (A != 0).all() and np.abs(A).max() <= 1 / np.sqrt(12)
  params['lora_b'] = jax.random.normal(jax.random.key(5), params['lora_b'].shape)
  out = layer.apply({'params': params}, x)
  xn = np.asarray(x, np.float64)
  ref = xn @ np.asarray(params['kernel'], np.float64) + F.scale(cfg) * xn @ A @ np.asarray(params['lora_b'])
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2))(params)
  assert np.abs(np.asarray(grads['lora_a'])).sum() > 0


# ------------------------------------------------------------------------------------------ expert biases

def test_expert_bias_rule_matches_a_hand_computation():
  cfg, layer, params, x = _layer(R=6, K=2, I=4, O=3)
  x = x[:, :3, :4]  # 6 tokens
  _, mutated = layer.apply({'params': params}, x, mutable=[F.COUNTS])
  counts = np.asarray(mutated[F.COUNTS]['rank_counts'])
  # By hand: per token, the 2 ranks with the largest |x·A + d|; count them; move d by the rule.
  A, d = np.asarray(params['lora_a'], np.float64), np.asarray(params['expert_bias'], np.float64)
  hand = np.zeros(6)
  for token in np.asarray(x, np.float64).reshape(-1, 4):
    for rank in np.argsort(-np.abs(token @ A + d))[:2]:
      hand[rank] += 1
  np.testing.assert_array_equal(counts, hand)
  assert hand.sum() == 12
  new = F.update_expert_biases({'q_proj': params}, {'q_proj': {'rank_counts': counts}}, rate=1e-3)
  expected = d + 1e-3 * np.sign(hand.mean() - hand)
  np.testing.assert_allclose(np.asarray(new['q_proj']['expert_bias']), expected, rtol=0, atol=1e-7)
  assert not np.array_equal(expected, d)
  for name in ('kernel', 'lora_a', 'lora_b'):
    assert new['q_proj'][name] is params[name]


def test_model_sows_counts_for_every_adapted_layer_and_sums_micro_batches():
  cfg = _tiny(lora_targets='q,up', remat=True)
  _, params = _adapted(cfg)
  tokens = _tokens(cfg, (4, 8))
  apply = jax.jit(lambda p, t: M.VesperLM(cfg).apply({'params': p}, t, mutable=[F.COUNTS])[1][F.COUNTS])
  whole = apply(params, tokens)
  paths = {'/'.join(k[:-1]) for k in flatten(whole)}
  assert paths == {f'layers_{i}/{m}' for i in range(2) for m in ('attention/q_proj', 'ffn/up_proj')}
  for c in jax.tree.leaves(whole):
    assert int(c.sum()) == 4 * 8 * cfg.lora_k
  halves = jax.tree.map(jnp.add, apply(params, tokens[:2]), apply(params, tokens[2:]))
  jax.tree.map(np.testing.assert_array_equal, halves, whole)
  # init sows nothing (its dummy input's counts would otherwise join the first step's).
  assert set(M.VesperLM(cfg).init(jax.random.key(0), tokens)) == {'params'}


# ------------------------------------------------------------------------------------------ merge

@pytest.mark.parametrize('mode', ['flylora', 'lora'])
def test_merge_with_k_equal_r_reproduces_the_adapted_logits(mode):
  cfg = _tiny(lora_targets=ALL, lora_rank=8, lora_k=8, lora_mode=mode)
  _, params = _adapted(cfg)
  params = random_adapters(params)
  tokens = _tokens(cfg)
  adapted = M.VesperLM(cfg).apply({'params': params}, tokens)
  merged, plain_cfg = F.merge(params, cfg)
  assert plain_cfg.lora_targets == ''
  assert not any(k[-1] in F.ADAPTER_LEAVES for k in flatten(merged))
  out = M.VesperLM(plain_cfg).apply({'params': merged}, tokens)
  assert np.abs(np.asarray(out) - np.asarray(adapted)).max() <= 1e-5
  base = M.VesperLM(plain_cfg).apply({'params': F.base_params(params)}, tokens)
  assert np.abs(np.asarray(base) - np.asarray(adapted)).max() > 1e-3  # the merge did carry something


def test_merge_with_k_below_r_is_refused_with_the_reason():
  cfg = _tiny(lora_targets='up', lora_rank=8, lora_k=2)
  _, params = _adapted(cfg)
  with pytest.raises(ValueError, match=r'lora_k=2 < model.lora_rank=8.*depends on x'):
    F.merge(params, cfg)


# ------------------------------------------------------------------------------------------ freezing

def test_optimizer_updates_only_b_and_keeps_no_state_for_frozen_params():
  cfg = _tiny(lora_targets='gate,up')
  _, params = _adapted(cfg)
  mask = F.trainable_mask(params, cfg)
  flat_mask = flatten(mask)
  assert {k[-1] for k, m in flat_mask.items() if m} == {'lora_b'}
  n_trainable = M.param_counts(params, mask)['trainable']
  assert n_trainable == 2 * 2 * cfg.lora_rank * cfg.d_ff  # 2 layers × (gate, up) × r × O

  opt_config = load_config('tiny').opt
  opt_config.warmup_steps = 0
  tx = optim.make_optimizer(opt_config, 10, params, trainable=mask)
  state = tx.init(params)
  # AdamW: two moments per trainable element, plus scalar counters — nothing for the 400k frozen ones.
  size = optim.count_state(state)
  assert 2 * n_trainable <= size <= 2 * n_trainable + 8
  full = optim.count_state(optim.make_optimizer(opt_config, 10, params).init(params))
  assert full >= 2 * M.param_counts(params)['total']

  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, _ = tx.update(grads, state, params)
  # Reference: the same AdamW on the B leaves alone.
  bs = {k: v for k, v in flatten(params).items() if k[-1] == 'lora_b'}
  ref_tx = optim.make_optimizer(opt_config, 10, unflatten(bs))
  ref, _ = ref_tx.update(unflatten({k: grads_k for k, grads_k in flatten(grads).items() if k in bs}),
                         ref_tx.init(unflatten(bs)), unflatten(bs))
  flat_ref = flatten(ref)
  for k, u in flatten(updates).items():
    if k in bs:
      np.testing.assert_allclose(np.asarray(u), np.asarray(flat_ref[k]), rtol=1e-6)
      assert np.abs(np.asarray(u)).sum() > 0
    else:  # frozen: exactly zero, weight decay included (A and the kernels are matrices)
      np.testing.assert_array_equal(np.asarray(u), 0.0)
  assert isinstance(state, optax.PartitionState)


def test_param_report_counts_against_lora_and_full_finetuning():
  cfg = _tiny(lora_targets='gate,up', lora_rank=16, lora_k=4)
  _, params = _adapted(cfg)
  report = F.param_report(params, cfg, F.trainable_mask(params, cfg))
  D, Ff, R = cfg.d_model, cfg.d_ff, 16
  base_total = M.param_counts(M.init_params(cfg.replace(lora_targets=''), jax.random.key(0)))['total']
  assert report['full_finetune'] == base_total
  assert report['trainable'] == 4 * R * Ff                     # B only
  assert report['lora_same_rank'] == 4 * R * (D + Ff)          # A and B
  assert report['total'] == base_total + 4 * (R * D + R * Ff + R)  # + A, B, d
  assert report['reduction_vs_lora'] == pytest.approx(1 - Ff / (D + Ff))
  assert report['reduction_vs_full'] == pytest.approx(1 - 4 * R * Ff / base_total)


# ------------------------------------------------------------------------------------------ config

def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match='model.lora_targets.*unknown'):
    _tiny(lora_targets='q,qq')
  with pytest.raises(ValueError, match='model.lora_k=9'):
    _tiny(lora_targets='q', lora_rank=8, lora_k=9)
  with pytest.raises(ValueError, match='model.lora_mode'):
    _tiny(lora_mode='dora')


# ------------------------------------------------------------------------------------------ fine-tuning

def _finetune_config(root, **overrides):
  return base_run_config(root, **{'model.lora_targets': 'gate,up', 'model.lora_rank': 16,
                                  'model.lora_k': 4, 'train.init_from': str(root / 'base'),
                                  'data.tokenizer': str(root / 'base' / 'tokenizer.json'),
                                  'train.grad_accum_steps': 2, 'opt.learning_rate': 1e-2, **overrides})


def test_finetuning_trains_only_the_adapters_and_moves_d_by_the_rule(base_workdir):
  import orbax.checkpoint as ocp
  from vesper_jax import checkpoint, data, train
  root, u = base_workdir, 1e-3
  workdir = root / 'flylora'
  _, base = checkpoint.load_params(root / 'base')

  # Step 1 alone, checked against a hand computation of the rule on the step's batch.
  config = _finetune_config(root, **{'train.num_steps': 1})
  cfg = M.ModelConfig(**config.model)
  train.train_and_evaluate(config, workdir)
  _, after1 = checkpoint.load_params(workdir)
  cache = data.build_or_load_cache(config.data, cfg.vocab_size, progress=False)
  batch = data.get_batch(cache.train, seed=config.train.seed, step=0, batch_size=8, seq_len=32,
                         process_index=0, process_count=1)
  start = F.graft_base(M.init_params(cfg, jax.random.key(0)), base)  # B = 0, d = 0, the seed's A
  _, sown = M.VesperLM(cfg).apply({'params': start}, batch[:, :-1], mutable=[F.COUNTS])
  for path, c in flatten(sown[F.COUNTS]).items():
    c = np.asarray(c, np.float64)
    assert c.sum() == 8 * 32 * 4  # every token of the step (both micro-batches) picks k = 4 ranks
    d = np.asarray(flatten(after1)[path[:-1] + ('expert_bias',)])
    np.testing.assert_array_equal(d, (u * np.sign(c.mean() - c)).astype(np.float32))

  # Resume to step 20 (restores the partitioned optimizer state).
  train.train_and_evaluate(_finetune_config(root, **{'train.num_steps': 20}), workdir)
  _, after20 = checkpoint.load_params(workdir)
  flat, flat_start, flat_base = flatten(after20), flatten(start), flatten(base)
  for key, value in flat_base.items():  # every base parameter, bit for bit
    np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(value), err_msg='/'.join(key))
  n_modules = 0
  for key, value in flat.items():
    if key[-1] == 'lora_a':
      np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_start[key]))
    elif key[-1] == 'lora_b':
      n_modules += 1
      assert np.abs(np.asarray(value)).max() > 1e-4, '/'.join(key)
    elif key[-1] == 'expert_bias':
      # Twenty ±u / 0 moves: an integer multiple of u, at most 20, and d has moved since step 1.
      steps = np.asarray(value, np.float64) / u
      np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
      assert np.abs(steps).max() <= 20 + 1e-3 and np.abs(steps).max() >= 2
      assert not np.array_equal(np.asarray(value), np.asarray(flatten(after1)[key]))
  assert n_modules == 4

  # The saved optimizer state: Adam's two moments for B and a few counters, nothing for the base.
  manager = ocp.CheckpointManager((workdir / checkpoint.CHECKPOINT_DIR).absolute())
  saved = manager.restore(20, args=ocp.args.StandardRestore())
  manager.close()
  n_b = 4 * 16 * cfg.d_ff
  assert 2 * n_b <= optim.count_state(saved['opt_state']) <= 2 * n_b + 8
