"""Fine-tuning from a base (finetune.py): train.init_from refused by name before any work, the base
loaded from a workdir or a safetensors export (adapters merged first, another architecture refused by
field), and a real full fine-tuning run that starts from the base's weights and trains all of them."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import base_run_config, random_adapters
from vesper_jax import checkpoint, export, finetune, flylora, train
from vesper_jax import model as M
from vesper_jax.pytree import flatten


def _init_from_config(root, **overrides):
  return base_run_config(root, **{'train.init_from': str(root / 'base'),
                                  'data.tokenizer': str(root / 'base' / 'tokenizer.json'), **overrides})


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_base_fields_are_the_weight_fields_without_the_adapters_and_the_metacog_head():
  # A metacognition head may be added in fine-tuning (or a base's head left behind): not a base field.
  assert set(finetune.BASE_FIELDS) == set(M.WEIGHT_FIELDS) - set(M.ADAPTER_FIELDS) - set(M.METACOG_FIELDS)
  assert {'d_model', 'vocab_size', 'activation'} <= set(finetune.BASE_FIELDS)
  assert not {'dtype', 'remat', 'lora_targets', 'lora_rank', 'metacog', 'metacog_hidden'} & set(
      finetune.BASE_FIELDS)


# ------------------------------------------------------------------------------------------ init_from

def test_init_from_refusals_name_the_key(inference_workdir, tmp_path):
  root = tmp_path
  (root / 'base').symlink_to(inference_workdir)
  finetune.check_init_from(_init_from_config(root))  # the base's own tokenizer: accepted
  with pytest.raises(ValueError, match='set data.tokenizer=.*base/tokenizer.json'):
    finetune.check_init_from(_init_from_config(root, **{'data.tokenizer': ''}))
  other = tmp_path / 'other.json'
  other.write_bytes((inference_workdir / 'tokenizer.json').read_bytes() + b'\n')  # same JSON, other bytes
  with pytest.raises(ValueError, match='would give the same ids other meanings'):
    finetune.check_init_from(_init_from_config(root, **{'data.tokenizer': str(other)}))
  with pytest.raises(FileNotFoundError, match='train.init_from=.*nowhere'):
    finetune.check_init_from(_init_from_config(root, **{'train.init_from': str(tmp_path / 'nowhere')}))
  (tmp_path / 'not_a_run').mkdir()
  with pytest.raises(FileNotFoundError, match='no tokenizer.json there'):
    finetune.check_init_from(_init_from_config(root, **{'train.init_from': str(tmp_path / 'not_a_run')}))
  weights = tmp_path / 'base.safetensors'
  weights.write_bytes(b'')  # only its name and existence are checked here
  with pytest.raises(ValueError, match='a safetensors file carries no tokenizer'):
    finetune.check_init_from(_init_from_config(root, **{'train.init_from': str(weights),
                                                        'data.tokenizer': ''}))


def test_bad_init_from_is_refused_before_any_data_work(inference_workdir, tmp_path):
  cache = tmp_path / 'cache'
  config = _init_from_config(tmp_path, **{'train.init_from': str(tmp_path / 'missing')})
  with pytest.raises(FileNotFoundError, match='train.init_from'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not cache.exists() and not (tmp_path / 'run').exists()


# ------------------------------------------------------------------------------------------ load_base

def test_load_base_from_a_workdir_and_an_export(inference_workdir, tmp_path):
  base_cfg, base, _ = checkpoint.load_for_inference(inference_workdir)
  path = tmp_path / 'base.safetensors'
  export.save_safetensors(base, base_cfg, path)
  adapted = base_cfg.replace(lora_targets='q,o', lora_rank=8, lora_k=2, dtype='bfloat16')
  _assert_trees_equal(finetune.load_base(str(path), adapted), base)
  _assert_trees_equal(finetune.load_base(str(inference_workdir), adapted), base)
  # A file without vesper_jax metadata must fit the architecture asked for.
  plain = tmp_path / 'plain.safetensors'
  save_file(export.to_tensors(base), str(plain))
  _assert_trees_equal(finetune.load_base(str(plain), adapted), base)
  with pytest.raises(ValueError, match='model.d_ff=384, this config 512'):
    finetune.load_base(str(inference_workdir), adapted.replace(d_ff=512))
  with pytest.raises(ValueError, match="model.activation='era', this config 'silu'"):
    finetune.load_base(str(path), adapted.replace(activation='silu'))


def test_a_base_with_mergeable_adapters_is_merged_first(inference_workdir, tmp_path):
  base_cfg, base, _ = checkpoint.load_for_inference(inference_workdir)
  lora_cfg = base_cfg.replace(lora_targets='q,up', lora_mode='lora', lora_rank=4, lora_k=4)
  params = random_adapters(flylora.graft_base(M.init_params(lora_cfg, jax.random.key(3)), base))
  path = tmp_path / 'lora.safetensors'
  export.save_safetensors(params, lora_cfg, path)
  merged, _ = flylora.merge(params, lora_cfg)
  loaded = finetune.load_base(str(path), base_cfg.replace(lora_targets='gate', lora_rank=8, lora_k=2))
  _assert_trees_equal(loaded, merged)
  assert not np.array_equal(loaded['layers_0']['attention']['q_proj']['kernel'],
                            base['layers_0']['attention']['q_proj']['kernel'])  # the adapter was folded in
  # FlyLoRA with k < r cannot be merged: the base is refused with the reason.
  fly_cfg = base_cfg.replace(lora_targets='q', lora_rank=8, lora_k=2)
  export.save_safetensors(M.init_params(fly_cfg, jax.random.key(0)), fly_cfg, tmp_path / 'fly.safetensors')
  with pytest.raises(ValueError, match='merge refused'):
    finetune.load_base(str(tmp_path / 'fly.safetensors'), base_cfg)


# ------------------------------------------------------------------------------------------ a real run

def _eval_losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {row['step']: row['eval_loss'] for row in rows if 'eval_loss' in row}


def test_full_finetuning_starts_from_the_base_and_trains_every_tensor(base_workdir):
  root = base_workdir
  workdir = root / 'full'
  train.train_and_evaluate(_init_from_config(root, **{'train.num_steps': 2}), workdir)
  base_evals, tuned_evals = _eval_losses(root / 'base'), _eval_losses(workdir)
  # Step 0 of the fine-tuning run evaluates the base's weights: the base run's last evaluation, on the
  # same windows — not a fresh initialisation's (the base run's step 0).
  assert tuned_evals[0] == pytest.approx(base_evals[5], rel=1e-6)
  assert abs(base_evals[5] - base_evals[0]) > 1e-2
  # Full fine-tuning: every tensor of the base moved (no adapters, nothing frozen).
  _, base = checkpoint.load_params(root / 'base')
  step, tuned = checkpoint.load_params(workdir)
  assert step == 2
  flat_base, flat_tuned = flatten(base), flatten(tuned)
  assert flat_base.keys() == flat_tuned.keys()
  for key, value in flat_base.items():
    assert not np.array_equal(np.asarray(flat_tuned[key]), np.asarray(value)), '/'.join(key)
