"""Preparation at scale (issues 17, 24): tokens/s and peak memory of `python -m vesper_jax.prepare` on
corpora of growing size, built from three real corpora in --data_dir (nothing larger is at hand offline).

    python experiments/bench_prepare.py --data_dir=DIR [--sizes_mb=20,200] [--vocab_size=16384] [--bpe_sample_mb=100]
    python experiments/bench_prepare.py --data_dir=DIR --tokenizer=PATH [--sizes_mb=21] [--corpora=tinystories_2MB.txt]
        [--repeats=3] [--baseline=OTHER_CHECKOUT]

DIR holds tinystories_2MB.txt, les_miserables_fr.txt and tinyshakespeare.txt (experiments/bench_data.py's
docstring says where each comes from).

Each size is a plain-text corpus of documents separated by <|endoftext|>: the stories of
tinystories_2MB.txt, the paragraphs of les_miserables_fr.txt and the speeches of tinyshakespeare.txt,
shuffled afresh (seeded) on every pass until the size is reached. Each run is a fresh process with an
empty cache: a BPE of --vocab_size trained on the first --bpe_sample_mb, then the whole corpus tokenized.
Reported per size: wall seconds, tokens, tokens/s of the build (meta.json), CPU use (user + system
seconds / wall: 2.0 = both cores of a 2-core machine busy) and peak RSS (os.wait4 of the process).

With --tokenizer=PATH (a given tokenizer.json: no BPE is trained) each prepare run is set beside the
tokenizer's own encode_batch loop over the same documents (the corpus's documents, stripped and cut by
data.split_long as prepare cuts them, in batches of data.BATCH_CHARS characters): `encode_batch_fast`
(what prepare calls, through Tokenizer.encode_batch) and, batch by batch in alternation with it,
`tokenizers.Tokenizer.encode_batch` (which also computes offsets); only those calls are timed. The loop
runs in a fresh process with glibc's default malloc (VESPER_SYSTEM_MALLOC=1), and once more under
host_memory's single arena (what importing vesper_jax applies). Prepare runs as a user runs it (no
environment variable), and once more with VESPER_SYSTEM_MALLOC=1 (everything in one process with glibc's
arenas). These runs (and a prepare of --baseline, another checkout of the project, e.g.
`git archive HEAD | tar -x -C /tmp/before`) alternate --repeats times; medians are reported, and the
median of prepare ÷ the loop run just before it ("paired"), which drifts less on a shared machine.
Prepare's rate is the build's (meta.json: reading, encoding, writing; the interpreter's start and the
tokenizer's loading are not in it; its wall seconds are beside it).
--corpora=NAME[,NAME] builds the corpus from only those of the three (the issue measured TinyStories).
"""

import json
import os
import pathlib
import random
import shutil
import statistics
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
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'A given tokenizer.json (data.tokenizer): no BPE training; '
                                 'the tokenizer\'s own encode_batch loop is timed beside prepare.')
