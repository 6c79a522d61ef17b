"""The base configuration and its validation (config.py): every config file loads and validates, a bad
value is refused naming its key (before any data work: test_train.py), and short_run's overrides."""

import pytest

from conftest import REPO, load_config
from vesper_jax import config as base_config

CONFIG_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py'))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_file_loads_and_validates(name):
  config = load_config(name)
  base_config.validate(config, num_devices=8, num_processes=1)
  assert config.to_dict().keys() == base_config.get_config().to_dict().keys()


def test_load_config_file_by_name_or_path_and_a_missing_one(tmp_path):
  assert base_config.load_config_file('tiny') == base_config.load_config_file(REPO / 'configs' / 'tiny.py')
  with pytest.raises(FileNotFoundError, match='nope.py: config file not found'):
    base_config.load_config_file('nope')


def _set(config, key, value):
  section, name = key.split('.')
  with config.unlocked():
    config[section][name] = value
  return config


@pytest.mark.parametrize('key, value, message', [
    ('train.bogus', 1, "unknown config key 'train.bogus'"),
    ('opt.name', 'sgd', r"opt.name='sgd': expected one of \('adamw', 'velvet'\)"),
    ('opt.kernel', 'cuda', "opt.kernel='cuda': expected one of"),
    ('opt.learning_rate', 0.0, 'opt.learning_rate=0.0 must be positive'),
    ('model.activation', 'relu', "model.activation='relu'"),
    ('model.num_kv_heads', 3, 'model.num_kv_heads=3'),
    ('data.seq_len', 512, r'data.seq_len=512 must be in \[1, model.max_seq_len=256\]'),
    ('data.on_error', 'ignore', "data.on_error='ignore'"),
    ('train.eval_every', 0, 'train.eval_every=0 must be at least 1'),
    ('train.max_nonfinite_steps', 0, 'train.max_nonfinite_steps=0 must be at least 1'),
    ('checkpoint.every_steps', 0, 'checkpoint.every_steps=0 must be at least 1'),
    ('checkpoint.keep', 0, 'checkpoint.keep=0 must be at least 1'),
    ('logging.every_steps', 0, 'logging.every_steps=0 must be at least 1'),
    ('train.eval_tokens', -1, 'train.eval_tokens=-1 must be >= 0'),
    ('train.num_steps', 0, 'train.num_steps=0 must be at least 1'),
    ('train.grad_accum_steps', 3, 'train.batch_size=16 is not divisible by train.grad_accum_steps=3'),
    ('train.grad_accum_steps', -2, r'train.grad_accum_steps=-2 must be >= 0 \(0 = auto\)'),
    ('train.mesh_fsdp', 3, 'train.mesh_fsdp=3 does not divide the 8 devices'),
    ('train.mesh_data', 0, 'train.mesh_data=0'),
])
def test_a_bad_value_is_refused_naming_its_key(key, value, message):
  config = _set(load_config('tiny'), key, value)
  with pytest.raises(ValueError, match=message):
    base_config.validate(config, num_devices=8, num_processes=1)


def test_batch_layout_against_the_devices_and_processes():
  config = load_config('tiny')  # batch 16, mesh data = -1 (all devices)
  base_config.validate(config, num_devices=8, num_processes=2)
  with pytest.raises(ValueError, match=r'micro-batch of 8 sequences .* over the 16 devices'):
    base_config.validate(_set(load_config('tiny'), 'train.grad_accum_steps', 2), num_devices=16,
                         num_processes=1)
  with pytest.raises(ValueError, match='train.batch_size=16 does not split over 3 processes'):
    base_config.validate(_set(load_config('tiny'), 'train.mesh_data', 1), num_devices=8, num_processes=3)
  # auto_scale picks num_steps later: 0 is then allowed.
  base_config.validate(_set(_set(load_config('tiny'), 'train.auto_scale', True), 'train.num_steps', 0),
                       num_devices=8, num_processes=1)


@pytest.mark.parametrize('batch, seq_len, devices, platform, expected', [
    (32, 256, 1, 'cpu', 4),    # small's 32 x 256 on one CPU: 4 micro-batches of 8 x 256 = 2,048 tokens
    (8, 256, 1, 'cpu', 1),     # already 2,048 tokens
    (48, 256, 1, 'cpu', 6),    # the most micro-batches that keep 2,048 tokens
    (12, 256, 1, 'cpu', 1),    # 2 micro-batches would hold 1,536: fewer than the target, so one
    (4, 4096, 1, 'cpu', 4),    # one sequence per micro-batch is the least there is
    (32, 256, 8, 'cpu', 1),    # per device: 1,024 tokens each already
    (64, 256, 2, 'cpu', 4),    # 16 sequences per micro-batch, 8 per device
    (24, 512, 2, 'cpu', 3),    # 8 sequences per micro-batch over 2 devices: 2,048 tokens each
    (32, 256, 1, 'gpu', 1),    # one big batch off CPU
])
def test_auto_grad_accum_steps(batch, seq_len, devices, platform, expected):
  config = _set(_set(load_config('tiny'), 'train.batch_size', batch), 'data.seq_len', seq_len)
  assert base_config.get_config().train.grad_accum_steps == 0  # auto is the default
  assert base_config.grad_accum_steps(_set(config, 'train.grad_accum_steps', 0), devices, platform) == expected
  micro = batch // expected
  assert batch % expected == 0 and micro % devices == 0
  # A value set in the config is used as it is, on any platform.
  assert base_config.grad_accum_steps(_set(config, 'train.grad_accum_steps', 2), devices, platform) == 2


def test_short_run_overrides():
  config = base_config.short_run(load_config('tiny'), 100)
  assert (config.train.num_steps, config.train.eval_every, config.opt.warmup_steps) == (100, 12, 10)
  assert (config.logging.every_steps, config.checkpoint.every_steps) == (2, 100)
  assert config.train.sample_prompt == '' and not config.checkpoint.async_save
  assert not config.logging.tensorboard and not config.logging.progress_bar
  few = base_config.short_run(load_config('tiny'), 5, evaluations=0)
  assert (few.train.eval_every, few.opt.warmup_steps, few.logging.every_steps) == (5, 1, 1)
  base_config.validate(few, num_devices=8, num_processes=1)
