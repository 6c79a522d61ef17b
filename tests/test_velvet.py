"""Velvet (velvet.py, SPEC §8): equals optax.adamw with its flags off, scalings by hand, the
time-varying-β1 bias correction against float64 numpy, sparse masks and the flat layout. (The config
branch that builds it is tested in test_optim.py.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, max_rel, tiny_model
from vesper_jax import losses
from vesper_jax import model as M
from vesper_jax import optim
from vesper_jax import velvet as V


def _train(tx, cfg, params, steps, seed=0):
  """`steps` real training steps of VesperLM with `tx` (each optimizer follows its own gradients)."""
  model = M.VesperLM(cfg)

  @jax.jit
  def step(params, opt_state, tokens_BT1):
    def loss_fn(p):
      logits_BTV = model.apply({'params': p}, tokens_BT1[:, :-1])
      return losses.cross_entropy_and_entropy(logits_BTV, tokens_BT1[:, 1:])
    (loss, entropy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss,
                                   entropy=entropy / math.log(cfg.vocab_size))
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  # A learnable stream (a noisy cycle) so that the loss moves and the gradients change step to step.
  rng = np.random.default_rng(seed)
  for i in range(steps):
    start = rng.integers(0, cfg.vocab_size, size=(4, 1))
    tokens = (start + 3 * np.arange(33)) % cfg.vocab_size
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(0, cfg.vocab_size, tokens.shape), tokens)
    params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens, jnp.int32))
  return params, opt_state, float(loss)


# ------------------------------------------------------------------------------------------- AdamW

def test_flags_off_equals_optax_adamw_over_50_steps():
  cfg, params = tiny_model(vocab_size=512)
  opt_cfg = load_config('tiny').opt
  opt_cfg.warmup_steps = 5  # the first step has lr = schedule(0) = 0: an off-by-one count would show
  schedule = optim.learning_rate_schedule(opt_cfg, 50)
  mask = optim.decay_mask(params, decay_embeddings=False)
  hp = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)
  p_adam, s_adam, loss_adam = _train(optax.adamw(schedule, **hp), cfg, params, 50)
  tx = V.velvet(schedule, entropy_adaptive=False, perplexity_guided=False, **hp)
  p_vel, s_vel, loss_vel = _train(tx, cfg, params, 50)
  assert loss_adam < 6.0  # it trained (ln 512 = 6.24)
  assert max_rel(p_vel, p_adam) <= 1e-6
  adam_mu = s_adam[0].mu
  assert max_rel(s_vel.mu, adam_mu) <= 1e-6
  assert max_rel(s_vel.nu, s_adam[0].nu) <= 1e-6
  # The decay mask held: the AdamW run itself must differ from an unmasked one (else the check is void).
  p_nomask, _, _ = _train(optax.adamw(schedule, **{**hp, 'mask': None}), cfg, params, 50)
  assert max_rel(p_nomask, p_adam) > 1e-4


# ------------------------------------------------------------------------------------------- scalings

# (loss, entropy, vocab_size) → (s_E, s_P, β1) worked out by hand with the defaults
# (H_target 0.5, P_pivot 40, clips [0.5, 2] and [0.5, 0.999], b1 0.9, L_max 20).
_HAND = [
    # s_E = 0.45/0.5; s_P = 40/e^3.7 = 40/40.4473 = 0.98894; β1 = 0.9·0.98894 = 0.89005
    ((3.7, 0.45, None), (0.9, 40 / math.exp(3.7), 0.9 * 40 / math.exp(3.7))),
    # s_E = 0.6; s_P = 40/e^3 = 1.99148; β1 = 1.79233 → clipped to 0.999
    ((3.0, 0.3, None), (0.6, 40 / math.exp(3.0), 0.999)),
    # s_E = 1.8; s_P = 40/e^5 = 0.26952 → 0.5; β1 = 0.45 → 0.5
    ((5.0, 0.9, None), (1.8, 0.5, 0.5)),
    # entropy 0.1 → s_E 0.2 → clipped to 0.5; s_P = 40/e^4 = 0.73263; β1 = 0.65937
    ((4.0, 0.1, None), (0.5, 40 / math.exp(4.0), 0.9 * 40 / math.exp(4.0))),
    # no entropy: Ĥ = 2/ln 1000 = 0.28953, s_E = 0.57906; s_P = 40/e^2 = 5.41 → 2; β1 = 1.8 → 0.999
    ((2.0, None, 1000), (2 / math.log(1000) / 0.5, 2.0, 0.999)),
    # no entropy, loss above ln V: Ĥ = min(10, 6.9078)/6.9078 = 1 → s_E = 2; s_P = 40/e^10 → 0.5
    ((10.0, None, 1000), (2.0, 0.5, 0.5)),
    # loss capped at 20 before exp (e^100 would overflow float32): s_P = 40/e^20 → 0.5
    ((100.0, 0.5, None), (1.0, 0.5, 0.5)),
    # non-finite or missing: all scalings 1, β1 = b1
    ((float('nan'), 0.4, None), (1.0, 1.0, 0.9)),
    ((float('inf'), 0.4, None), (1.0, 1.0, 0.9)),
    ((3.0, float('nan'), None), (1.0, 1.0, 0.9)),
    ((None, 0.4, None), (1.0, 1.0, 0.9)),
]


@pytest.mark.parametrize('inputs,expected', _HAND)
def test_scalings_by_hand(inputs, expected):
  loss, entropy, vocab_size = inputs
  got = V.scalings(loss, entropy, vocab_size=vocab_size)
  np.testing.assert_allclose([float(x) for x in got], expected, rtol=1e-6)


def test_scalings_flags_off_are_one():
  got = V.scalings(3.0, 0.3, entropy_adaptive=False, perplexity_guided=False)
  assert [float(x) for x in got] == [1.0, 1.0, pytest.approx(0.9)]


def test_loss_fallback_needs_vocab_size():
  with pytest.raises(ValueError, match='vocab_size'):
    V.scalings(3.0, None)


def _one_step(tx, params, grads, **kwargs):
  updates, state = tx.update(grads, tx.init(params), params, **kwargs)
  return updates, state


def test_each_scaling_applied_once():
  """At step 1, m/c1 = g whatever β1 is, so the update is exactly s_E times AdamW's."""
  params = {'w': jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
  grads = {'w': jnp.cos(jnp.arange(64.0)).reshape(8, 8)}
  base, _ = _one_step(V.velvet(1e-2, entropy_adaptive=False, perplexity_guided=False), params, grads)
  scaled, state = _one_step(V.velvet(1e-2), params, grads, loss=3.0, entropy=0.3)
  assert float(state.s_entropy) == pytest.approx(0.6)
  np.testing.assert_allclose(scaled['w'], 0.6 * base['w'], rtol=1e-6)


@pytest.mark.parametrize('kwargs', [dict(loss=float('nan'), entropy=0.3), dict(loss=None),
                                    dict(loss=3.0, entropy=float('inf'))])
def test_nonfinite_or_missing_loss_is_a_plain_adamw_step(kwargs):
  params = {'w': jnp.linspace(-1.0, 1.0, 12), 'b': jnp.ones((3,))}
  grads = {'w': jnp.sin(jnp.arange(12.0)), 'b': jnp.array([1.0, -2.0, 0.5])}
  # b2 = 0.95, not 0.999: c2 = 1 − b2^t is formed in float32 (as optax does) and loses digits as b2 → 1.
  tx = V.velvet(1e-2, b2=0.95)
  state = tx.init(params)
  for _ in range(2):  # a finite step first, so β1 and the product have moved
    _, state = tx.update(grads, state, params, loss=3.0, entropy=0.3)
  upd, new_state = tx.update(grads, state, params, **kwargs)
  assert (float(new_state.s_entropy), float(new_state.s_perplexity)) == (1.0, 1.0)
  assert float(new_state.beta1) == pytest.approx(0.9)
  # An AdamW step from this state: s = 1 and β1 = b1, with c1 from the product of the β1s applied.
  c1 = 1 - float(new_state.beta1_product)
  assert c1 != pytest.approx(1 - 0.9**3, rel=1e-3)  # the earlier steps did move β1 away from b1
  c2 = 1 - 0.95**3
  mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state.mu, grads)
  nu = jax.tree.map(lambda v, g: 0.95 * v + 0.05 * g * g, state.nu, grads)
  want = jax.tree.map(lambda m, v, p: -1e-2 * ((m / c1) / (jnp.sqrt(v / c2) + 1e-8) + 0.01 * p),
                      mu, nu, params)
  np.testing.assert_allclose(upd['w'], want['w'], rtol=2e-6)
  np.testing.assert_allclose(upd['b'], want['b'], rtol=2e-6)


