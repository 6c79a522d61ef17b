"""Weight-only int8/int4 quantization: error bounds, int4 packing, KV-cache decoding on the quantized tree,
and quantized safetensors files (bit-exact round trips, refusals between float and quantized files)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from conftest import REPO, make_workdir, naive_greedy, tiny_model_config
from vesper_jax import decode, export, finetune, quantize
from vesper_jax.kernels import cpu_kernels, quantized_matmul_cpu_ffi
from vesper_jax.model import VesperLM, cast_for_inference, init_params
from vesper_jax.sampling import GREEDY

SCHEMES = [('int8', False), ('int4', False), ('int4', True)]


_tiny = functools.partial(tiny_model_config, vocab_size=512)


def _weights(shape, seed=0) -> jax.Array:
  """Gaussian weights with a few outliers and one skewed column, as trained projections have."""
  w = 0.02 * jax.random.normal(jax.random.key(seed), shape)
  w = w.at[3, :].multiply(8.0)             # an outlier input row
  return w.at[:, 1].add(0.05)              # a column whose values are all shifted (int4 groups skew)


# ---------------------------------------------------------------------------------------------- numbers

def test_int8_error_is_at_most_half_a_step_per_channel():
  w_IO = _weights((256, 48))
  q_IO, scales_O = quantize.quantize_int8(w_IO)
  assert q_IO.dtype == jnp.int8 and scales_O.shape == (48,) and scales_O.dtype == jnp.float32
  err_IO = jnp.abs(quantize.dequantize_int8(q_IO, scales_O) - w_IO)
  assert bool(jnp.all(err_IO <= scales_O * (0.5 + 1e-5)))
  assert bool(jnp.all(jnp.max(jnp.abs(q_IO.astype(jnp.int32)), axis=0) == 127))  # the grid spans each channel
  # An all-zero channel stays exactly zero.
  q_IO, scales_O = quantize.quantize_int8(w_IO.at[:, 5].set(0.0))
  assert bool(jnp.all(quantize.dequantize_int8(q_IO, scales_O)[:, 5] == 0.0))


@pytest.mark.parametrize('group_size', [128, 32])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
  I, O = 256, 40
  w_IO = _weights((I, O), seed=1).at[:group_size, 7].set(0.3)  # one constant group: represented exactly
  packed_JO, scales_GO, mins_GO = quantize.quantize_int4(w_IO, group_size)
  G = I // group_size
  assert packed_JO.shape == (I // 2, O) and packed_JO.dtype == jnp.uint8
  assert scales_GO.shape == mins_GO.shape == (G, O) and scales_GO.dtype == mins_GO.dtype == jnp.float32
  err_GkO = jnp.abs(quantize.dequantize_int4(packed_JO, scales_GO, mins_GO) - w_IO).reshape(G, -1, O)
  assert bool(jnp.all(err_GkO <= scales_GO[:, None] * (0.5 + 1e-5)))
  assert float(err_GkO[0, :, 7].max()) == 0.0
  q_IO = quantize.unpack_int4(packed_JO).reshape(G, -1, O)
  assert int(q_IO.min()) == 0 and bool(jnp.all(q_IO.max(axis=1)[:, :7] == 15))  # all 16 levels in use


def test_int4_packing_round_trip_is_exact():
  q_IO = jax.random.randint(jax.random.key(0), (130, 7), 0, 16).astype(jnp.uint8)
  packed_JO = quantize.pack_int4(q_IO)
  assert packed_JO.shape == (65, 7) and packed_JO.dtype == jnp.uint8
  np.testing.assert_array_equal(quantize.unpack_int4(packed_JO), q_IO)
  # The layout: input row 2j in the low nibble, row 2j+1 in the high nibble of byte j.
  np.testing.assert_array_equal(packed_JO, q_IO[0::2] + 16 * q_IO[1::2])
  with pytest.raises(ValueError, match='odd'):
    quantize.pack_int4(q_IO[:129])


def test_sizes_that_do_not_fit_the_group_are_refused_by_name():
  with pytest.raises(ValueError, match=r'layers_0/ffn/down_proj has input dimension 200.*group size 128'):
    quantize.quantize_int4(jnp.zeros((200, 8)), 128, 'layers_0/ffn/down_proj')
  with pytest.raises(ValueError, match=r'model.d_ff=200 \(the input of ffn.down_proj\)'):
    _tiny(d_ff=200, quantize='int4')
  with pytest.raises(ValueError, match='model.quantize_group_size=3'):
    _tiny(quantize='int4', quantize_group_size=3)
  _tiny(d_ff=200, quantize='int8')  # per-channel int8 has no groups: any size


def test_config_refusals_name_the_setting():
  with pytest.raises(ValueError, match="model.quantize='int3'"):
    _tiny(quantize='int3')
  with pytest.raises(ValueError, match='tie_embeddings'):
    _tiny(quantize='int8', quantize_head=True, tie_embeddings=True)
  with pytest.raises(ValueError, match='lora_targets'):
    _tiny(quantize='int8', lora_targets='q')
  with pytest.raises(ValueError, match='already quantized'):
    quantize.quantize_model(_tiny(quantize='int8'), {}, 'int4')


# ------------------------------------------------------------------------------------------ the model

@pytest.fixture(scope='module')
def float_model():
  config = _tiny(num_kv_heads=2)
  return config, init_params(config, jax.random.key(0))


@pytest.mark.parametrize('scheme,head', SCHEMES)
def test_quantized_tree_is_what_the_quantized_config_builds(float_model, scheme, head):
  config, params = float_model
  qconfig, qparams = quantize.quantize_model(config, params, scheme, quantize_head=head)
  expected = jax.eval_shape(lambda: init_params(qconfig, jax.random.key(0)))
  assert jax.tree.structure(qparams) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(qparams), jax.tree.leaves(expected)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  np.testing.assert_array_equal(qparams['embeddings']['embedding'], params['embeddings']['embedding'])
  assert ('kernel' in qparams['lm_head']) != head
  # Exact bytes: int8 = 1 byte + a float32 scale per output; int4 = 1/2 byte + 2 float32 per 128 inputs.
  float_bytes = quantize.weight_bytes(params)['projections']
  ratio = quantize.weight_bytes(qparams)['projections'] / float_bytes
  assert ratio == pytest.approx(0.25 + 1 / config.d_model if scheme == 'int8' else 1 / 8 + 2 / 128, rel=0.01)


@pytest.mark.parametrize('scheme,head', SCHEMES)
def test_quantized_logits_stay_close_to_float(float_model, scheme, head):
  config, params = float_model
  qconfig, qparams = quantize.quantize_model(config, params, scheme, quantize_head=head)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, config.vocab_size)
  ref = VesperLM(config).apply({'params': params}, tokens)
  got = VesperLM(qconfig).apply({'params': qparams}, tokens)
  rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  # Gaussian weights: int4's step is ~0.35 σ (rms error ~0.1 σ per weight), int8's ~0.02 σ. A wrong
  # nibble order or group layout gives errors of order 1.
  assert 0 < rel < (0.02 if scheme == 'int8' else 0.2), rel


@pytest.mark.parametrize('chunk_size', [1, 8])
@pytest.mark.parametrize('scheme,head', SCHEMES)
def test_quantized_kv_cache_greedy_equals_full_forward(float_model, scheme, head, chunk_size):
  config, params = float_model
  qconfig, qparams = quantize.quantize_model(config, params, scheme, quantize_head=head)
  prompt = [5, 17, 300, 42, 7, 7, 100]
  got = decode.generate(qparams, qconfig, [prompt], max_new_tokens=16, sampling=GREEDY,
                        chunk_size=chunk_size)[0]
  assert got == naive_greedy(qconfig, qparams, prompt, 16)
  assert len(set(got)) > 4  # a random model still produces varied tokens: the comparison means something


def test_decode_steps_take_the_integer_weights(float_model):
  """The jitted step's inputs are the int8 / packed uint8 tensors: no float copy is made at load time."""
  config, params = float_model
  for scheme, dtype in (('int8', 'i8'), ('int4', 'ui8')):
    qconfig, qparams = quantize.quantize_model(config, params, scheme)
    prompt_BP, mask_BP = decode.left_pad([[1, 2, 3]])
    hlo = decode.prefill.lower(qparams, prompt_BP, mask_BP, jax.random.key(0), config=qconfig,
                               sampling=GREEDY, eos_id=None, cache_len=80).as_text()
    I, O = config.d_ff, config.d_model  # down_proj
    shape = f'{I}x{O}x{dtype}' if scheme == 'int8' else f'{I // 2}x{O}x{dtype}'
    signature = next(line for line in hlo.splitlines() if 'func.func public @main' in line)
    assert f'tensor<{shape}>' in signature and f'tensor<{I}x{O}xf32>' not in signature


