"""The fused Velvet kernels against the XLA path: the Pallas kernel (kernels/velvet_pallas.py) in interpret
mode on a whole model's tree with odd sizes, on block tails, with a sparse mask, and its GPU lowering; the
in-place flat path (velvet.velvet_in_place: flat XLA and Pallas) against the optax tree path and
optax.adamw over 50 steps, with a skipped step; the jax-triton kernel (kernels/velvet_triton.py): refused
where it cannot run, compiled for sm_90 where Triton is installed, run against the one definition of the
math (velvet_elementwise.update, which the XLA and Pallas paths call) on a GPU."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, max_rel
from vesper_jax import losses
from vesper_jax import model as M
from vesper_jax import optim
from vesper_jax import velvet as V
from vesper_jax import velvet_elementwise as VE
from vesper_jax.kernels import velvet_pallas as VP


def _odd_model():
  """A VesperLM whose every leaf length is off the 1024-element block (36, 100, 1296, 3600, 13824, ...)."""
  cfg = M.ModelConfig(vocab_size=300, num_layers=2, num_heads=2, d_model=36, d_ff=100, use_bias=True)
  return cfg, M.init_params(cfg, jax.random.key(0))


def test_pallas_equals_xla_on_a_whole_model_tree_with_odd_sizes():
  cfg, params = _odd_model()
  sizes = {x.size for x in jax.tree.leaves(params)}
  assert all(s % VP.BLOCK_SIZE for s in sizes) and max(sizes) > 4 * VP.BLOCK_SIZE
  model = M.VesperLM(cfg)
  mask = optim.decay_mask(params, decay_embeddings=False)
  hp = dict(b1=0.9, b2=0.95, weight_decay=0.1, mask=mask, vocab_size=cfg.vocab_size)
  tx_xla, tx_pallas = V.velvet(3e-3, kernel='xla', **hp), V.velvet(3e-3, kernel='pallas', **hp)

  @jax.jit
  def grads_at(p, tokens_BT1):
    def loss_fn(p):
      logits = model.apply({'params': p}, tokens_BT1[:, :-1])
      return losses.cross_entropy_and_entropy(logits, tokens_BT1[:, 1:])
    return jax.value_and_grad(loss_fn, has_aux=True)(p)

  update_xla, update_pallas = jax.jit(tx_xla.update), jax.jit(tx_pallas.update)
  p, s_x, s_k = params, tx_xla.init(params), tx_pallas.init(params)
  for t in range(3):
    tokens = jax.random.randint(jax.random.key(t), (2, 17), 0, cfg.vocab_size)
    (loss, entropy), g = grads_at(p, tokens)
    # Both paths get the same gradients, so the comparison sees the kernel alone (no chaotic drift).
    u_x, s_x = update_xla(g, s_x, p, loss=loss, entropy=entropy / math.log(cfg.vocab_size))
    u_k, s_k = update_pallas(g, s_k, p, loss=loss, entropy=entropy / math.log(cfg.vocab_size))
    assert max_rel(u_k, u_x) <= 1e-6
    p = optax.apply_updates(p, u_x)
  assert max_rel(s_k.mu, s_x.mu) <= 1e-6 and max_rel(s_k.nu, s_x.nu) <= 1e-6
  assert float(s_k.beta1) == float(s_x.beta1) and float(s_k.s_entropy) == float(s_x.s_entropy)


# One step's scalars, with a clip factor: every slot of the kernel's vector is used.
_SCALARS = VE.StepScalars(step=jnp.float32(-1e-2), beta1=jnp.float32(0.8),
                          one_minus_beta1=jnp.float32(1 - 0.8), c1=jnp.float32(0.36), c2=jnp.float32(0.0975),
                          b2=0.95, one_minus_b2=1 - 0.95, grad_scale=jnp.float32(0.7))


@pytest.mark.parametrize('n,block_size', [(1, 1024), (1023, 1024), (1025, 1024), (3 * 1024 + 5, 1024),
                                          (1000, 128)])
def test_in_place_kernel_on_block_tails(n, block_size):
  rng = np.random.default_rng(n)
  p, g, m = (jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(3))
  v = jnp.asarray(rng.random(n), jnp.float32)
  want_p, m_x, v_x = VE.update(p, g, m, v, scalars=_SCALARS, eps=1e-8, weight_decay=0.1, write_params=True)
  step = jax.jit(lambda *a: VP.velvet_update(*a, eps=1e-8, weight_decay=0.1, write_params=True,
                                             block_size=block_size), donate_argnums=(1, 3, 4))
  p_k, m_k, v_k = step(VP.pack_scalars(_SCALARS), jnp.array(p), g, jnp.array(m), jnp.array(v))
  assert p_k.shape == (n,)
  np.testing.assert_allclose(p_k, want_p, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(p))))
  np.testing.assert_allclose(m_k, m_x, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(m_x))))
  np.testing.assert_allclose(v_k, v_x, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(v_x))))


def test_kernel_sparse_mask_freezes_elements_bitwise():
  rng = np.random.default_rng(3)
  params = {'w': jnp.asarray(rng.normal(size=(33, 70)), jnp.float32)}  # 2310: a partial third block
  keep = {'w': jnp.asarray(rng.random((33, 70)) < 0.5)}
  tx = V.velvet(1e-2, sparse_aware=keep, kernel='pallas')
  update = jax.jit(tx.update)
  state, p = tx.init(params), params
  for t in range(20):
    g = {'w': jnp.asarray(rng.normal(size=(33, 70)), jnp.float32)}
    u, state = update(g, state, p, loss=2.0 + t / 10, entropy=0.4)
    p = optax.apply_updates(p, u)
  frozen = ~np.asarray(keep['w'])
  np.testing.assert_array_equal(np.asarray(p['w'])[frozen], np.asarray(params['w'])[frozen])
  assert not np.asarray(state.mu['w'])[frozen].any() and not np.asarray(state.nu['w'])[frozen].any()
  assert np.all(np.asarray(p['w'])[~frozen] != np.asarray(params['w'])[~frozen])


def test_auto_is_xla_on_cpu_and_pallas_is_one_call_per_buffer():
  flat = {'a': jnp.ones((5000,)), 'b': jnp.ones((37,))}
  def jaxpr_text(kernel):
    tx = V.velvet(1e-3, kernel=kernel)
    return str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, loss=3.0, entropy=0.5))(
        flat, tx.init(flat), flat))
  assert 'pallas_call' not in jaxpr_text('auto')
  assert jaxpr_text('pallas').count('pallas_call[') == 2


@pytest.mark.parametrize('write_params', [True, False])
def test_kernel_lowers_for_gpu_through_triton_with_all_buffers_aliased(write_params):
  """Lowers (does not run) the kernel for CUDA: the Triton IR is built here, so unsupported ops or block
  shapes would fail now rather than on the first GPU run."""
  n = 3 * 1024 + 5
  args = [jax.ShapeDtypeStruct((VP.NUM_SCALARS,), jnp.float32)]
  args += [jax.ShapeDtypeStruct((n,), jnp.float32)] * 4 + [jax.ShapeDtypeStruct((n,), jnp.int8)]
  fn = jax.jit(lambda *a: VP.velvet_update(*a, eps=1e-8, weight_decay=0.1,
                                           write_params=write_params, interpret=False))
  # JAX imports this module to lower a pallas_call for CUDA and turns its ImportError into a generic
  # "Cannot lower pallas_call on platform: gpu". Importing it first skips a jaxlib built without
  # Pallas-Triton, naming the missing module; any other error of the lowering below fails the test.
  pytest.importorskip('jax._src.pallas.triton.pallas_call_registration', exc_type=ImportError)
  text = fn.trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('__gpu$xla.gpu.triton') == 1
  aliases = re.findall(r'output_tuple_indices = \[(\d)\], operand_index = (\d)', text)
  # operands: 0 scalars, 1 p, 2 g, 3 m, 4 v, 5 keep → outputs 0 (p or u), 1 m, 2 v
  assert sorted(aliases) == [('0', '1' if write_params else '2'), ('1', '3'), ('2', '4')]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU (run with JAX_PLATFORMS=cuda)')
def test_compiled_kernel_matches_xla_on_gpu():
  n = 10 * 1024 * 1024 + 7  # many blocks and a tail, compiled through Triton
  rng = np.random.default_rng(0)
  p, g, m = (jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(3))
  v = jnp.asarray(rng.random(n), jnp.float32)
  want_p, m_x, v_x = jax.jit(lambda *a: VE.update(*a, scalars=_SCALARS, eps=1e-8, weight_decay=0.1,
                                                   write_params=True))(p, g, m, v)
  for write_params in (True, False):
    out, m_k, v_k = jax.jit(lambda *a: VP.velvet_update(*a, eps=1e-8, weight_decay=0.1,
                                                        write_params=write_params))(
        VP.pack_scalars(_SCALARS), p, g, m, v)
    got_p = out if write_params else p + out
    assert float(jnp.max(jnp.abs(got_p - want_p))) <= 1e-6 * float(jnp.max(jnp.abs(want_p)))
    assert float(jnp.max(jnp.abs(m_k - m_x))) <= 1e-6 * float(jnp.max(jnp.abs(m_x)))
    assert float(jnp.max(jnp.abs(v_k - v_x))) <= 1e-6 * float(jnp.max(jnp.abs(v_x)))


# ------------------------------------------------------------------------------ the in-place flat path

def _tiny_tree():
  """Odd-sized leaves (block tails everywhere), a 2-D decayed group and an undecayed vector group."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(37, 29)), jnp.float32),
            'emb': jnp.asarray(rng.normal(size=(50, 13)), jnp.float32),
            'norm': jnp.asarray(1 + 0.1 * rng.normal(size=(29,)), jnp.float32)}
  mask = {'w': True, 'emb': True, 'norm': False}
  return params, mask


