"""Preparation at scale (issue 17): tokens/s and peak memory of `python -m vesper_jax.prepare` on corpora
of growing size, built from three real corpora in --data_dir (nothing larger is at hand offline).

    python experiments/bench_prepare.py --data_dir=DIR [--sizes_mb=20,200] [--vocab_size=16384] [--bpe_sample_mb=100]

DIR holds tinystories_2MB.txt, les_miserables_fr.txt and tinyshakespeare.txt (experiments/bench_data.py's
docstring says where each comes from).

Each size is a plain-text corpus of documents separated by <|endoftext|>: the stories of
tinystories_2MB.txt, the paragraphs of les_miserables_fr.txt and the speeches of tinyshakespeare.txt,
shuffled afresh (seeded) on every pass until the size is reached. Each run is a fresh process with an
empty cache: a BPE of --vocab_size trained on the first --bpe_sample_mb, then the whole corpus tokenized.
Reported per size: wall seconds, tokens, tokens/s of the build (meta.json), CPU use (user + system
seconds / wall: 2.0 = both cores of a 2-core machine busy) and peak RSS (os.wait4 of the process).
"""

import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent

_SIZES = flags.DEFINE_list('sizes_mb', ['20', '200'], 'Corpus sizes in MB (10^6 bytes).')
_VOCAB = flags.DEFINE_integer('vocab_size', 16_384, 'The trained BPE (model.vocab_size).')
_SAMPLE = flags.DEFINE_integer('bpe_sample_mb', 100, 'data.bpe_sample_bytes in MB.')
_DATA = flags.DEFINE_string('data_dir', None, 'Folder of the real corpora (required; see the docstring).')
_WORK = flags.DEFINE_string('work_dir', '', 'Where corpora and caches go (default: a temporary dir).')
_OUT = flags.DEFINE_string('out', str(REPO / 'experiments' / 'results' / 'bench_prepare.json'), 'Results JSON.')

SEPARATOR = '\n<|endoftext|>\n'
CORPORA = ('tinystories_2MB.txt', 'les_miserables_fr.txt', 'tinyshakespeare.txt')  # what documents() reads


def documents(data_dir: pathlib.Path) -> list[str]:
  """Stories, novel paragraphs and play speeches from the corpora in data_dir."""
  stories = (data_dir / 'tinystories_2MB.txt').read_text().split('<|endoftext|>')
  novel = (data_dir / 'les_miserables_fr.txt').read_text().split('\n\n')
  plays = (data_dir / 'tinyshakespeare.txt').read_text().split('\n\n')
  return [d.strip() for d in stories + novel + plays if d.strip()]


def write_corpus(path: pathlib.Path, size_bytes: int, docs: list[str], seed: int = 0) -> None:
  """Documents shuffled afresh on every pass, written until the file holds size_bytes."""
  rng, written = random.Random(seed), 0
  with open(path, 'w', encoding='utf-8') as f:
    while written < size_bytes:
      rng.shuffle(docs)
      for doc in docs:
        written += f.write(doc + SEPARATOR)
        if written >= size_bytes:
          break


def run_prepare(corpus: pathlib.Path, cache_dir: pathlib.Path, vocab_size: int, sample_bytes: int) -> dict:
  """One cold `python -m vesper_jax.prepare` in a fresh process: wall/CPU seconds, peak RSS, the meta."""
  command = [sys.executable, '-m', 'vesper_jax.prepare', f'--config.data.sources={corpus}',
             f'--config.data.cache_dir={cache_dir}', f'--config.model.vocab_size={vocab_size}',
             f'--config.data.bpe_sample_bytes={sample_bytes}', '--config.data.val_fraction=0.01']
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status:
      err.seek(0)
      raise RuntimeError(f'{command} failed: {err.read().decode()[-2000:]}')
  meta = json.loads(next((cache_dir / 'tokens').glob('*/meta.json')).read_text())
  return {'wall_s': wall, 'cpu_s': usage.ru_utime + usage.ru_stime, 'peak_rss_mb': usage.ru_maxrss / 1024,
          'tokens': meta['train_tokens'] + meta['val_tokens'], 'build_s': meta['build_seconds'],
          'build_tok_s': meta['tokens_per_second']}


def main(argv):
  del argv
  missing = [name for name in CORPORA if not _DATA.value or not (pathlib.Path(_DATA.value) / name).is_file()]
  if missing:
    where = f'--data_dir={_DATA.value} lacks {", ".join(missing)}' if _DATA.value else '--data_dir is required'
    raise app.UsageError(f'{where}: a folder that holds {", ".join(CORPORA)} (the docstring says where they '
                         f'come from)')
  docs = documents(pathlib.Path(_DATA.value))
  results = []
  with tempfile.TemporaryDirectory(dir=_WORK.value or None) as tmp:
    for size_mb in map(int, _SIZES.value):
      corpus = pathlib.Path(tmp) / f'corpus_{size_mb}MB.txt'
      write_corpus(corpus, size_mb * 10**6, docs)
      run = run_prepare(corpus, pathlib.Path(tmp) / f'cache_{size_mb}', _VOCAB.value, _SAMPLE.value * 10**6)
      results.append({'corpus_mb': corpus.stat().st_size / 1e6, **run})
      corpus.unlink()
  load = os.getloadavg()
  header = ('| corpus MB | tokens | wall s | build s | build tok/s | CPU s / wall s | peak RSS MB |\n'
            '|---:|---:|---:|---:|---:|---:|---:|')
  rows = [f'| {r["corpus_mb"]:.0f} | {r["tokens"]:,} | {r["wall_s"]:.0f} | {r["build_s"]:.0f} | '
          f'{r["build_tok_s"] / 1e6:.2f}M | {r["cpu_s"] / r["wall_s"]:.2f} | {r["peak_rss_mb"]:.0f} |'
          for r in results]
  machine = (f'{os.cpu_count()} CPUs, load average {load[0]:.2f} after; trained BPE {_VOCAB.value}, '
             f'data.bpe_sample_bytes={_SAMPLE.value} MB; corpora built from {", ".join(CORPORA)}')
  table = '\n'.join([header, *rows, '', machine])
  print(table)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': machine, 'results': results}, indent=1))
  out.with_suffix('.md').write_text(table + '\n')
  print(f'wrote {out} and {out.with_suffix(".md")}')


if __name__ == '__main__':
  app.run(main)
