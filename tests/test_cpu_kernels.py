"""The CPU kernels (kernels/*.cc) against the JAX code they replace, and when they are chosen.

The suite runs with 8 simulated devices, where the kernels are never chosen by themselves (one device
only, see cpu_kernels.usable): most tests call them explicitly, or force them; the tiny model with the
kernels as chosen, against the JAX code, runs in a one-device subprocess.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from vesper_jax import attention_cpu
from vesper_jax import era as era_lib
from vesper_jax import losses
from vesper_jax.kernels import attention_cpu_ffi
from vesper_jax.kernels import cpu_kernels
from vesper_jax.kernels import cross_entropy_cpu_ffi
from vesper_jax.kernels import era_cpu_ffi
from vesper_jax.kernels import sampling_cpu_ffi

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or not cpu_kernels.available(),
    reason='the CPU kernels did not build here (no C++ compiler, or not a CPU backend): the model uses '
           'the JAX code, which tests/test_model.py and tests/test_losses.py check')


def _reference(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :],
                                      is_causal=True, implementation='xla')


def _operands(B, T, N, K, H, seed=6):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k, v = jax.random.normal(keys[1], (B, T, K, H)), jax.random.normal(keys[2], (B, T, K, H))
  weights = jax.random.normal(keys[3], (B, T, N, H))  # a loss that weighs every output differently
  return q, k, v, weights


@pytest.mark.parametrize('B, T, N, K, H, padded', [
    (2, 12, 4, 4, 16, False),   # less than one vector of keys, one query block
    (2, 37, 4, 2, 32, True),    # grouped-query heads, padding, T not a multiple of 16
    (3, 70, 6, 3, 64, True),    # three query blocks of 32, the last one partial
    (1, 96, 2, 1, 48, False),   # one key/value head for two query heads, three full blocks
])
def test_kernel_equals_dot_product_attention(B, T, N, K, H, padded):
  q, k, v, weights = _operands(B, T, N, K, H)
  mask = None
  if padded:  # random padding, but every query sees at least position 0
    mask = (jax.random.uniform(jax.random.key(9), (B, T)) < 0.7).at[:, 0].set(True)

  def loss(attention, *qkv):
    return jnp.sum(attention(*qkv) * weights)

  ours = lambda q, k, v: attention_cpu.causal_attention(q, k, v, mask, kernel=True)
  want = lambda q, k, v: _reference(q, k, v, mask)
  np.testing.assert_allclose(ours(q, k, v), want(q, k, v), atol=2e-6)
  for got, expected in zip(jax.jit(jax.grad(functools.partial(loss, ours), (0, 1, 2)))(q, k, v),
                           jax.grad(functools.partial(loss, want), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_kernel_query_that_sees_no_key_gets_zeros():
  # Left padding: the first query positions see only padding. Their output (and every gradient
  # through them) is zero, not NaN; every other position is exact.
  B, T, N, H = 2, 20, 2, 16
  q, k, v, weights = _operands(B, T, N, N, H, seed=3)
  mask = jnp.ones((B, T), bool).at[0, :5].set(False)
  out = attention_cpu.causal_attention(q, k, v, mask, kernel=True)
  np.testing.assert_array_equal(out[0, :5], 0.0)
  np.testing.assert_allclose(out[0, 5:], _reference(q, k, v, mask)[0, 5:], atol=2e-6)
  np.testing.assert_allclose(out[1], _reference(q, k, v, mask)[1], atol=2e-6)
  grads = jax.grad(lambda q, k, v: jnp.sum(attention_cpu.causal_attention(q, k, v, mask, kernel=True)
                                           * weights), (0, 1, 2))(q, k, v)
  assert all(np.isfinite(g).all() for g in grads)
  np.testing.assert_array_equal(grads[0][0, :5], 0.0)   # no query gradient where nothing was seen
  np.testing.assert_array_equal(grads[1][0, :5], 0.0)   # nor for the padded keys and values
  np.testing.assert_array_equal(grads[2][0, :5], 0.0)


def test_kernels_are_never_chosen_over_several_devices():
  # Over a mesh XLA would gather every operand of a kernel call to every device: the JAX code runs.
  assert jax.device_count() == 8
  f32 = jnp.zeros((1, 4, 2, 16), jnp.float32)
  assert not attention_cpu_ffi.supports(f32, f32, f32)
  assert not cross_entropy_cpu_ffi.supports(f32[0, 0])
  assert not era_cpu_ffi.supports(f32)
  assert not sampling_cpu_ffi.supports(f32[0, 0])


# Run with one device (python -c _ONE_DEVICE REPO): where each kernel applies, and the tiny model's loss
# (the chunked head, as training computes it on CPU) and gradients with the kernels as the model chooses
# them, checked to be in the lowered program, against the same with cpu_kernels.usable off (none there).
_ONE_DEVICE = """
import sys
sys.path.insert(0, sys.argv[1] + '/tests')
import jax, jax.numpy as jnp, numpy as np
from conftest import tiny_model_config
from vesper_jax import losses, model as M
from vesper_jax.kernels import attention_cpu_ffi, cpu_kernels, cross_entropy_cpu_ffi, era_cpu_ffi
from vesper_jax.kernels import sampling_cpu_ffi

