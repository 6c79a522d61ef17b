"""The optimizer built from config.opt (optim.py): the schedule's end points, the weight-decay mask
(matrices only; embeddings only with opt.decay_embeddings), the Velvet branch with every key read, and
frozen leaves that get no update and no state."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, tiny_model
from vesper_jax import optim
from vesper_jax import velvet as V
from vesper_jax.pytree import flatten


def _opt(**changes):
  opt = load_config('tiny').opt
  for key, value in changes.items():
    opt[key] = value
  return opt


def test_warmup_cosine_schedule_end_points():
  schedule = optim.learning_rate_schedule(_opt(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1), 100)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 55, 100)],
                             [0.0, 5e-4, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4], rtol=1e-5)
  # A warmup longer than the run is cut so the peak is still reached (at the last step).
  short = optim.learning_rate_schedule(_opt(learning_rate=1e-3, warmup_steps=50), 5)
  assert float(short(0)) == 0.0 and float(short(4)) == pytest.approx(1e-3)


def test_decay_mask_is_matrices_only_and_embeddings_on_request():
  _, params = tiny_model(vocab_size=512)
  for decay_embeddings in (False, True):
    mask = flatten(optim.decay_mask(params, decay_embeddings))
    for key, decayed in mask.items():
      is_matrix = flatten(params)[key].ndim >= 2
      is_embedding = key[0] in ('embeddings', 'lm_head')
      assert decayed == (is_matrix and (decay_embeddings or not is_embedding)), key


@pytest.mark.parametrize('name', ['adamw', 'velvet'])
def test_decay_embeddings_shrinks_the_embedding_and_the_head_only_when_set(name):
  """Zero gradients, lr > 0, weight_decay > 0: only decoupled weight decay moves anything."""
  _, params = tiny_model(vocab_size=512)
  zero = jax.tree.map(jnp.zeros_like, params)
  for decay_embeddings in (False, True):
    opt = _opt(name=name, warmup_steps=0, weight_decay=0.1, decay_embeddings=decay_embeddings)
    tx = optim.make_optimizer(opt, 10, params, vocab_size=512)
    updates, _ = tx.update(zero, tx.init(params), params, loss=3.0, entropy=0.3)
    new = optax.apply_updates(params, updates)

    def ratio(*path):
      old, moved = params, new
      for p in path:
        old, moved = old[p], moved[p]
      old, moved = np.asarray(old), np.asarray(moved)
      return np.unique(np.round(moved[old != 0] / old[old != 0], 6))

    kernel = ratio('layers_0', 'attention', 'q_proj', 'kernel')
    assert len(kernel) == 1 and kernel[0] < 1  # every matrix entry shrinks by the same factor
    for path in (('embeddings', 'embedding'), ('lm_head', 'kernel')):
      np.testing.assert_array_equal(ratio(*path), kernel if decay_embeddings else [1.0])
    for path in (('final_norm', 'scale'), ('layers_1', 'ffn_norm', 'scale')):  # norms never decay
      np.testing.assert_array_equal(ratio(*path), [1.0])


def test_make_optimizer_velvet_branch_decay_mask_and_scalings_for_logging():
  _, params = tiny_model(vocab_size=512)
  opt_cfg = load_config('tiny').opt
  opt_cfg.name = 'velvet'
  opt_cfg.warmup_steps = 0
  tx = optim.make_optimizer(opt_cfg, 10, params)
  state = tx.init(params)
  assert V.velvet_scalings(optim.make_optimizer(load_config('tiny').opt, 10, params).init(params)) == {}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zero, state, params, loss=3.0, entropy=0.3)
  # Zero gradients: only weight decay moves anything, and never on norms.
  assert float(jnp.max(jnp.abs(updates['final_norm']['scale']))) == 0.0
  assert float(jnp.max(jnp.abs(updates['layers_0']['ffn']['up_proj']['kernel']))) > 0.0
  assert float(jnp.max(jnp.abs(updates['embeddings']['embedding']))) == 0.0  # decay_embeddings False
  logged = V.velvet_scalings(state)
  assert set(logged) == {'s_entropy', 's_perplexity', 'beta1', 'beta1_product'}
  np.testing.assert_allclose([logged['s_entropy'], logged['s_perplexity'], logged['beta1']],
                             [0.6, 40 / math.exp(3.0), opt_cfg.beta1_max], rtol=1e-6)
  # Every Velvet key of the config is read: changing one changes the optimizer.
  opt_cfg.entropy_target = 0.25
  _, state2 = optim.make_optimizer(opt_cfg, 10, params).update(zero, tx.init(params), params, loss=3.0,
                                                               entropy=0.3)
  assert float(V.velvet_scalings(state2)['s_entropy']) == pytest.approx(1.2)


def test_unknown_optimizer_is_refused_by_key():
  _, params = tiny_model(vocab_size=512)
  with pytest.raises(ValueError, match="opt.name='sgd'"):
    optim.make_optimizer(_opt(name='sgd'), 10, params)


def test_frozen_leaves_get_zero_updates_and_no_state():
  _, params = tiny_model(vocab_size=512)
  trainable = jax.tree.map(lambda _: False, params)
  trainable['final_norm']['scale'] = True
  tx = optim.make_optimizer(_opt(warmup_steps=0), 10, params, trainable)
  state = tx.init(params)
  n = params['final_norm']['scale'].size
  assert 2 * n <= optim.count_state(state) <= 2 * n + 8  # Adam's two moments for the one trainable leaf
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  for key, value in flatten(updates).items():
    if key == ('final_norm', 'scale'):
      assert np.abs(np.asarray(value)).min() > 0
    else:  # frozen: exactly zero, weight decay included
      np.testing.assert_array_equal(np.asarray(value), 0.0, err_msg='/'.join(key))
