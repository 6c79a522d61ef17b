"""The device mesh and the placement rules (sharding.py) on 8 simulated CPU devices: mesh sizes refused
by key, the FSDP rule leaf by leaf, a real train state split over 'fsdp' with the Adam moments beside
their parameters, and batches split over every device. (Equal losses on 1 and 8 devices: test_train.py.)"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import short_run_config
from vesper_jax import sharding, train


def test_mesh_shape_fills_and_refuses_by_key():
  assert sharding.mesh_shape(-1, 4, 8) == (2, 4) and sharding.mesh_shape(2, -1, 8) == (2, 4)
  assert sharding.mesh_shape(1, 1, 8) == (1, 1)  # one host may use the first of its devices
  with pytest.raises(ValueError, match='train.mesh_fsdp=3 does not divide'):
    sharding.mesh_shape(-1, 3, 8)
  with pytest.raises(ValueError, match='train.mesh_data=0'):
    sharding.mesh_shape(0, -1, 8)
  with pytest.raises(ValueError, match='cannot both be -1'):
    sharding.mesh_shape(-1, -1, 8)
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.mesh_shape(4, 4, 8)


def test_make_mesh_uses_the_first_devices_when_asked_for_fewer():
  mesh = sharding.make_mesh(2, 2)
  assert dict(mesh.shape) == {sharding.DATA: 2, sharding.FSDP: 2}
  assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in jax.devices()[:4]]
  assert sharding.make_mesh(-1, 1).size == jax.device_count() == 8


def test_fsdp_rule_splits_the_largest_divisible_dimension():
  tree = {'wide': jax.ShapeDtypeStruct((6, 8), np.float32),    # 8 divides by 4, 6 does not
          'tall': jax.ShapeDtypeStruct((12, 6), np.float32),   # the largest, 12, divides
          'odd': jax.ShapeDtypeStruct((5, 7), np.float32),     # nothing divides: replicated
          'vector': jax.ShapeDtypeStruct((16,), np.float32),   # vectors and scalars: replicated
          'scalar': jax.ShapeDtypeStruct((), np.int32)}
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(tree, sharding.make_mesh(2, 4)))
  assert specs == {'wide': P(None, 'fsdp'), 'tall': P('fsdp', None), 'odd': P(), 'vector': P(),
                   'scalar': P()}
  # Without an fsdp axis, everything is replicated (data parallelism only).
  data_only = sharding.state_shardings(tree, sharding.make_mesh(8, 1))
  assert all(s.is_fully_replicated for s in jax.tree.leaves(data_only))


def test_train_state_is_really_sharded(tmp_path):
  config = short_run_config(tmp_path / 'cache')  # build() reads no data
  state = train.build(config, sharding.make_mesh(2, 4)).init_fn(jax.random.key(0))
  kernel = state.params['layers_0']['ffn']['gate_proj']['kernel']          # [128, 384]
  assert kernel.sharding.spec == P(None, 'fsdp')  # 384 split over fsdp=4
  assert {s.data.shape for s in kernel.addressable_shards} == {(128, 96)}
  mu = optax.tree.get(state.opt_state, 'mu')['layers_0']['ffn']['gate_proj']['kernel']
  assert mu.sharding == kernel.sharding  # Adam moments live with their parameters
  assert state.params['layers_0']['ffn_norm']['scale'].sharding.is_fully_replicated
  assert not (tmp_path / 'cache').exists()


def test_batches_split_over_every_device():
  mesh = sharding.make_mesh(2, 4)
  batch_sharding = sharding.batch_sharding(mesh)
  assert batch_sharding.spec == P((sharding.DATA, sharding.FSDP))
  local = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
  batch = sharding.global_batch({'tokens': local}, batch_sharding)['tokens']
  assert batch.shape == (16, 5) and batch.sharding == batch_sharding
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 5)}
  np.testing.assert_array_equal(np.asarray(batch), local)


def test_in_place_velvet_state_is_flat_buffers_split_over_fsdp(tmp_path):
  config = short_run_config(tmp_path / 'cache', **{'opt.name': 'velvet', 'opt.kernel': 'pallas'})
  parts = train.build(config, sharding.make_mesh(2, 4))
  state = parts.init_fn(jax.random.key(0))
  assert sorted(state.params) == ['decay_float32', 'no_decay_float32']
  for name, buffer in state.params.items():
    assert buffer.ndim == 1 and buffer.size % 4096 == 0  # padded: splits evenly over any fsdp ≤ 4096
    assert buffer.sharding.spec == P('fsdp')
    assert {s.data.shape for s in buffer.addressable_shards} == {(buffer.size // 4,)}
    assert state.opt_state.mu[name].sharding == buffer.sharding == state.opt_state.nu[name].sharding
  # The model's view is the parameter tree, with its real shapes.
  tree = parts.param_tree(state.params)
  assert tree['layers_0']['ffn']['gate_proj']['kernel'].shape == (128, 384)
