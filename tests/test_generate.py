"""Text generation (generate.py): the streaming detokenizer, stop strings, generate_text, and the
`python -m vesper_jax.generate` entry point end to end on a tiny workdir."""

import os
import selectors
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_model
from vesper_jax import checkpoint, generate
from vesper_jax.sampling import GREEDY, SamplingConfig


# ------------------------------------------------------------------------------ text

@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  """A byte-level BPE trained on ASCII text: any non-ASCII character is split into byte tokens."""
  from vesper_jax.tokenizer import train_bpe
  text = ('The quick brown fox jumps over the lazy dog. A small language model reads the text, one '
          'token at a time, and predicts the next one. ') * 20
  return train_bpe([text], 400, tmp_path_factory.mktemp('tok') / 'tokenizer.json')


def test_text_stream_never_splits_a_multibyte_character(bpe):
  text = 'Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642 done'
  ids = bpe.encode(text)
  assert len(ids) > len(text.encode('ascii', 'ignore').split())  # multibyte chars became several ids
  assert '\ufffd' in ''.join(bpe.decode([i]) for i in ids)  # decoding id by id would be wrong
  stream = generate.TextStream(bpe)
  pieces = [stream.push([i]) for i in ids] + [stream.finish()]
  assert all('\ufffd' not in piece for piece in pieces)
  assert ''.join(pieces) == text == stream.text
  assert sum(1 for piece in pieces if piece) > 5  # it really streamed


class _CharTokenizer:
  eos_id = 0

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids if i)


def test_text_stream_holds_back_a_possible_stop_string():
  stream = generate.TextStream(_CharTokenizer(), stop_strings=['\nUser:'])
  out = [stream.push(_CharTokenizer().encode(s)) for s in ['Hello', '\nUs', 'e', 'r:', ' more']]
  assert out == ['Hello', '', '', '', '']
  assert stream.stopped and stream.text == 'Hello' and stream.finish() == ''
  # A false start is released once it cannot be a stop string any more.
  stream = generate.TextStream(_CharTokenizer(), stop_strings=['\nUser:'])
  assert [stream.push(_CharTokenizer().encode(s)) for s in ['Hi\nU', 'p']] == ['Hi', '\nUp']
  assert stream.finish() == '' and not stream.stopped


def test_text_stream_keeps_the_space_after_the_prompt_with_a_metaspace_decoder(tmp_path):
  # SentencePiece-style decoders (BARThez, Llama) drop the leading '▁' space of a sequence: decoded on
  # its own, a continuation would lose the space between the prompt and itself ('Il étaitun petit').
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  from vesper_jax.tokenizer import Tokenizer
  vocab = {'<unk>': 0, '</s>': 1, '▁Il': 2, '▁était': 3, '▁un': 4, '▁petit': 5, '▁garçon': 6}
  raw = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  raw.save(str(tmp_path / 'tokenizer.json'))
  tok = Tokenizer.load(tmp_path / 'tokenizer.json')
  prompt, new = [2, 3], [4, 5, 6]
  assert tok.decode(new) == 'un petit garçon'  # what decoding the continuation alone gives
  stream = generate.TextStream(tok, context=prompt)
  pieces = [stream.push([i]) for i in new] + [stream.finish()]
  assert tok.decode(prompt) + ''.join(pieces) == tok.decode(prompt + new) == 'Il était un petit garçon'
  assert stream.text == ' un petit garçon'


def test_generate_text_stops_at_a_stop_string(bpe):
  config, params = tiny_model(vocab_size=bpe.vocab_size)
  free = generate.generate_text(params, config, bpe, ['The quick'], max_new_tokens=40, sampling=GREEDY)[0]
  stop = free[10:14]
  assert free.find(stop) == 10
  pieces = []
  got = generate.generate_text(params, config, bpe, ['The quick'], max_new_tokens=40, sampling=GREEDY,
                               stop_strings=[stop], on_text=lambda row, piece: pieces.append(piece))[0]
  assert got == free[:10] == ''.join(pieces)


def test_generate_text_takes_ids_and_starts_an_empty_prompt_from_eos(bpe):
  config, params = tiny_model(vocab_size=bpe.vocab_size)
  pieces = {0: [], 1: [], 2: []}
  texts = generate.generate_text(params, config, bpe, ['The quick', bpe.encode('The quick'), ''],
                                 max_new_tokens=12, sampling=GREEDY,
                                 on_text=lambda row, piece: pieces[row].append(piece))
  assert texts[0] == texts[1] and texts[0]  # a string prompt and its ids give the same continuation
  assert all(''.join(pieces[row]) == texts[row] for row in pieces)  # every row streamed its own text
  from_eos = generate.generate_text(params, config, bpe, [[bpe.eos_id]], max_new_tokens=12, sampling=GREEDY)
  assert texts[2] == from_eos[0]


# ------------------------------------------------------------------------------ the entry point

