"""medium: 12 layers, 12 heads, d_model 768, d_ff 2048 (the original's "~89M"; ≈85M non-embedding)."""

from vesper_jax import config as base


def get_config():
  config = base.get_config()
  config.model.update(num_layers=12, num_heads=12, d_model=768, d_ff=2048, vocab_size=32000,
                      max_seq_len=1024, dtype='bfloat16')
  # Real data at this scale (README: Data): fetched once into the cache, a BPE of model.vocab_size
  # trained on its first data.bpe_sample_bytes, and a 1% validation split (millions of tokens).
  config.data.sources = 'download:tinystories_train'
  config.data.val_fraction = 0.01
  config.data.seq_len = 1024
  config.train.batch_size = 64
  config.train.num_steps = 20000
  config.train.eval_every = 1000
  config.checkpoint.every_steps = 2000
  config.opt.learning_rate = 6e-4
  config.opt.warmup_steps = 1000
  return config
