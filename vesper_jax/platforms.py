"""The platform, decided once: which of the code's per-platform choices a model, step or decoder makes.

Several choices differ between a CPU and an accelerator, each for a measured reason given where it is
made (README, "Platform choices"):

    choice                                   'cpu'                            otherwise
    attention in training / scoring          the CPU kernel (attention_cpu)   XLA, or cuDNN in bf16 on 'gpu'
    ERA and the head's softmax               C++ kernels, when they apply     XLA ops
    the training loss                        the chunked head (losses.py)     full logits
    a projection's weight gradient           xᵀ copied apart (dense.py)       a plain transpose
    micro-batches, grad_accum_steps=0        ~2,048 tokens per device         1
    top-k / top-p thresholds (sampling)      'search'                         'sort'

The platform is resolved here, from the devices a run uses (its mesh), and carried from there:
`ModelConfig.platform` for everything the model, the loss and decoding choose, `train.Parts.platform`
for the step. Nothing else asks JAX which backend is the default. An override (`train.build(...,
platform='gpu')`) makes the accelerator's choices on a CPU: the same model on the same batches, so the
code a GPU runs is tested on every CI run (tests/test_platform.py). Whether the *hardware* can do
something (compile a Pallas kernel rather than interpret it, run Triton) is a different question:
`hardware` answers it from the devices themselves, whatever the choices.
"""

from typing import Iterable

import jax

PLATFORMS = ('cpu', 'gpu', 'tpu')
# jax.Device.platform names for the same thing: a CUDA or ROCm device is a 'gpu' here.
_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}


def _name(platform: str) -> str:
  return _ALIASES.get(platform, platform)


def check(platform: str) -> str:
  """`platform` normalised ('cuda' -> 'gpu'); a ValueError naming the choices for anything else."""
  name = _name(platform)
  if name not in PLATFORMS:
    raise ValueError(f'platform={platform!r}: expected one of {PLATFORMS} (or None: the devices\' own)')
  return name


def hardware(devices: Iterable[jax.Device] | None = None) -> str:
  """What the devices are ('cpu', 'gpu', 'tpu'); the default devices when None. One kind expected."""
  devices = list(jax.devices() if devices is None else devices)
  kinds = {_name(d.platform) for d in devices}
  if len(kinds) != 1:
    raise ValueError(f'devices of several platforms ({sorted(kinds)}): a mesh must hold one kind')
  return kinds.pop()


def resolve(platform: str | None = None, mesh: jax.sharding.Mesh | None = None) -> str:
  """The platform whose choices to make: `platform` if given, else what the mesh's devices are (the
  default devices without a mesh)."""
  if platform is not None:
    return check(platform)
  return hardware(None if mesh is None else mesh.devices.flat)
