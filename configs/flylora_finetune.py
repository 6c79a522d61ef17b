"""FlyLoRA fine-tuning of a trained tiny model (SPEC §5): only the adapters learn, the base is frozen.

    python -m vesper_jax.train --config=configs/tiny.py --workdir=runs/tiny            # the base
    python -m vesper_jax.train --config=configs/flylora_finetune.py --workdir=runs/piaf_flylora

`train.init_from` names the base (a training workdir, or a .safetensors export with `data.tokenizer`
set to its tokenizer); the base's tokenizer must be the one used here. For a larger base, override the
`model` section to match it (e.g. `--config.model.num_layers=6 ...`, or start from configs/small.py's
values): loading refuses any architecture mismatch by field name.
"""

from vesper_jax import config as base


def get_config():
  config = base.get_config()
  # ------------------------------------------------------------ adapters (SPEC §5 defaults)
  config.model.lora_targets = 'gate,up'  # as in the original; any of q,k,v,o,gate,up,down
  config.model.lora_mode = 'flylora'     # 'lora' gives the plain-LoRA baseline of the same rank
  config.model.lora_rank = 32
  config.model.lora_k = 8
  # ------------------------------------------------------------ the base and the new data
  config.train.init_from = 'runs/tiny'            # the workdir that configs/tiny.py trains by default
  config.data.tokenizer = 'runs/tiny/tokenizer.json'  # the base's tokenizer (ids must keep their meaning)
  config.data.sources = 'download:piaf'           # French SQuAD-format QA (SPEC §6)
  # ------------------------------------------------------------ a short, gentle run
  config.train.num_steps = 300
  config.train.eval_every = 100
  config.checkpoint.every_steps = 300
  config.opt.learning_rate = 2e-3
  config.opt.warmup_steps = 20
  config.opt.weight_decay = 0.0   # adapters start at B = 0; decaying them only pulls back to the base
  config.train.sample_prompt = 'Question: '
  return config
