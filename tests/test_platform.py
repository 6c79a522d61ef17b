"""The platform decision (platforms.py): the accelerator's code path, run on this CPU on every CI run.

`train.build(config, mesh, platform='gpu')` makes every choice a GPU run makes (the loss over full
logits, XLA attention, a plain transpose in the projections' weight gradient, one micro-batch by
default, sampling's sort) on the same model and the same batches; the losses must agree with the CPU
choices step for step, and decoding must give the same tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import short_run_config
from vesper_jax import decode
from vesper_jax import platforms
from vesper_jax import sharding
from vesper_jax import train
from vesper_jax.sampling import GREEDY, SamplingConfig

STEPS = 20

# Each variant trains 20 steps both ways. Together they cover what the issue names: gradient
# accumulation, the metacognition head, FlyLoRA, and the in-place Velvet layout (flat buffers).
VARIANTS = {
    'accumulation+metacog+velvet_in_place': {'train.grad_accum_steps': 2, 'model.metacog': True,
                                             'model.metacog_hidden': 32, 'opt.name': 'velvet',
                                             'opt.kernel': 'xla_flat'},
    'flylora+metacog': {'model.lora_targets': 'q,v,gate,down', 'model.lora_rank': 8, 'model.lora_k': 2,
                        'model.metacog': True, 'model.metacog_hidden': 32},
}


def _batches(vocab_size: int) -> list[dict]:
  # Repeating a few batches makes the loss fall fast, so the steps compared are not all near log(V).
  return [{'tokens': jax.random.randint(jax.random.key(t % 4), (8, 33), 0, vocab_size, jnp.int32)}
          for t in range(STEPS)]


_RUNS = {}


def _train(cache_dir, variant: str, platform: str | None):
  """(config, parts, final state, losses) of `variant` trained STEPS steps; each run once per module."""
  if (variant, platform) not in _RUNS:
    config = short_run_config(cache_dir, **{'train.num_steps': STEPS, **VARIANTS[variant]})
    parts = train.build(config, sharding.make_mesh(1, 1, jax.devices()[:1]), platform=platform)
    state = parts.init_fn(jax.random.key(0))
    losses = []
    for batch in _batches(config.model.vocab_size):
      state, metrics = parts.step_fn(state, batch)
      losses.append(float(metrics['loss']))
    _RUNS[variant, platform] = config, parts, state, losses
  return _RUNS[variant, platform]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')  # the config names one; nothing here reads data


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_gpu_choices_train_like_the_cpu_choices(cache_dir, variant):
  config, cpu_parts, _, cpu_losses = _train(cache_dir, variant, None)  # None = the mesh's devices: CPU
  _, gpu_parts, _, gpu_losses = _train(cache_dir, variant, 'gpu')
  assert (cpu_parts.platform, gpu_parts.platform) == ('cpu', 'gpu')
  assert cpu_parts.model.config.platform == 'cpu' and gpu_parts.model.config.platform == 'gpu'
  # The two steps really differ: the CPU's weight gradients hold xᵀ apart (dense.py) and its loss
  # applies the head in chunks (a scan) without the [B, T, V] logits; the GPU's do neither.
  batch = _batches(config.model.vocab_size)[0]
  texts = {p.platform: str(jax.make_jaxpr(p.step_fn)(p.init_fn(jax.random.key(0)), batch))
           for p in (cpu_parts, gpu_parts)}
  assert 'optimization_barrier' in texts['cpu'] and 'optimization_barrier' not in texts['gpu']
  assert cpu_parts.grad_accum_steps == gpu_parts.grad_accum_steps
  logits_shape = f'f32[{8 // gpu_parts.grad_accum_steps},32,{config.model.vocab_size}]'  # a micro-batch's
  assert logits_shape not in texts['cpu'] and logits_shape in texts['gpu']
  np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5)
  assert cpu_losses[-1] < cpu_losses[0] - 0.05, cpu_losses  # the steps moved the model


def test_gpu_choices_decode_the_same_tokens(cache_dir):
  variant = list(VARIANTS)[0]
  _, parts, state, _ = _train(cache_dir, variant, None)
  params = parts.param_tree(state.params)
  prompts = [[5, 17, 3, 99, 4], [7, 7, 1]]
  sampled = SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2)
  out = {}
  for platform in ('cpu', 'gpu'):
    model_config = parts.model.config.replace(platform=platform)
    out[platform] = [decode.generate(params, model_config, prompts, max_new_tokens=12, sampling=s, seed=3,
                                     chunk_size=4)
                     for s in (GREEDY, sampled)]
  # Greedy through the KV cache, and sampling with top-k/top-p, whose thresholds the CPU finds by a
  # bitwise search and the GPU by a sort: the same set of tokens, so the same draws.
  assert out['gpu'] == out['cpu']
  assert out['cpu'][0] != out['cpu'][1]  # the sampled rows are not greedy ones


def test_resolve_names_the_choices():
  assert platforms.resolve() == 'cpu'  # the suite runs on CPU devices
  assert platforms.resolve('cuda') == 'gpu'  # jax's device platform for a CUDA GPU
  assert platforms.resolve(None, sharding.make_mesh(1, 1, jax.devices()[:1])) == 'cpu'
  with pytest.raises(ValueError, match=r"platform='metal': expected one of \('cpu', 'gpu', 'tpu'\)"):
    platforms.resolve('metal')
  from conftest import tiny_model_config
  with pytest.raises(ValueError, match='platform='):
    tiny_model_config(platform='npu')


def test_nothing_else_asks_jax_for_the_default_backend():
  # One decision: every per-platform choice reads the platform that platforms.py resolved.
  import pathlib
  root = pathlib.Path(__file__).resolve().parent.parent
  readers = [str(p.relative_to(root)) for folder in ('vesper_jax', 'kernels', 'experiments')
             for p in sorted((root / folder).glob('*.py')) if 'default_backend' in p.read_text()]
  assert readers == [], readers
