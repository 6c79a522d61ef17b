"""Builds the token cache: `python -m vesper_jax.prepare [--config=configs/tiny.py] [--download=NAME]`.

Reads data.sources, loads data.tokenizer (or trains a byte-level BPE of model.vocab_size tokens) and
writes the token cache that `python -m vesper_jax.train` with the same config then opens in milliseconds.
`--download=NAME` (a key of sources.DOWNLOADS) fetches that dataset first and prepares it; train with
--config.data.sources=download:NAME. Names on the Hugging Face Hub are hf:// specs pinned to a commit
(mirror: HF_ENDPOINT=URL); the others are sha256-checked files (mirror: --config.data.download_base_url=URL).
`--config=configs/medium.py` alone fetches and prepares what that config trains on: run it on a login
node with network, then train on compute nodes that share data.cache_dir (nothing is fetched again).
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from vesper_jax import cli, data, sources

FLAGS = flags.FLAGS


def summary(cache: data.TokenCache) -> str:
  """A human-readable account of a token cache: counts, speed, sources, tokenizer, what was skipped."""
  meta = cache.meta  # everything from the metadata: loading a large tokenizer.json is not needed here
  how = (f'built in {meta["build_seconds"]:.2f} s' if cache.built
         else f'opened in {cache.open_seconds * 1e3:.0f} ms (built earlier in {meta["build_seconds"]:.2f} s)')
  lines = [
      f'token cache ready: {how}',
      f'  documents   train {meta["train_documents"]:,}   validation {meta["val_documents"]:,}'
      + ('   (too few documents: validation is the last tokens)' if meta['split'] == 'tail' else ''),
      f'  tokens      train {meta["train_tokens"]:,}   validation {meta["val_tokens"]:,}   ({meta["dtype"]})',
      f'  speed       {meta["tokens_per_second"]:,.0f} tokens/s over the build',
      f'  tokenizer   {meta.get("tokenizer_origin") or meta["tokenizer_source"]}  '
      f'(vocab {meta["vocab_size"]:,}, eos {meta["eos_id"]}, bos {meta["bos_id"]}, pad {meta["pad_id"]})',
      f'  cache       {cache.directory}',
      '  sources',
  ]
  for s in meta['sources']:
    lines.append(f'    {s.get("origin") or s["path"]}  [{s["kind"]}]  {s["documents"]:,} documents, '
                 f'{s["tokens"]:,} tokens')
  if meta['skipped_count']:
    lines.append(f'  skipped     {meta["skipped_count"]:,} (data.on_error=skip):')
    lines += [f'    {reason}' for reason in meta['skipped']]
    if meta['skipped_count'] > len(meta['skipped']):
      lines.append(f'    ... and {meta["skipped_count"] - len(meta["skipped"]):,} more')
  else:
    lines.append('  skipped     nothing')
  if meta['ignored']:
    lines.append(f'  ignored     {len(meta["ignored"])} files:')
    lines += [f'    {reason}' for reason in meta['ignored']]
  return '\n'.join(lines)


def prepare(config, download: str | None) -> tuple[data.TokenCache, pathlib.Path | None]:
  """Fetches `download` if given (and makes it `config.data.sources`), then builds or opens the cache.

  Returns:
    (the token cache, the downloaded file or None).
  """
  path = None
  if download:
    cache_dir = sources.default_cache_dir(config.data.cache_dir)
    path = sources.download(download, cache_dir, base_url=config.data.download_base_url)
    config.data.sources = f'{sources.DOWNLOAD_PREFIX}{download}'
  return data.build_or_load_cache(config.data, config.model.vocab_size, progress=True), path


def main(argv):
  del argv
  config, download = FLAGS.config, FLAGS.download
  cache, path = prepare(config, download)
  if download:
    item = sources.DOWNLOADS[download]
    if isinstance(item, sources.HubDownload):  # the commit of each file is in the summary's origins
      print(f'{download}: {item.spec}\n  in the Hugging Face cache: {path}')
    else:
      print(f'{download}: {path}\n  sha256 {item.sha256} checked')
  print(summary(cache))
  if download:
    print(f'  train with  --config.data.sources={config.data.sources}')


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', str(pathlib.Path(__file__).with_name('config.py')),
                                  'Configuration file (the data section is used).')
  flags.DEFINE_enum('download', None, sorted(sources.DOWNLOADS),
                    'Fetch this public dataset into the cache dir and use it as data.sources.')


if __name__ == '__main__':
  cli.run('vesper_jax.prepare', main, define_flags)