def _cli(module: str, *args: str, **popen) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, '-m', f'vesper_jax.{module}', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_generate_streams_tokens_as_they_are_produced(inference_workdir):
  """Reads stdout while the process runs: the continuation must arrive in many separate pieces."""
  prompt = 'The quick'
  proc = _cli('generate', f'--workdir={inference_workdir}', f'--prompt={prompt}', '--max_new_tokens=150',
              '--temperature=0')
  selector = selectors.DefaultSelector()
  selector.register(proc.stdout, selectors.EVENT_READ, 'out')
  selector.register(proc.stderr, selectors.EVENT_READ, 'err')
  reads, err, open_streams = [], b'', 2
  while open_streams:
    for key, _ in selector.select(timeout=120):
      data = os.read(key.fileobj.fileno(), 65536)
      if not data:
        selector.unregister(key.fileobj)
        open_streams -= 1
      elif key.data == 'out':
        reads.append((time.perf_counter(), data))
      else:
        err += data
  assert proc.wait(timeout=60) == 0, err.decode(errors='replace')[-2000:]
  out = b''.join(data for _, data in reads).decode()
  assert out.startswith(prompt)
  continuation_reads = [data for _, data in reads if data.strip()]
  # Printed at the end in one write, the text would arrive in one or two reads.
  assert len(continuation_reads) >= 5, [d[:20] for d in continuation_reads]
  assert b'tokens/s' in err  # the rate goes to stderr, never into the text

  # The streamed text is exactly what the library produces for the same settings.
  config, params, tokenizer = checkpoint.load_for_inference(inference_workdir)
  want = generate.generate_text(params, config, tokenizer, [prompt], max_new_tokens=150,
                                sampling=SamplingConfig(temperature=0.0))[0]
  assert len(want) > 20  # a real continuation was compared
  assert out == prompt + want + '\n'


def test_generate_batch_of_prompts(inference_workdir):
  prompts = ['The quick', 'A small language']
  proc = _cli('generate', f'--workdir={inference_workdir}', *(f'--prompt={p}' for p in prompts),
              '--max_new_tokens=10', '--seed=3')
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-2000:]
  # Each prompt's block holds exactly what the library samples with the flags' defaults and this seed.
  config, params, tokenizer = checkpoint.load_for_inference(inference_workdir)
  texts = generate.generate_text(params, config, tokenizer, prompts, max_new_tokens=10, seed=3,
                                 sampling=SamplingConfig(temperature=0.8, top_k=50, top_p=0.9))
  assert all(texts), texts  # non-empty continuations: the comparison below means something
  assert out.decode() == ''.join(f'--- [{i}]\n{p}{t}\n' for i, (p, t) in enumerate(zip(prompts, texts)))


# ------------------------------------------------------------------------------ the regulator (SPEC §9)

def _regulate(workdir, **kwargs):
  config, params, tokenizer = checkpoint.load_for_inference(workdir)
  settings = dict(max_new_tokens=12, seed=5, sampling=SamplingConfig(temperature=1.0, top_k=0, top_p=1.0))
  return generate.regulate(params, config, tokenizer, 'def ', **settings, **kwargs)


def test_regulator_returns_the_most_confident_candidate_deterministically(metacog_workdir):
  run = metacog_workdir / 'run'
  seen = []
  never = generate.RegulatorConfig(candidates=3, confidence_threshold=1.0, flag_below=0.0)
  result = _regulate(run, regulator=never, on_candidate=lambda i, c: seen.append((i, c.score)))
  assert len(result.candidates) == 3 and not result.stopped_early and [i for i, _ in seen] == [0, 1, 2]
  scores = [c.score for c in result.candidates]
  assert len(set(scores)) > 1, scores  # different candidates, so the choice means something
  assert result.chosen == max(range(3), key=lambda i: scores[i]) and result.score == max(scores)
  assert result.text == result.candidates[result.chosen].text and result.flagged == []
  assert [c.seed for c in result.candidates] == [5, 6, 7]
  for c in result.candidates:  # the score is the mean of the head's per-token confidences
    assert len(c.confidences) == len(c.token_ids) and 0 < c.score < 1
    if c.confidences:
      assert abs(c.score - sum(c.confidences) / len(c.confidences)) < 1e-6
  again = _regulate(run, regulator=never)
  assert [c.text for c in again.candidates] == [c.text for c in result.candidates]
  assert [c.score for c in again.candidates] == scores and again.chosen == result.chosen


def test_regulator_stops_early_once_the_threshold_is_met(metacog_workdir):
  result = _regulate(metacog_workdir / 'run', regulator=generate.RegulatorConfig(
      candidates=3, confidence_threshold=0.0, flag_below=1.0))
  assert len(result.candidates) == 1 and result.stopped_early and result.chosen == 0
  # flag_below=1: every kept token is flagged, as one span over the whole text.
  text = result.text
  if result.candidates[0].token_ids and text:
    assert [(s.start, s.end) for s in result.flagged] == [(0, len(text))]
    assert generate.mark_spans(text, result.flagged) == f'[[{text}]]'
  with pytest.raises(ValueError, match='candidates'):
    generate.RegulatorConfig(candidates=0)
  with pytest.raises(ValueError, match='confidence_threshold'):
    generate.RegulatorConfig(confidence_threshold=1.5)


def test_mark_spans_and_the_regulator_needs_the_head(inference_workdir):
  spans = [generate.Span(0, 3, 0.2), generate.Span(9, 11, 0.4)]
  assert generate.mark_spans('The quick brown', spans) == '[[The]] quick[[ b]]rown'
  with pytest.raises(ValueError, match='model.metacog=True'):
    _regulate(inference_workdir)


def test_generate_cli_regulate_prints_the_chosen_candidate_after_progress_lines(metacog_workdir):
  run = metacog_workdir / 'run'
  proc = _cli('generate', f'--workdir={run}', '--prompt=def ', '--max_new_tokens=12', '--seed=5',
              '--regulate', '--candidates=2', '--confidence_threshold=1.0', '--flag_below=0',
              '--temperature=1.0', '--top_k=0', '--top_p=1.0')
  out, err = proc.communicate(timeout=180)
  assert proc.returncode == 0, err.decode()[-2000:]
  err = err.decode()
  assert '[regulator: candidate 1/2' in err and '[regulator: candidate 2/2' in err
  assert '[regulator: chose candidate' in err
  want = _regulate(run, regulator=generate.RegulatorConfig(candidates=2, confidence_threshold=1.0,
                                                           flag_below=0.0))
  assert out.decode() == 'def ' + want.text + '\n'