assert jax.device_count() == 1, jax.devices()
f32, bf16, odd = jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16), jnp.bfloat16), jnp.zeros((1, 4, 2, 8))
cpu_kernels.wide_vectors = lambda: True
assert attention_cpu_ffi.supports(f32, f32, f32) and cross_entropy_cpu_ffi.supports(f32[0, 0])
assert era_cpu_ffi.supports(f32) and sampling_cpu_ffi.supports(f32[0, 0])
assert not attention_cpu_ffi.supports(bf16, bf16, bf16)    # bfloat16: the JAX version
assert not attention_cpu_ffi.supports(odd, odd, odd)       # head size not a multiple of 16
assert not cross_entropy_cpu_ffi.supports(f32[0, 0].astype(jnp.bfloat16)) and not era_cpu_ffi.supports(bf16)
assert not sampling_cpu_ffi.supports(bf16[0, 0])
cpu_kernels.wide_vectors = lambda: False
assert not attention_cpu_ffi.supports(f32, f32, f32)       # no AVX-512: the JAX version (faster there)
cpu_kernels.wide_vectors = lambda: True                     # the step below has every kernel, on any CPU

cfg = tiny_model_config(vocab_size=512)   # head size 32, ERA with lambda = 0.1
params = M.init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (2, 25), 0, cfg.vocab_size)
mask = jnp.ones((2, 25), jnp.int32).at[1, 20:].set(0)

def loss_and_grads():  # a new function each call: traced again, so the kernels are chosen again
  def loss(params):
    model = M.VesperLM(cfg)
    x = model.apply({'params': params}, tokens[:, :-1], attention_mask_BT=mask[:, :-1], return_hidden=True)
    return losses.head_cross_entropy_and_entropy(x, *model.head_weights(params), tokens[:, 1:],
                                                 mask[:, 1:])[0]
  lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
  return lowered.as_text(), lowered.compile()(params)

