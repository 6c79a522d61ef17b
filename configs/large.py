"""large: 24 layers, 16 heads, d_model 1024, d_ff 2816 (the original's "~350M")."""

from vesper_jax import config as base


def get_config():
  config = base.get_config()
  config.model.update(num_layers=24, num_heads=16, d_model=1024, d_ff=2816, vocab_size=32000,
                      max_seq_len=1024, dtype='bfloat16', remat=True)
  # Real data at this scale (README: Data): fetched once into the cache, a BPE of model.vocab_size
  # trained on its first data.bpe_sample_bytes, and a 1% validation split (millions of tokens).
  config.data.sources = 'download:fineweb_edu_8'
  config.data.val_fraction = 0.01
  config.data.seq_len = 1024
  config.train.batch_size = 128
  config.train.num_steps = 40000
  config.train.eval_every = 2000
  config.checkpoint.every_steps = 2000
  config.opt.learning_rate = 3e-4
  config.opt.warmup_steps = 2000
  return config