def _run_paths(steps: int, velvet_args: dict, clip: float, nonfinite_at: int | None = None):
  """(tree result, {kernel: flat result}) after `steps` steps of gradients g = p·a + noise_t, with the
  loss and entropy moving step to step and the global-norm clip active on some steps."""
  params, mask = _tiny_tree()
  layout = V.flat_layout(params, mask, pad_multiple=64)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 5, steps, 3e-3)
  rng = np.random.default_rng(1)
  noise = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(steps)]
  grads_at = lambda p, t: jax.tree.map(lambda x, n: 0.5 * x + n * (1 + t % 3), p, noise[t])
  losses_ = [4.0 - 2.5 * t / steps for t in range(steps)]
  entropies = [0.3 + 0.4 * ((t * 7) % 5) / 5 for t in range(steps)]

  tx = optax.chain(optax.clip_by_global_norm(clip), V.velvet(schedule, mask=mask, kernel='xla',
                                                               **velvet_args))
  tree_update = jax.jit(lambda g, s, p, loss, entropy: tx.update(g, s, p, loss=loss, entropy=entropy))
  p, s = params, tx.init(params)
  for t in range(steps):
    if t == nonfinite_at:
      continue  # the train step's skip: nothing changes
    u, s = tree_update(grads_at(p, t), s, p, losses_[t], entropies[t])
    p = optax.apply_updates(p, u)
  tree = (p, s[1])

  flat = {}
  for kernel in ('xla_flat', 'pallas'):
    opt = V.velvet_in_place(schedule, layout.decay_mask(), kernel=kernel, block_size=128, **velvet_args)

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def step(fp, fg, state, loss, entropy):
      norm = optax.tree.norm(fg)
      ok = jnp.isfinite(norm)
      scale = jnp.where(norm < clip, 1.0, clip / norm)
      return opt.step(fp, fg, state, loss=loss, entropy=entropy, grad_scale=scale, ok=ok)

    fp, state = layout.flatten(params), jax.jit(opt.init)(layout.flatten(params))
    for t in range(steps):
      g = layout.flatten(grads_at(layout.unflatten(fp), t))
      if t == nonfinite_at:
        g = jax.tree.map(lambda x: x.at[3].set(jnp.nan), g)
        before = jax.tree.map(np.asarray, (fp, state))
      fp, state = step(fp, g, state, losses_[t], entropies[t])
      if t == nonfinite_at:  # a skipped step writes every buffer back bit for bit
        after = jax.tree.map(np.asarray, (fp, state))
        jax.tree.map(np.testing.assert_array_equal, after, before)
    flat[kernel] = (layout, fp, state)
  return tree, flat