# The quantized projections' and sampling's kernels are for inference (tests/test_quantize.py,
# tests/test_sampling.py): not in a training step.
training = [name for name in cpu_kernels.TARGETS if not name.endswith('_matmul') and name != 'vesper_sample']
text, with_kernels = loss_and_grads()
missing = [name for name in training if name not in text]
assert not missing, f'kernels not in the lowered step: {missing}'
cpu_kernels.usable = lambda *args, **kwargs: False
text, without = loss_and_grads()
assert not [name for name in cpu_kernels.TARGETS if name in text]
for got, want in zip(jax.tree.leaves(with_kernels), jax.tree.leaves(without)):
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
print('checked', len(jax.tree.leaves(without)), 'arrays')
"""


def test_model_with_kernels_on_one_device_equals_model_without():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _ONE_DEVICE, str(REPO)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('checked ')


def _available_in_subprocess(tmp_path, **env):
  code = 'from vesper_jax.kernels import cpu_kernels as f; print(f.available())'
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'VESPER_KERNEL_CACHE': str(tmp_path), **env})
  assert done.returncode == 0, done.stderr
  return done.stdout.strip(), done.stderr


def test_kernel_off_switch_and_failed_build_fall_back(tmp_path):
  # VESPER_CPU_KERNELS=0 turns it off; a compiler that fails leaves a warning that says so, no library
  # in the cache, and the JAX version in use.
  assert _available_in_subprocess(tmp_path, VESPER_CPU_KERNELS='0')[0] == 'False'
  out, err = _available_in_subprocess(tmp_path, CXX='false')
  assert out == 'False'
  assert 'did not build' in err and 'false' in err
  assert not list(tmp_path.glob('*.so'))


@pytest.mark.parametrize('M, V', [(5, 50), (33, 1003), (16, 4096)])
def test_softmax_cross_entropy_equals_the_jax_terms(M, V):
  # dz, nll, entropy, correct against losses._chunk_softmax_terms, including V not a multiple of 16, a
  # target that is the row's max (correct = 1), a negative id (counts from the end, as XLA's gather)
  # and an id out of range (NaN nll, no one-hot), as the JAX code does.
  keys = jax.random.split(jax.random.key(M), 3)
  z = jax.random.normal(keys[0], (M, V)) * 3
  targets = jax.random.randint(keys[1], (M,), 0, V).at[1].set(-1).at[2].set(V + 4)
  z = z.at[3, targets[3]].set(100.0)
  weights = jax.random.uniform(keys[2], (M,))
  dz, nll, ent, correct = jax.jit(cross_entropy_cpu_ffi.softmax_cross_entropy)(z, targets, weights)
  nll_r, ent_r, correct_r, _, e, s = losses._chunk_softmax_terms(z, targets, with_stats=False)
  dz_r = (e / s[:, None] - (jnp.arange(V) == targets[:, None])) * weights[:, None]
  np.testing.assert_allclose(dz, dz_r, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(nll, nll_r, rtol=1e-6, atol=1e-6)   # NaN where the reference has NaN
  np.testing.assert_allclose(ent, ent_r, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(correct, correct_r)
  assert correct[3] == 1.0 and np.isnan(nll[2])


@pytest.mark.parametrize('bias, per_token', [(False, False), (True, True)])
def test_fused_head_with_kernel_equals_without(monkeypatch, bias, per_token):
  # The fused head's loss, entropy, per-token outputs and gradients (x, kernel, bias), with padding,
  # through the kernel (forced: one device is not required for correctness) and through XLA.
  B, T, D, V = 4, 12, 32, 300
  keys = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(keys[0], (B, T, D))
  kernel = jax.random.normal(keys[1], (D, V)) * 0.2
  b = jax.random.normal(keys[2], (V,)) * 0.1 if bias else None
  targets = jax.random.randint(keys[3], (B, T), 0, V)
  weights = (jax.random.uniform(keys[4], (B, T)) < 0.8).astype(jnp.float32)

  def run():
    f = lambda x, k, b: losses.head_cross_entropy_and_entropy(x, k, b, targets, weights,
                                                              per_token=per_token)
    out = f(x, kernel, b)
    grads = jax.grad(lambda *a: f(*a)[0], (0, 1, 2) if bias else (0, 1))(x, kernel, b)
    return out, grads

  monkeypatch.setattr(cpu_kernels, 'usable', lambda *a: True)
  with_kernel = run()
  monkeypatch.setattr(cpu_kernels, 'usable', lambda *a: False)
  without = run()
  for got, want in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape, temperature, weight, detach', [
    ((5, 37), 1.0, 0.1, False),        # F not a multiple of 16
    ((2, 3, 1024), 0.7, 0.3, False),   # leading axes; small's d_ff
    ((8, 100), 2.0, 0.1, True),        # entropy detached: no gradient through H
])
def test_era_kernel_equals_the_jax_era(monkeypatch, shape, temperature, weight, detach):
  x = jax.random.normal(jax.random.key(4), shape) * 3   # saturated gates too
  w = jax.random.normal(jax.random.key(5), shape)
  ours = lambda x: era_cpu_ffi.era(x, temperature, weight, detach)
  monkeypatch.setattr(era_cpu_ffi, 'supports', lambda x: False)   # era_lib.era: the JAX code
  want = lambda x: era_lib.era(x, temperature, weight, detach)
  np.testing.assert_allclose(ours(x), want(x), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.sum(ours(x) * w)))(x),
                             jax.grad(lambda x: jnp.sum(want(x) * w))(x), rtol=1e-5, atol=2e-6)


def test_era_kernel_is_what_era_runs_where_it_applies(monkeypatch):
  x = jax.random.normal(jax.random.key(4), (4, 64))
  monkeypatch.setattr(cpu_kernels, 'usable', lambda *a: True)
  calls = []
  monkeypatch.setattr(era_cpu_ffi, 'era', lambda *a: calls.append(a) or a[0])
  era_lib.era(x, 1.0, 0.1, False)
  assert len(calls) == 1
  era_lib.era(x, 1.0, 0.0, False)   # λ = 0 is SiLU: left to XLA
  era_lib.era(x, jnp.float32(1.0), 0.1, False)   # a traced temperature: the JAX code
  assert len(calls) == 1
