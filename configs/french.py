"""french: the small model on French dialogue, Claire-Dialogue-French with CamemBERT's tokenizer.

Claire-Dialogue-French-0.1 (OpenLLM-France, on the Hugging Face Hub) is gated: accept its terms on
https://huggingface.co/datasets/OpenLLM-France/Claire-Dialogue-French-0.1 with a Hub account, then
`hf auth login` or set HF_TOKEN, once, where there is network (`python -m vesper_jax.prepare
--config=configs/french.py`); later runs read the Hub cache (HF_HOME), offline too (HF_HUB_OFFLINE=1).
Its FR/<corpus>/train.txt files are trained on, its test.txt files kept for
`python -m vesper_jax.evaluate --data=hf://datasets/OpenLLM-France/Claire-Dialogue-French-0.1/FR/*/test.txt`.
"""

import importlib.util
import pathlib


def _small():
  """configs/small.py, loaded by path (configs/ is a folder of files, not a package)."""
  spec = importlib.util.spec_from_file_location('_small_config', pathlib.Path(__file__).with_name('small.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  config = _small().get_config()  # the small model and its training plan
  # camembert-base's tokenizer.json: 32,000 SentencePiece pieces plus 5 added tokens, the vocabulary of
  # its model card (vocab_size 32005); </s> ends each dialogue.
  config.model.vocab_size = 32005
  config.data.sources = 'hf://datasets/OpenLLM-France/Claire-Dialogue-French-0.1/FR/*/train.txt'
  config.data.tokenizer = 'hf://almanach/camembert-base/tokenizer.json'
  # One dialogue per blank-line-separated block, one "[Speaker:] text" turn per line, tags kept: who
  # speaks is part of what the model learns.
  config.data.doc_separator = '\n\n'
  config.data.val_fraction = 0.01  # every 100th dialogue of the train files is held out
  return config