def test_bfloat16_cast_keeps_the_integer_weights(float_model):
  config, params = float_model
  qconfig, qparams = quantize.quantize_model(config, params, 'int4')
  bconfig, bparams = cast_for_inference(qconfig, qparams, 'bfloat16')
  proj = bparams['layers_0']['ffn']['down_proj']
  assert proj['qweight'].dtype == jnp.uint8 and proj['scales'].dtype == jnp.float32
  assert bparams['embeddings']['embedding'].dtype == jnp.bfloat16
  tokens = jnp.arange(16)[None]
  ref = VesperLM(qconfig).apply({'params': qparams}, tokens)
  got = VesperLM(bconfig).apply({'params': bparams}, tokens)
  assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.05


# ------------------------------------------------------------------------------------------ files

@pytest.mark.parametrize('scheme,head', SCHEMES + [('int8', True)])
def test_quantized_export_round_trip_is_bit_exact(scheme, head, tmp_path):
  config = _tiny(use_bias=True, norm='rmsnorm')
  params = init_params(config, jax.random.key(2))
  qconfig, qparams = quantize.quantize_model(config, params, scheme, quantize_head=head)
  path = tmp_path / 'model.safetensors'
  export.save_safetensors(qparams, qconfig, path)
  for loaded in (export.load_safetensors(path), export.load_safetensors(path, qconfig)):
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert export.config_from_safetensors(path) == qconfig.replace(platform='cpu')  # the loader's platform
  with safe_open(str(path), framework='numpy') as f:
    metadata = f.metadata()
    down = {leaf: f.get_tensor(f'layers.1.ffn.down_proj.{leaf}') for leaf in ('qweight', 'scales')}
    assert ('lm_head.qweight' in f.keys()) == head and ('lm_head.weight' in f.keys()) != head
    assert f.get_tensor('layers.1.ffn.down_proj.bias').dtype == np.float32
  assert metadata['quantize'] == scheme and metadata['quantize_group_size'] == '128'
  O, I = config.d_model, config.d_ff  # [out, in], as the float export
  if scheme == 'int8':
    assert (down['qweight'].dtype, down['qweight'].shape) == (np.int8, (O, I))
    assert (down['scales'].dtype, down['scales'].shape) == (np.float32, (O,))
  else:
    assert (down['qweight'].dtype, down['qweight'].shape) == (np.uint8, (O, I // 2))
    assert (down['scales'].dtype, down['scales'].shape) == (np.float32, (O, I // 128))


def test_float_and_quantized_files_refuse_each_other_with_the_reason(tmp_path):
  config = _tiny()
  params = init_params(config, jax.random.key(0))
  int8_config, int8_params = quantize.quantize_model(config, params, 'int8')
  export.save_safetensors(int8_params, int8_config, tmp_path / 'int8.safetensors')
  export.save_safetensors(params, config, tmp_path / 'float.safetensors')
  with pytest.raises(ValueError, match=r'holds int8 weights, the model expects float weights'):
    export.load_safetensors(tmp_path / 'int8.safetensors', config)
  with pytest.raises(ValueError, match=r"holds float weights, the model expects int4 \(groups of 128\).*"
                                       r"quantize_model"):
    export.load_safetensors(tmp_path / 'float.safetensors', config.replace(quantize='int4'))
  with pytest.raises(ValueError, match=r'holds int8 weights, the model expects int4'):
    export.load_safetensors(tmp_path / 'int8.safetensors', config.replace(quantize='int4'))
  with pytest.raises(ValueError, match=r"init_from=.*quantized for inference \(model.quantize='int8'\)"):
    finetune.load_base(str(tmp_path / 'int8.safetensors'), config)
  with pytest.raises(ValueError, match='model.quantize'):
    export.check_llama_compatible(int8_config.replace(norm='rmsnorm', activation='silu'))


def test_export_and_generate_cli_with_quantize(tmp_path):
  workdir = make_workdir(tmp_path / 'run')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True,
                                     text=True, timeout=300)
  done = run('vesper_jax.export', f'--workdir={workdir}', f'--out={tmp_path / "q"}', '--quantize=int4')
  assert done.returncode == 0, done.stderr
  qconfig = export.config_from_safetensors(tmp_path / 'q' / 'model.safetensors')
  assert qconfig.quantize == 'int4' and not qconfig.quantize_head
  export.load_safetensors(tmp_path / 'q' / 'model.safetensors')
  done = run('vesper_jax.export', f'--workdir={workdir}', f'--out={tmp_path / "hf"}', '--format=hf',
             '--quantize=int8')
  assert done.returncode == 1 and '--quantize=int8 needs --format=vesper' in done.stderr
  done = run('vesper_jax.generate', f'--workdir={workdir}', '--prompt=The quick', '--quantize=int8',
             '--quantize_head', '--temperature=0', '--max_new_tokens=8')
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith('The quick') and len(done.stdout) > len('The quick\n')


# ------------------------------------------------------------------------------- the CPU decode kernel

_needs_kernels = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or not cpu_kernels.available(),
    reason='the CPU kernels did not build here (no C++ compiler, or not a CPU backend): quantized '
           'projections use the XLA formulation, which the tests above check')


def _kernel_operands(scheme, M, I, O, group_size, seed=0):
  x_MI = jax.random.normal(jax.random.key(seed), (M, I))
  w_IO = _weights((I, O), seed + 1)
  if scheme == 'int8':
    q_IO, scales_O = quantize.quantize_int8(w_IO)
    return x_MI, (q_IO, scales_O), np.asarray(quantize.dequantize_int8(q_IO, scales_O), np.float64)
  packed_JO, scales_GO, mins_GO = quantize.quantize_int4(w_IO, group_size)
  w64_IO = np.asarray(quantize.dequantize_int4(packed_JO, scales_GO, mins_GO), np.float64)
  return x_MI, (packed_JO, scales_GO, mins_GO), w64_IO


@_needs_kernels
@pytest.mark.parametrize('scheme', ['int8', 'int4'])
@pytest.mark.parametrize('M, I, O, group_size', [
    (1, 128, 64, 32),      # one vector row band, whole 8-column vectors
    (1, 130, 77, 26),      # int8: rows past the last band of 4; int4: 13 byte rows per group; odd O
    (3, 96, 45, 6),        # several rows; int4 groups of 3 byte rows (no band of 4 at all)
    (4, 256, 517, 128),    # columns past the last vector
    (128, 64, 40, 16),     # the most rows the model sends (quantize.KERNEL_MAX_ROWS)
    (1, 1024, 1100, 128),  # over 1 M weights: rows split among threads, each band's sums added up
    (3, 1040, 800, 130),   # 3 bands; int4: bands that start and end inside a group (65 byte rows each)
    (5, 64, 37, 16),       # past 4 rows: the dequantized-panel path, one band of 5, a partial panel
    (13, 64, 37, 16),      # bands of 6, 6 and 1
    (8, 512, 300, 128),    # the panel path with columns split among threads, the last piece uneven
])
def test_kernel_equals_float64_reference(scheme, M, I, O, group_size):
  # The kernel's product against numpy's in float64 on the same dequantized weights: only float32
  # rounding apart. A wrong nibble order, group or scale index is off by the weights' size.
  x_MI, weights, w64_IO = _kernel_operands(scheme, M, I, O, group_size)
  matmul = (quantized_matmul_cpu_ffi.int8_matmul if scheme == 'int8'
            else quantized_matmul_cpu_ffi.int4_matmul)
  got_MO = np.asarray(jax.jit(matmul)(x_MI, *weights))
  want_MO = np.asarray(x_MI, np.float64) @ w64_IO
  assert got_MO.shape == (M, O) and got_MO.dtype == np.float32
  np.testing.assert_allclose(got_MO, want_MO, rtol=1e-4, atol=2e-6 * np.abs(want_MO).max() * np.sqrt(I))


@_needs_kernels
def test_kernel_detects_a_swapped_nibble_order():
  # The check above can fail: the same weights with the two nibbles of every byte swapped (odd input
  # rows read as even ones) give a product far from the reference.
  x_MI, (packed_JO, scales_GO, mins_GO), w64_IO = _kernel_operands('int4', 1, 256, 64, 128)
  swapped_JO = (packed_JO >> 4) | (packed_JO << 4)
  got = np.asarray(quantized_matmul_cpu_ffi.int4_matmul(x_MI, swapped_JO, scales_GO, mins_GO))
  want = np.asarray(x_MI, np.float64) @ w64_IO
  assert np.abs(got - want).max() > 0.1 * np.abs(want).max()


def test_kernel_is_not_chosen_over_several_devices_or_off_cpu(float_model):
  # 8 simulated devices here: the XLA formulation (cpu_kernels.usable). platform='gpu' makes the
  # accelerator's choice on any machine: the XLA formulation, which must keep lowering.
  config, params = float_model
  for platform in ('cpu', 'gpu'):
    qconfig, qparams = quantize.quantize_model(config.replace(platform=platform), params, 'int8',
                                               quantize_head=True)
    step = jax.jit(lambda p, t: VesperLM(qconfig).apply({'params': p}, t))
    text = step.lower(qparams, jnp.zeros((1, 1), jnp.int32)).as_text()
    assert 'vesper_int8_matmul' not in text and 'dot_general' in text


# Run with one device (python -c _ONE_DEVICE REPO): where the kernel is chosen (decode steps of at most
# KERNEL_MAX_ROWS rows on the CPU platform; not longer prefills, not platform='gpu'), and the same decoding with
# the kernel as the model chooses it and with cpu_kernels.usable off: identical greedy tokens, and
# logits of every step within float32 rounding of each other.
_ONE_DEVICE = """
import sys
sys.path.insert(0, sys.argv[1] + '/tests')
import jax, jax.numpy as jnp, numpy as np
from conftest import decode_stepwise, tiny_model_config
from vesper_jax import decode, quantize
from vesper_jax.model import VesperLM, init_params
from vesper_jax.kernels import cpu_kernels
from vesper_jax.sampling import GREEDY

assert jax.device_count() == 1, jax.devices()
usable = cpu_kernels.usable
tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 512)
for scheme, bias in (('int8', False), ('int4', True)):
  cpu_kernels.usable = usable
  config = tiny_model_config(vocab_size=512, num_kv_heads=2, use_bias=bias)
  params = init_params(config, jax.random.key(0))
  if bias:  # non-zero biases, so that a bias the kernel path dropped would show
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key == 'bias' else x, params)
  qconfig, qparams = quantize.quantize_model(config, params, scheme, quantize_head=True)
  target = f'vesper_{scheme}_matmul'
  text = lambda cfg, T: jax.jit(lambda p, t: VesperLM(cfg).apply({'params': p}, t)).lower(
      qparams, jnp.zeros((1, T), jnp.int32)).as_text()
  assert target in text(qconfig, 1)                                  # one row: the kernel
  assert target in text(qconfig, quantize.KERNEL_MAX_ROWS)
  assert target not in text(qconfig, quantize.KERNEL_MAX_ROWS + 1)   # prefill-sized: XLA
  assert target not in text(qconfig.replace(platform='gpu'), 1)      # the accelerator's choice

  def run():
    cpu_kernels.usable = usable_now
    jax.clear_caches()  # decode's jitted functions trace again, and choose again
    logits = decode_stepwise(qconfig, qparams, tokens, prompt_len=5)
    greedy = decode.generate(qparams, qconfig, [[5, 17, 300, 42, 7]], max_new_tokens=24, sampling=GREEDY,
                             chunk_size=8)[0]
    return np.asarray(logits), greedy

  usable_now = usable
  with_kernel = run()
  usable_now = lambda *args, **kwargs: False
  without = run()
  np.testing.assert_allclose(with_kernel[0], without[0], rtol=1e-4, atol=1e-4)
  assert with_kernel[1] == without[1] and len(set(without[1])) > 4, (with_kernel[1], without[1])
print('checked int8 and int4')
"""


@_needs_kernels
def test_decode_with_kernel_on_one_device_equals_xla_formulation():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _ONE_DEVICE, str(REPO)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('checked ')