def _assert_flat_matches_tree(tree, flat, tol):
  p_tree, s_tree = tree
  for kernel, (layout, fp, state) in flat.items():
    assert max_rel(layout.unflatten(fp), p_tree) <= tol, kernel
    assert max_rel(layout.unflatten(state.mu), s_tree.mu) <= tol, kernel
    assert max_rel(layout.unflatten(state.nu), s_tree.nu) <= tol, kernel
    assert int(state.count) == int(s_tree.count)
    assert float(state.beta1_product) == pytest.approx(float(s_tree.beta1_product), rel=1e-6)
    # The padding stays zero: it splits evenly over a mesh axis and never moves.
    for name, size, _ in layout.buffers:
      used = sum(math.prod(shape) for buf, _, shape in layout.slots if buf == name)
      assert used < size and not np.asarray(fp[name][used:]).any()


def test_in_place_paths_equal_the_optax_tree_path_over_50_steps():
  """Tree XLA (optax: clip, velvet, apply_updates) == flat XLA == flat Pallas (interpret), with the
  clip factor, the schedule, s_E, β1_t and the bias corrections all moving, and a skipped step."""
  tree, flat = _run_paths(50, dict(b1=0.9, b2=0.95, weight_decay=0.1), clip=8.0, nonfinite_at=20)
  assert float(tree[1].s_entropy) != 1.0 and float(tree[1].beta1) != 0.9  # the scalings were live
  _assert_flat_matches_tree(tree, flat, 1e-6)
  _, fp_x, s_x = flat['xla_flat']
  _, fp_k, s_k = flat['pallas']
  assert max_rel(fp_k, fp_x) <= 1e-6 and max_rel(s_k.mu, s_x.mu) <= 1e-6


