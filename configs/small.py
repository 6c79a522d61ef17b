"""small: 6 layers, 6 heads, d_model 384, d_ff 1024 (the original's "~25M")."""

from vesper_jax import config as base


def get_config():
  config = base.get_config()
  config.model.update(num_layers=6, num_heads=6, d_model=384, d_ff=1024, vocab_size=16384,
                      max_seq_len=512)
  # Real data at this scale (README: Data): fetched once into the cache, a BPE of model.vocab_size
  # trained on its first data.bpe_sample_bytes, and a 1% validation split (millions of tokens).
  config.data.sources = 'download:tinystories_train'
  config.data.val_fraction = 0.01
  config.data.seq_len = 256
  config.train.batch_size = 32
  config.train.num_steps = 5000
  config.train.eval_every = 500
  config.checkpoint.every_steps = 1000
  config.opt.learning_rate = 1e-3
  config.opt.warmup_steps = 200
  return config