_CORPORA = flags.DEFINE_list('corpora', [], 'Which of the three corpora the documents come from (default all).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'With --tokenizer: alternating runs of each, medians reported.')
_BASELINE = flags.DEFINE_string('baseline', '', 'With --tokenizer: another checkout whose prepare is timed too.')
_LOOP = flags.DEFINE_string('encode_loop', '', 'Internal: time the encode_batch loop over this corpus, print JSON.')

SEPARATOR = '\n<|endoftext|>\n'
CORPORA = ('tinystories_2MB.txt', 'les_miserables_fr.txt', 'tinyshakespeare.txt')  # what documents() reads


def documents(data_dir: pathlib.Path, names: list[str] | tuple[str, ...] = CORPORA) -> list[str]:
  """Stories, novel paragraphs and play speeches from the corpora in data_dir (those in `names`)."""
  separators = {'tinystories_2MB.txt': '<|endoftext|>', 'les_miserables_fr.txt': '\n\n',
                'tinyshakespeare.txt': '\n\n'}
  docs = [d for name in names for d in (data_dir / name).read_text().split(separators[name])]
  return [d.strip() for d in docs if d.strip()]


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


def run_prepare(corpus: pathlib.Path, cache_dir: pathlib.Path, vocab_size: int, sample_bytes: int,
                tokenizer: str = '', repo: pathlib.Path = REPO, env: dict | None = None) -> dict:
  """One cold `python -m vesper_jax.prepare` of `repo` in a fresh process: wall/CPU seconds, peak RSS, the
  meta. The environment is this one's with `env` added."""
  command = [sys.executable, '-m', 'vesper_jax.prepare', f'--config.data.sources={corpus}',
             f'--config.data.cache_dir={cache_dir}', f'--config.model.vocab_size={vocab_size}',
             f'--config.data.bpe_sample_bytes={sample_bytes}', '--config.data.val_fraction=0.01',
             f'--config.data.tokenizer={tokenizer}']
  env = {**os.environ, **(env or {}),
         'PYTHONPATH': os.pathsep.join(filter(None, [str(repo), os.environ.get('PYTHONPATH')]))}
  shutil.rmtree(cache_dir, ignore_errors=True)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=repo, stdout=out, stderr=err, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status:
      err.seek(0)
      raise RuntimeError(f'{command} failed: {err.read().decode()[-2000:]}')
  meta = json.loads(next((cache_dir / 'tokens').glob('*/meta.json')).read_text())
  return {'wall_s': wall, 'cpu_s': usage.ru_utime + usage.ru_stime, 'peak_rss_mb': usage.ru_maxrss / 1024,
          'tokens': meta['train_tokens'] + meta['val_tokens'], 'build_s': meta['build_seconds'],
          'build_tok_s': meta['tokens_per_second']}


def encode_loop(corpus: pathlib.Path, tokenizer_path: str) -> dict:
  """The tokenizer's own encode_batch over the corpus's documents, cut and batched as prepare cuts them;
  only the encode_batch calls are timed. Runs in the process that calls it (see run_encode_loop)."""
  from vesper_jax import data, host_memory, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  docs = [d.strip() for d in corpus.read_text().split('<|endoftext|>') if d.strip()]
  batches, batch, chars = [], [], 0
  for piece in (piece for doc in docs for piece in data.split_long(doc, data.PIECE_CHARS)):
    batch.append(piece)
    chars += len(piece)
    if chars >= data.BATCH_CHARS:
      batches.append(batch)
      batch, chars = [], 0
  batches.append(batch)
  tokens, seconds, offsets_seconds = 0, 0.0, 0.0
  for batch in batches:  # the two methods alternate batch by batch, so the machine's drift hits both
    start = time.perf_counter()
    encoded = tokenizer.encode_batch(batch)  # what prepare calls: tokenizers' encode_batch_fast, the ids
    seconds += time.perf_counter() - start
    tokens += sum(map(len, encoded))
    start = time.perf_counter()
    raw = tokenizer._tokenizer  # pylint: disable=protected-access  (the tokenizers object itself)
    [e.ids for e in raw.encode_batch(batch, add_special_tokens=False)]  # pylint: disable=expression-not-assigned
    offsets_seconds += time.perf_counter() - start
  return {'documents': len(docs), 'tokens': tokens, 'encode_s': seconds, 'encode_tok_s': tokens / seconds,
          'offsets_s': offsets_seconds, 'offsets_tok_s': tokens / offsets_seconds,
          'single_arena': host_memory.single_arena()}


def run_encode_loop(corpus: pathlib.Path, tokenizer_path: str, system_malloc: bool) -> dict:
  """encode_loop in a fresh process: with glibc's default malloc, or under host_memory's single arena."""
  env = {key: value for key, value in os.environ.items() if key != 'VESPER_SYSTEM_MALLOC'}
  if system_malloc:
    env['VESPER_SYSTEM_MALLOC'] = '1'
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
  out = subprocess.run([sys.executable, __file__, f'--encode_loop={corpus}', f'--tokenizer={tokenizer_path}'],
                       cwd=REPO, env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.splitlines()[-1])


def compare_with_tokenizer(corpus: pathlib.Path, tmp: pathlib.Path) -> dict:
  """--tokenizer mode for one corpus: prepare(s) and the encode_batch loops, alternating; medians."""
  runs = {'loop_system': [], 'loop_single': [], 'prepare': [], 'prepare_system': [], 'baseline': []}
  for _ in range(_REPEATS.value):
    runs['loop_system'].append(run_encode_loop(corpus, _TOKENIZER.value, system_malloc=True))
    runs['prepare'].append(run_prepare(corpus, tmp / 'cache', 1 << 20, 0, _TOKENIZER.value))
    runs['loop_single'].append(run_encode_loop(corpus, _TOKENIZER.value, system_malloc=False))
    runs['prepare_system'].append(run_prepare(corpus, tmp / 'cache', 1 << 20, 0, _TOKENIZER.value,
                                              env={'VESPER_SYSTEM_MALLOC': '1'}))
    if _BASELINE.value:
      runs['baseline'].append(run_prepare(corpus, tmp / 'cache', 1 << 20, 0, _TOKENIZER.value,
                                          pathlib.Path(_BASELINE.value)))
  loop, prepared = runs['loop_system'][0], runs['prepare'][0]
  if loop['tokens'] + loop['documents'] != prepared['tokens']:  # prepare adds one EOS per document
    raise RuntimeError(f'the loop and prepare saw different documents: {loop} {prepared}')
  median = lambda rows, key: statistics.median(r[key] for r in rows) if rows else None
  return {'corpus_mb': corpus.stat().st_size / 1e6, 'tokens': prepared['tokens'], 'runs': runs,
          'encode_tok_s': median(runs['loop_system'], 'encode_tok_s'),
          'offsets_tok_s': median(runs['loop_system'], 'offsets_tok_s'),
          'encode_single_arena_tok_s': median(runs['loop_single'], 'encode_tok_s'),
          'build_tok_s': median(runs['prepare'], 'build_tok_s'), 'wall_s': median(runs['prepare'], 'wall_s'),
          # prepare ÷ the loop run just before it: steadier than a ratio of medians when the load drifts
          'paired_ratio': statistics.median(r['build_tok_s'] / l['encode_tok_s']
                                            for r, l in zip(runs['prepare'], runs['loop_system'])),
          'system_build_tok_s': median(runs['prepare_system'], 'build_tok_s'),
          'peak_rss_mb': median(runs['prepare'], 'peak_rss_mb'),
          'baseline_build_tok_s': median(runs['baseline'], 'build_tok_s')}


def tokenizer_table(results: list[dict]) -> str:
  header = ('| corpus MB | tokens | encode_batch_fast loop tok/s | encode_batch (offsets) loop | '
            'encode_batch_fast under one arena | prepare tok/s | prepare ÷ encode_batch_fast loop (paired) | '
            'prepare wall s | peak RSS MB | prepare, VESPER_SYSTEM_MALLOC=1 |'
            + (' baseline prepare tok/s |' if _BASELINE.value else '')
            + '\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if _BASELINE.value else ''))
  rows = [f'| {r["corpus_mb"]:.0f} | {r["tokens"]:,} | {r["encode_tok_s"] / 1e6:.2f}M | '
          f'{r["offsets_tok_s"] / 1e6:.2f}M | '
          f'{r["encode_single_arena_tok_s"] / 1e6:.2f}M | {r["build_tok_s"] / 1e6:.2f}M | '
          f'{r["build_tok_s"] / r["encode_tok_s"]:.2f}× ({r["paired_ratio"]:.2f}×) | {r["wall_s"]:.1f} | '
          f'{r["peak_rss_mb"]:.0f} | '
          f'{r["system_build_tok_s"] / 1e6:.2f}M |'
          + (f' {r["baseline_build_tok_s"] / 1e6:.2f}M |' if _BASELINE.value else '') for r in results]
  return '\n'.join([header, *rows])


def _write(table: str, machine: str, results: list) -> None:
  """--out (JSON: the machine line and every result) and the table beside it (.md)."""
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': machine, 'results': results}, indent=1))
  out.with_suffix('.md').write_text(table + '\n')
  print(f'wrote {out} and {out.with_suffix(".md")}')


def main(argv):
  del argv
  if _LOOP.value:
    print(json.dumps(encode_loop(pathlib.Path(_LOOP.value), _TOKENIZER.value)))
    return
  missing = [name for name in (_CORPORA.value or CORPORA)
             if not _DATA.value or not (pathlib.Path(_DATA.value) / name).is_file()]
  if missing:
    where = f'--data_dir={_DATA.value} lacks {", ".join(missing)}' if _DATA.value else '--data_dir is required'
    raise app.UsageError(f'{where}: a folder that holds {", ".join(CORPORA)} (the docstring says where they '
                         f'come from)')
  corpora = tuple(_CORPORA.value) or CORPORA
  docs = documents(pathlib.Path(_DATA.value), corpora)
  results = []
  with tempfile.TemporaryDirectory(dir=_WORK.value or None) as tmp:
    for size_mb in map(int, _SIZES.value):
      corpus = pathlib.Path(tmp) / f'corpus_{size_mb}MB.txt'
      write_corpus(corpus, size_mb * 10**6, docs)
      if _TOKENIZER.value:
        results.append(compare_with_tokenizer(corpus, pathlib.Path(tmp)))
      else:
        run = run_prepare(corpus, pathlib.Path(tmp) / f'cache_{size_mb}', _VOCAB.value, _SAMPLE.value * 10**6)
        results.append({'corpus_mb': corpus.stat().st_size / 1e6, **run})
      corpus.unlink()
  load = os.getloadavg()
  if _TOKENIZER.value:
    machine = (f'{os.cpu_count()} CPUs, load average {load[0]:.2f} after; tokenizer {_TOKENIZER.value}; '
               f'corpora built from {", ".join(corpora)}; medians of {_REPEATS.value} alternating runs')
    table = '\n'.join([tokenizer_table(results), '', machine])
    print(table)
    _write(table, machine, results)
    return
  header = ('| corpus MB | tokens | wall s | build s | build tok/s | CPU s / wall s | peak RSS MB |\n'
            '|---:|---:|---:|---:|---:|---:|---:|')
  rows = [f'| {r["corpus_mb"]:.0f} | {r["tokens"]:,} | {r["wall_s"]:.0f} | {r["build_s"]:.0f} | '
          f'{r["build_tok_s"] / 1e6:.2f}M | {r["cpu_s"] / r["wall_s"]:.2f} | {r["peak_rss_mb"]:.0f} |'
          for r in results]
  machine = (f'{os.cpu_count()} CPUs, load average {load[0]:.2f} after; trained BPE {_VOCAB.value}, '
             f'data.bpe_sample_bytes={_SAMPLE.value} MB; corpora built from {", ".join(CORPORA)}')
  table = '\n'.join([header, *rows, '', machine])
  print(table)
  _write(table, machine, results)


if __name__ == '__main__':
  app.run(main)