def test_in_place_adamw_flags_off_equals_optax_adamw_over_50_steps():
  params, mask = _tiny_tree()
  tree, flat = _run_paths(50, dict(b1=0.9, b2=0.95, weight_decay=0.1, entropy_adaptive=False,
                                   perplexity_guided=False), clip=8.0)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 5, 50, 3e-3)
  adamw = optax.chain(optax.clip_by_global_norm(8.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask))
  rng = np.random.default_rng(1)
  noise = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(50)]
  update = jax.jit(adamw.update)
  p, s = params, adamw.init(params)
  for t in range(50):
    u, s = update(jax.tree.map(lambda x, n: 0.5 * x + n * (1 + t % 3), p, noise[t]), s, p)
    p = optax.apply_updates(p, u)
  _assert_flat_matches_tree(tree, flat, 1e-6)
  adam_state = s[1][0]  # chain → adamw's chain → ScaleByAdamState
  # Each path on its own against optax (the paths share their per-element math, so agreeing with each
  # other proves little); all are measured before the assertion, so a failure names every path that is off.
  errors = {kernel: (max_rel(layout.unflatten(fp), p), max_rel(layout.unflatten(state.mu), adam_state.mu))
            for kernel, (layout, fp, state) in flat.items()}
  assert all(max(e) <= 1e-6 for e in errors.values()), errors


def test_in_place_pallas_is_one_aliased_call_per_buffer():
  params, mask = _tiny_tree()
  layout = V.flat_layout(params, mask)
  opt = V.velvet_in_place(1e-3, layout.decay_mask(), kernel='pallas')
  flat = layout.flatten(params)
  text = str(jax.make_jaxpr(lambda p, g, s: opt.step(p, g, s, loss=3.0, entropy=0.5, grad_scale=1.0,
                                                      ok=True))(flat, flat, opt.init(flat)))
  assert text.count('pallas_call[') == 2 and 'write_params' not in text
  with pytest.raises(ValueError, match="kernel='xla': expected one of"):
    V.velvet_in_place(1e-3, layout.decay_mask(), kernel='xla')


# ------------------------------------------------------------------------------ the jax-triton variant

