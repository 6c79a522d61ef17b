"""dense.Dense against flax's nn.Dense: the same parameters, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesper_jax import dense


@pytest.mark.parametrize('copy_transpose', [True, False])  # the CPU and the accelerator layouts
@pytest.mark.parametrize('use_bias, dtype, shape', [(False, jnp.float32, (6, 10)),
                                                     (True, jnp.float32, (2, 3, 10)),
                                                     (True, jnp.bfloat16, (6, 10))])
def test_dense_equals_flax_dense(use_bias, dtype, shape, copy_transpose):
  init = nn.initializers.normal(0.3)
  ours = dense.Dense(7, use_bias=use_bias, dtype=dtype, kernel_init=init, copy_transpose=copy_transpose)
  flax = nn.Dense(7, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=init)
  x = jax.random.normal(jax.random.key(0), shape)
  params = ours.init(jax.random.key(1), x)
  # Same names, shapes, dtypes and initial values from the same key (checkpoints and export unchanged).
  flax_params = flax.init(jax.random.key(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(flax_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  w = jax.random.normal(jax.random.key(2), shape[:-1] + (7,))

  def loss(module, params, x):
    return jnp.sum(module.apply(params, x).astype(jnp.float32) * w)

  out, want = ours.apply(params, x), flax.apply(params, x)
  assert out.dtype == want.dtype == dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  for got, expected in zip(jax.tree.leaves(jax.grad(loss, (1, 2))(ours, params, x)),
                           jax.tree.leaves(jax.grad(loss, (1, 2))(flax, params, x))):
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=tol, atol=tol * 10)


@pytest.mark.parametrize('copy_transpose', [True, False])
def test_weight_gradient_is_one_product_of_a_copied_transpose(copy_transpose):
  # On CPU the weight gradient contracts a materialised xᵀ (held apart from the product by an
  # optimization barrier, which XLA would otherwise fold back in): the reason dense.py exists. Off CPU
  # (copy_transpose=False, model.py's choice from the platform) the transpose is left to the library.
  x, dy = jnp.ones((8, 4)), jnp.ones((8, 3))
  linear = lambda x, w: dense.linear(x, w, copy_transpose)
  jaxpr = jax.make_jaxpr(jax.vjp(linear, x, jnp.ones((4, 3)))[1])(dy)
  names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert ('optimization_barrier' in str(jaxpr)) == copy_transpose, names
  assert str(jaxpr).count('dot_general') == 2, names
