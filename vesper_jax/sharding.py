"""The device mesh and the rules that place parameters, optimizer state and batches on it (SPEC §7).

One code path for 1 CPU, 1 GPU, a multi-GPU node and many hosts: `jit` with explicit shardings over a
`Mesh` with axes ('data', 'fsdp'). This is JAX's replacement for `pmap`: the program is written for the
global arrays and XLA's SPMD partitioner inserts the collectives (gradient all-reduce over 'data',
all-gather / reduce-scatter of parameters over 'fsdp').
"""


import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vesper_jax.pytree import PyTree


DATA, FSDP = 'data', 'fsdp'


def mesh_shape(mesh_data: int, mesh_fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves the (data, fsdp) sizes; one of them may be -1 (fill the remaining devices)."""
  for key, size in (('train.mesh_data', mesh_data), ('train.mesh_fsdp', mesh_fsdp)):
    if size != -1 and size < 1:
      raise ValueError(f'{key}={size}: expected a positive size or -1 (fill the remaining devices)')
  if mesh_data == -1 and mesh_fsdp == -1:
    raise ValueError('train.mesh_data and train.mesh_fsdp cannot both be -1')
  if mesh_data == -1:
    if num_devices % mesh_fsdp:
      raise ValueError(f'train.mesh_fsdp={mesh_fsdp} does not divide the {num_devices} devices')
    mesh_data = num_devices // mesh_fsdp
  if mesh_fsdp == -1:
    if num_devices % mesh_data:
      raise ValueError(f'train.mesh_data={mesh_data} does not divide the {num_devices} devices')
    mesh_fsdp = num_devices // mesh_data
  if mesh_data * mesh_fsdp < num_devices and jax.process_count() == 1:
    return mesh_data, mesh_fsdp  # a single host may run on a subset of its devices (the first ones)
  if mesh_data * mesh_fsdp != num_devices:
    raise ValueError(f'mesh (data={mesh_data}, fsdp={mesh_fsdp}) needs {mesh_data * mesh_fsdp} devices, '
                     f'{num_devices} are available (train.mesh_data / train.mesh_fsdp)')
  return mesh_data, mesh_fsdp


def make_mesh(mesh_data: int, mesh_fsdp: int, devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_data, mesh_fsdp, len(devices))
  devices = devices[:shape[0] * shape[1]]
  # Topology-aware order where the backend has one (TPU torus, GPU ids across hosts); plain order on CPU.
  return Mesh(mesh_utils.create_device_mesh(shape, devices), (DATA, FSDP))


def _leaf_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """FSDP rule: split the largest dimension that divides evenly over 'fsdp'; scalars/vectors replicate."""
  if fsdp_size == 1 or len(shape) < 2:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  return P()


def state_shardings(abstract_tree: PyTree, mesh: Mesh) -> PyTree:
  """NamedShardings for a tree of arrays/ShapeDtypeStructs (params, optimizer state, the TrainState).

  The rule depends only on each leaf's shape, so Adam moments land exactly where their parameters do.
  """
  fsdp_size = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(tuple(x.shape), fsdp_size)), abstract_tree)


def flat_buffer_sharding(mesh: Mesh) -> NamedSharding:
  """The in-place optimizer's flat buffers (velvet.FlatLayout, padded to split evenly) over 'fsdp'.

  The update is elementwise, so each device updates its own slice; the model's slices of the buffers are
  all-gathered where they are read, as FSDP gathers a sharded weight.
  """
  return NamedSharding(mesh, P(FSDP))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split their leading (example) axis over every device: both mesh axes."""
  return NamedSharding(mesh, P((DATA, FSDP)))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's slice (each host feeds only its own rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