def test_triton_is_refused_at_validation_in_one_line_where_it_cannot_run():
  from vesper_jax import config as base_config
  from vesper_jax.kernels import velvet_triton as VT
  if VT.unavailable_reason() is None:
    pytest.skip('Triton and a GPU are here: the kernel runs (test_triton_matches_xla_on_gpu)')
  config = load_config('tiny')
  config.opt.name, config.opt.kernel = 'velvet', 'triton'
  with pytest.raises(ValueError, match=r"opt.kernel='triton' (needs jax-triton|runs on a CUDA GPU)") as error:
    base_config.validate(config)
  assert '\n' not in str(error.value)
  config.opt.kernel = 'pallas'
  base_config.validate(config)  # the in-place Pallas path is fine everywhere (interpret mode on CPU)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU (run with JAX_PLATFORMS=cuda)')
def test_triton_matches_xla_on_gpu():
  """The Triton kernel is the one transcription of velvet_elementwise.update (a @triton.jit body cannot
  call it): this is what holds the two together, with and without the weight-decay branch."""
  from vesper_jax.kernels import velvet_triton as VT
  if not VT.AVAILABLE:
    pytest.skip("jax-triton is not installed (pip install 'vesper_jax[triton]')")
  n = 10 * 1024 * 1024 + 7  # many blocks and a tail
  rng = np.random.default_rng(0)
  p, g, m = (jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(3))
  v = jnp.asarray(rng.random(n), jnp.float32)
  for wd in (0.1, 0.0):
    want_p, m_x, v_x = jax.jit(lambda *a: VE.update(*a, scalars=_SCALARS, eps=1e-8, weight_decay=wd,
                                                     write_params=True))(p, g, m, v)
    got_p, m_k, v_k = jax.jit(lambda *a: VT.velvet_update(*a, eps=1e-8, weight_decay=wd))(
        VP.pack_scalars(_SCALARS), p, g, m, v)
    assert float(jnp.max(jnp.abs(got_p - want_p))) <= 1e-6 * float(jnp.max(jnp.abs(want_p))), wd
    assert float(jnp.max(jnp.abs(m_k - m_x))) <= 1e-6 * float(jnp.max(jnp.abs(m_x))), wd
    assert float(jnp.max(jnp.abs(v_k - v_x))) <= 1e-6 * float(jnp.max(jnp.abs(v_x))), wd
  # A skipped step (identity scalars, NaN gradients) writes everything back unchanged.
  bad_g = g.at[5].set(jnp.nan)
  same_p, same_m, same_v = jax.jit(lambda *a: VT.velvet_update(*a, eps=1e-8, weight_decay=0.1))(
      VP.pack_scalars(VE.SKIPPED), p, bad_g, m, v)
  assert bool(jnp.all(same_p == p)) and bool(jnp.all(same_m == m)) and bool(jnp.all(same_v == v))


def test_triton_kernel_compiles_to_ptx_for_sm90_without_a_gpu():
  """Triton alone (no GPU, no jax-triton) compiles the kernel for an H100/H200 target: the language
  use, the constexpr branches and the IEEE division and square root are checked before any GPU run."""
  triton = pytest.importorskip('triton', reason='Triton is not installed (the `triton` extra)')
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  from vesper_jax.kernels import velvet_triton as VT
  inputs = {'s_ptr': '*fp32', 'p_ptr': '*bf16', 'g_ptr': '*bf16', 'm_ptr': '*fp32', 'v_ptr': '*fp32'}
  outputs = {'p_out_ptr': '*bf16', 'm_out_ptr': '*fp32', 'v_out_ptr': '*fp32'}
  constants = {'n': 3 * 1024 + 5, 'block_size': 1024, 'eps': 1e-8, 'weight_decay': 0.1}
  # Both calling conventions: jax-triton ≤ 0.3 (aliased outputs as pointers) and ≥ 0.4 (written in place).
  for kernel, pointers in ((VT._velvet_kernel, inputs | outputs), (VT._velvet_kernel_in_place, inputs)):
    source = ASTSource(fn=kernel, signature=pointers | {k: 'constexpr' for k in constants},
                       constexprs=constants)
    ptx = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                         options={'num_warps': 4, 'num_stages': 1}).asm['ptx']
    assert 'sqrt.rn.f32' in ptx and 'div.rn.f32' in ptx and 'sqrt.approx' not in ptx