# ------------------------------------------------------------------------------- bias correction

def _numpy_velvet(p, grads, losses_, entropies, lr, b1, b2, eps, wd):
  """Velvet re-implemented in float64 numpy straight from SPEC §8 (no code shared with velvet.py)."""
  p = p.astype(np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  prod = 1.0
  log = []
  for t, (g, loss, ent) in enumerate(zip(grads, losses_, entropies), start=1):
    g = g.astype(np.float64)
    s_e = min(max(ent / 0.5, 0.5), 2.0)
    s_p = min(max(40.0 / math.exp(min(loss, 20.0)), 0.5), 2.0)
    beta1 = min(max(b1 * s_p, 0.5), 0.999)
    prod *= beta1
    m = beta1 * m + (1 - beta1) * g
    v = b2 * v + (1 - b2) * g * g
    c1, c2 = 1 - prod, 1 - b2**t
    p = p - lr * s_e * ((m / c1) / (np.sqrt(v / c2) + eps) + wd * p)
    log.append((s_e, s_p, beta1, prod))
  return p, m, v, log


# Both optax forms. The Pallas one (interpret mode) calls the XLA one's per-element function, so the tests
# that compare the two would pass with that function wrong: this reference shares no code with either.
@pytest.mark.parametrize('kernel', ['xla', 'pallas'])
def test_time_varying_beta1_bias_correction_matches_float64_numpy(kernel):
  rng = np.random.default_rng(0)
  n, steps = 257, 100
  p0 = rng.normal(size=n).astype(np.float32)
  grads = [(rng.normal(size=n) * (0.1 + t / 50)).astype(np.float32) for t in range(steps)]
  # Losses sweep perplexities from e^6 down to e^1.5 and back, so s_P crosses both clips and β1_t
  # spans [0.5, 0.999]; entropies sweep both s_E clips.
  losses_ = [float(np.float32(1.5 + 4.5 * abs(math.cos(t / 15)))) for t in range(steps)]
  entropies = [float(np.float32(0.1 + 0.9 * abs(math.sin(t / 7)))) for t in range(steps)]
  lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
  want_p, want_m, want_v, want_log = _numpy_velvet(p0, grads, losses_, entropies, lr, b1, b2, eps, wd)
  betas = [b for _, _, b, _ in want_log]
  assert min(betas) == 0.5 and max(betas) == 0.999  # the sweep does hit both clips

  tx = V.velvet(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, kernel=kernel)
  params, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  step = jax.jit(lambda g, s, p, l, e: tx.update(g, s, p, loss=l, entropy=e))
  for t in range(steps):
    u, state = step(jnp.asarray(grads[t]), state, params, losses_[t], entropies[t])
    params = params + u
    s_e, s_p, beta1, prod = want_log[t]
    np.testing.assert_allclose([state.s_entropy, state.s_perplexity, state.beta1], [s_e, s_p, beta1],
                               rtol=1e-6)
    np.testing.assert_allclose(float(state.beta1_product), prod, rtol=1e-5)
  np.testing.assert_allclose(state.mu, want_m, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.nu, want_v, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(params, want_p, rtol=1e-5, atol=1e-5)
  # The check has teeth: AdamW's constant-β1 correction 1 − b1^t is far from 1 − Π β1_τ on this run.
  gap = max(abs((1 - b1**t) - (1 - prod)) / (1 - prod)
            for t, (_, _, _, prod) in enumerate(want_log, start=1))
  assert gap > 0.1


# ------------------------------------------------------------------------------------------- sparse

@pytest.mark.parametrize('as_function', [False, True])
def test_sparse_aware_masked_elements_frozen_and_moments_zero(as_function):
  rng = np.random.default_rng(1)
  params = {'a': jnp.asarray(rng.normal(size=(7, 9)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  keep = {'a': jnp.asarray(rng.random((7, 9)) < 0.6), 'b': True}
  tx = V.velvet(1e-2, sparse_aware=(lambda p: keep) if as_function else keep)
  state = tx.init(params)
  p = params
  for t in range(20):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    u, state = tx.update(grads, state, p, loss=2.0 + t / 10, entropy=0.4)
    p = optax.apply_updates(p, u)
  frozen = ~np.asarray(keep['a'])
  np.testing.assert_array_equal(np.asarray(p['a'])[frozen], np.asarray(params['a'])[frozen])  # bitwise
  assert np.all(np.asarray(state.mu['a'])[frozen] == 0) and np.all(np.asarray(state.nu['a'])[frozen] == 0)
  assert np.all(np.asarray(p['a'])[~frozen] != np.asarray(params['a'])[~frozen])
  assert np.all(np.asarray(state.nu['a'])[~frozen] > 0)
  assert np.all(np.asarray(p['b']) != np.asarray(params['b']))


# ------------------------------------------------------------------------------------------- layout

def test_flat_layout_roundtrip_and_same_update_as_the_tree():
  cfg, params = tiny_model(vocab_size=512)
  mask = optim.decay_mask(params, decay_embeddings=False)
  layout = V.flat_layout(params, mask)
  flat = layout.flatten(params)
  assert sorted(flat) == ['decay_float32', 'no_decay_float32']
  assert sum(x.size for x in flat.values()) == sum(x.size for x in jax.tree.leaves(params))
  back = layout.unflatten(flat)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))

  grads = jax.tree.map(lambda x: jnp.sin(x * 7.0 + 1.0), params)
  tree_tx = V.velvet(1e-2, weight_decay=0.1, mask=mask)
  flat_tx = V.velvet(1e-2, weight_decay=0.1, mask=layout.decay_mask())
  u_tree, _ = _one_step(tree_tx, params, grads, loss=3.0, entropy=0.4)
  u_flat, _ = _one_step(flat_tx, flat, layout.flatten(grads), loss=3.0, entropy=0.4)
  assert max_rel(layout.unflatten(u_flat), u_tree) <= 1e-6
  # The decay groups matter: the no-decay buffer (norms) saw no decay.
  zero = jax.tree.map(jnp.zeros_like, flat)
  u0, _ = _one_step(flat_tx, flat, zero, loss=3.0, entropy=0.4)
  assert float(jnp.max(jnp.abs(u0['no_decay_float32']))) == 0.0
  assert float(jnp.max(jnp.abs(u0['decay_float32']))) > 0.0


def test_bad_kernel_name_is_refused():
  with pytest.raises(ValueError, match="kernel='cuda'"):
    V.velvet(1e-3, kernel='cuda')
  with pytest.raises(ValueError, match="kernel='triton'.*velvet_in_place"):
    V.velvet(1e-3, kernel='triton')  # an in-place path: no optax form
