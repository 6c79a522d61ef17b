"""Token-cache build throughput (`vesper_jax.data.build_or_load_cache`) on real corpora.

    python experiments/bench_data.py --data_dir=DIR [--repeats=3] [--out=experiments/results/bench_data.json]

DIR holds the files that CASES names: tinyshakespeare.txt and piaf-v1.1.json (`python -m vesper_jax.prepare
--download=NAME` fetches them into <cache_dir>/downloads), tinystories_2MB.txt (the first 2,096,346 bytes of
TinyStories-train.txt, cut after a story), les_miserables_fr.txt (Project Gutenberg #17489, 17493, 17494,
17518, 17519, concatenated) and BARThez's tokenizer.json as tokenizers/barthez_fr/tokenizer.json;
tests/data/README.md gives the source and licence of each.

For each case, every repeat builds the cache from scratch in a fresh temporary directory and reports:
  tokenize tok/s    tokens / (read + split + encode + write) — what the issue's 1M tokens/s target measures
  end-to-end tok/s  tokens / the whole cold call (source hashing, tokenizer load or BPE training included)
  raw encode tok/s  the tokenizer's encode_batch alone on the same pieces: the ceiling for this machine
  tok per CPU-s     tokens / CPU seconds of the cold call, all threads: what contention does not change
  reopen ms         a second build_or_load_cache on the built cache (hashing the sources, mapping the files)
Medians over the repeats, and the best repeat of each (least disturbed by other processes on these
shared cores: the machine's load average is recorded with the results).
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vesper_jax import config as config_lib  # noqa: E402
from vesper_jax import data, sources  # noqa: E402
from vesper_jax.tokenizer import Tokenizer  # noqa: E402

_REPEATS = flags.DEFINE_integer('repeats', 3, 'Cold builds per case (median reported).')
_DATA = flags.DEFINE_string('data_dir', None, 'Folder of the real corpora (required; see the docstring).')
_ONLY = flags.DEFINE_string('only', '', 'Run only the cases whose name contains this text.')
_OUT = flags.DEFINE_string('out', str(REPO / 'experiments' / 'results' / 'bench_data.json'), 'Results JSON.')

BARTHEZ = 'tokenizers/barthez_fr/tokenizer.json'
# (name, source, tokenizer ('' = train a byte-level BPE), model vocab_size)
CASES = [
    ('les_miserables_fr + BARThez', 'les_miserables_fr.txt', BARTHEZ, 50_048),
    ('tinystories_2MB + trained BPE 4096', 'tinystories_2MB.txt', '', 4096),
    ('tinystories_2MB + trained BPE 16384', 'tinystories_2MB.txt', '', 16_384),
    ('piaf-v1.1 (SQuAD) + BARThez', 'piaf-v1.1.json', BARTHEZ, 50_048),
    ('tinyshakespeare + trained BPE 4096', 'tinyshakespeare.txt', '', 4096),
]


def _raw_encode_seconds(cache: data.TokenCache, cfg) -> float:
  options = sources.ReadOptions.from_config(cfg)
  errors = sources.ErrorLog('skip', quiet=True)
  found = sources.resolve_sources(cfg.sources, errors, cache_dir=pathlib.Path(cfg.cache_dir), download_base_url='')
  pieces = [p for s in found for d in sources.read_documents(s, options, errors)
            for p in data.split_long(d, data.PIECE_CHARS)]
  tokenizer = Tokenizer.load(cache.tokenizer.path)
  start = time.perf_counter()
  tokenizer.encode_batch(pieces)
  return time.perf_counter() - start


def run_case(name: str, source: str, tokenizer: str, vocab_size: int) -> dict:
  runs = []
  for _ in range(_REPEATS.value):
    with tempfile.TemporaryDirectory() as tmp:
      cfg = config_lib.get_config().data
      cfg.sources = str(pathlib.Path(_DATA.value) / source)
      cfg.tokenizer = str(pathlib.Path(_DATA.value) / tokenizer) if tokenizer else ''
      cfg.cache_dir = tmp
      cpu_start = time.process_time()  # all threads of this process, the tokenizer's Rust pool included
      cold = data.build_or_load_cache(cfg, vocab_size, progress=False)
      cpu = time.process_time() - cpu_start
      tokens = cold.meta['train_tokens'] + cold.meta['val_tokens']
      reopen = [data.build_or_load_cache(cfg, vocab_size, progress=False).open_seconds for _ in range(5)]
      raw = _raw_encode_seconds(cold, cfg)
      runs.append({'tokens': tokens, 'build_s': cold.meta['build_seconds'], 'cold_s': cold.open_seconds,
                   'cpu_s': cpu,
                   'raw_s': raw, 'reopen_s': statistics.median(reopen),
                   'documents': cold.meta['train_documents'] + cold.meta['val_documents']})
  median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
  tokens = runs[0]['tokens']
  return {
      'case': name, 'source': source, 'tokenizer': tokenizer or f'trained BPE {vocab_size}',
      'source_mb': os.path.getsize(pathlib.Path(_DATA.value) / source) / 1e6,
      'documents': runs[0]['documents'], 'tokens': tokens,
      'tokenize_tok_s': tokens / median('build_s'), 'end_to_end_tok_s': tokens / median('cold_s'),
      'best_tokenize_tok_s': tokens / min(r['build_s'] for r in runs),
      'best_end_to_end_tok_s': tokens / min(r['cold_s'] for r in runs),
      'raw_encode_tok_s': tokens / median('raw_s'), 'reopen_ms': median('reopen_s') * 1e3,
      'end_to_end_tok_per_cpu_s': tokens / median('cpu_s'),
      'cold_s': median('cold_s'), 'runs': runs,
  }


def main(argv):
  del argv
  cases = [case for case in CASES if _ONLY.value in case[0]]
  needed = sorted({name for case in cases for name in case[1:3] if name})
  missing = [name for name in needed if not _DATA.value or not (pathlib.Path(_DATA.value) / name).is_file()]
  if missing:
    where = f'--data_dir={_DATA.value} lacks {", ".join(missing)}' if _DATA.value else '--data_dir is required'
    raise app.UsageError(f'{where}: a folder that holds {", ".join(needed)} (the docstring says where each '
                         f'comes from)')
  load_before = os.getloadavg()
  results = [run_case(*case) for case in cases]
  header = ('| case | MB | documents | tokens | tokenize tok/s (best) | end-to-end tok/s (best) '
            '| raw encode tok/s | end-to-end tok per CPU-s | reopen ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  rows = [f'| {r["case"]} | {r["source_mb"]:.1f} | {r["documents"]:,} | {r["tokens"]:,} | '
          f'{r["tokenize_tok_s"] / 1e6:.2f}M ({r["best_tokenize_tok_s"] / 1e6:.2f}M) | '
          f'{r["end_to_end_tok_s"] / 1e6:.2f}M ({r["best_end_to_end_tok_s"] / 1e6:.2f}M) | '
          f'{r["raw_encode_tok_s"] / 1e6:.2f}M | {r["end_to_end_tok_per_cpu_s"] / 1e6:.2f}M | '
          f'{r["reopen_ms"]:.1f} |' for r in results]
  machine = (f'{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before / '
             f'{os.getloadavg()[0]:.2f} after, medians of {_REPEATS.value} cold builds')
  table = '\n'.join([header, *rows, '', machine])
  print(table)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': machine, 'cpu_count': os.cpu_count(), 'results': results}, indent=1))
  out.with_suffix('.md').write_text(table + '\n')
  print(f'wrote {out} and {out.with_suffix(".md")}')


if __name__ == '__main__':
  app.run(main)
