"""Sample text from a trained model, streamed to the terminal as it is produced (SPEC §10).

  python -m vesper_jax.generate --workdir=runs/tiny --prompt='Once upon a time'

The continuation goes to stdout as it is decoded (one prompt: token by token; several prompts: each in
full at the end); timings and tokens/s go to stderr, so stdout holds only text.

The library part turns tokens into text as they come: `TextStream` (whole UTF-8 characters, stop
strings) and `generate_text` (prompts as strings, pieces of text to a callback), used here, by chat.py
and by the sample at the end of training. Decoding itself is decode.py.

With `--regulate` (a model trained with the metacognition head, SPEC §9), `regulate_batch` samples up to
`--candidates` continuations per prompt, stops once one's mean confidence exceeds
`--confidence_threshold`, and the most confident is printed after the selection (a progress line per
candidate on stderr), its tokens under `--flag_below` confidence marked [[like this]]. The confidences
come from the decode steps themselves (decode.generate(confidences=...)), and the prompts' candidates are
decoded as one batch per round. Without `--regulate`, streaming is unchanged.
"""

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np
from absl import app, flags, logging

from vesper_jax import checkpoint, cli, decode, quantize
from vesper_jax.model import ModelConfig, VesperLM, cast_for_inference
from vesper_jax.pytree import PyTree
from vesper_jax.sampling import SamplingConfig
from vesper_jax.tokenizer import Tokenizer

FLAGS = flags.FLAGS

_STREAM_CONTEXT = 4  # prompt ids a TextStream decodes along with the first new ones (see TextStream)
_SCORE_BUCKET = 64   # token_confidences pads prompt + continuation to a multiple of this many tokens


# ------------------------------------------------------------------------------------------ text

class TextCodec(Protocol):
  """What streaming text needs of a tokenizer (vesper_jax.tokenizer.Tokenizer is one)."""
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class TextStream:
  """Turns one row's growing token list into printable text, piece by piece.

  Decoding ids one at a time is wrong for byte-level tokenizers: a multi-byte character split across
  tokens decodes to U+FFFD until its last byte arrives. So each push decodes a short window of recent ids
  and emits only the new text past the previous window's, holding it back while it ends in U+FFFD.
  With stop strings, text that could be the start of one is held back too, and the text ends just
  before the first stop string.

  `context` (the prompt's ids) is decoded along with the first new ids but never emitted: decoders that
  drop the leading space of a sequence (Metaspace: BARThez, Llama) would otherwise drop the space
  between the prompt and its continuation.
  """

  def __init__(self, tokenizer: TextCodec, stop_strings: Sequence[str] = (), context: Sequence[int] = ()):
    self._tokenizer = tokenizer
    self._stops = tuple(s for s in stop_strings if s)
    self._ids: list[int] = [int(i) for i in context[-_STREAM_CONTEXT:]]
    self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already in self._text
    self._read_offset = len(self._ids)  # (or, at first, to the context's text, which is not emitted)
    self._text = ''          # stable decoded text (whole characters)
    self._emitted = 0        # characters of self._text handed out
    self.stopped = False     # a stop string was found

  @property
  def text(self) -> str:
    """All stable text so far (cut before a stop string)."""
    return self._text

  def push(self, ids: Sequence[int]) -> str:
    """Adds new ids; returns the new printable text ('' if none is stable yet)."""
    if self.stopped:
      return ''
    self._ids.extend(int(i) for i in ids)
    self._decode_new(final=False)
    return self._release(final=False)

  def finish(self) -> str:
    """No more ids: returns whatever was held back (a trailing U+FFFD is then a real broken byte)."""
    if not self.stopped:
      self._decode_new(final=True)
    return self._release(final=True)

  def _decode_new(self, final: bool) -> None:
    decode = self._tokenizer.decode
    before = decode(self._ids[self._prefix_offset:self._read_offset])
    after = decode(self._ids[self._prefix_offset:])
    if len(after) > len(before) and (final or not after.endswith('\ufffd')):
      # Decoding from prefix_offset rather than read_offset keeps decoders that drop a leading space at
      # the start of a sequence (Metaspace, ...) from dropping real spaces in the middle of the text.
      self._text += after[len(before):]
      self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

  def _release(self, final: bool) -> str:
    if self._stops and not self.stopped:
      search_from = max(0, self._emitted - max(len(s) for s in self._stops))
      hits = [i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0]
      if hits:
        self._text, self.stopped = self._text[:min(hits)], True
    end = len(self._text)
    if not (final or self.stopped):
      end -= self._partial_stop_length()
    out = self._text[self._emitted:end]
    self._emitted = max(self._emitted, end)
    return out

  def _partial_stop_length(self) -> int:
    """Length of the longest end of the text that is a proper prefix of a stop string."""
    best = 0
    for s in self._stops:
      for k in range(min(len(s) - 1, len(self._text)), best, -1):
        if self._text.endswith(s[:k]):
          best = k
          break
    return best


def generate_text(params: PyTree, config: ModelConfig, tokenizer: TextCodec,
                  prompts: Sequence[str | Sequence[int]], *,
                  max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                  stop_strings: Sequence[str] = (), chunk_size: int = 1,
                  on_text: Callable[[int, str], None] | None = None,
                  stats: decode.GenerationStats | None = None) -> list[str]:
  """Continues each prompt; `on_text(row, piece)` receives printable text as it is produced.

  A prompt is a string or its token ids. Rows end at the tokenizer's EOS, at the first stop string
  (excluded from the text) or after `max_new_tokens`. An empty prompt starts from the EOS token (the
  document separator in training). Returns the continuation of each prompt.
  """
  texts, _ = _generate_rows(params, config, tokenizer, prompts, max_new_tokens=max_new_tokens,
                            sampling=sampling, seed=seed, stop_strings=stop_strings, chunk_size=chunk_size,
                            on_text=on_text, stats=stats)
  return texts


def _prompt_ids(tokenizer: TextCodec, prompt: str | Sequence[int]) -> list[int]:
  return (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)) or [tokenizer.eos_id]


def _generate_rows(params: PyTree, config: ModelConfig, tokenizer: TextCodec,
                   prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int, sampling: SamplingConfig,
                   seed: int, stop_strings: Sequence[str], chunk_size: int,
                   on_text: Callable[[int, str], None] | None = None,
                   stats: decode.GenerationStats | None = None,
                   confidences: list[list[float]] | None = None) -> tuple[list[str], list[list[int]]]:
  """generate_text's work: (each row's text, each row's new token ids, EOS excluded); `confidences` as
  decode.generate's."""
  ids = [_prompt_ids(tokenizer, p) for p in prompts]
  streams = [TextStream(tokenizer, stop_strings, context=row) for row in ids]

  def on_tokens(new: list[list[int]]) -> bool:
    for b, (stream, row) in enumerate(zip(streams, new)):
      piece = stream.push(row) if row else ''
      if piece and on_text is not None:
        on_text(b, piece)
    return all(s.stopped for s in streams)

  new_ids = decode.generate(params, config, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                            eos_id=tokenizer.eos_id, seed=seed, chunk_size=chunk_size, on_tokens=on_tokens,
                            stats=stats, confidences=confidences)
  for b, stream in enumerate(streams):
    piece = stream.finish()
    if piece and on_text is not None:
      on_text(b, piece)
  return [s.text for s in streams], new_ids


# ------------------------------------------------------------------------------------------ regulator
# Confidence-guided resampling (SPEC §9): sample up to N candidates, stop early once one's mean
# confidence (the metacognition head's, per generated token) exceeds a threshold, keep the most confident.

@dataclasses.dataclass(frozen=True)
class RegulatorConfig:
  """The regulator's settings (the --candidates, --confidence_threshold, --flag_below flags)."""
  candidates: int = 3                 # candidates sampled at most (seeds seed, seed + 1, ...)
  confidence_threshold: float = 0.85  # stop once a candidate's mean confidence exceeds this
  flag_below: float = 0.5             # tokens whose confidence is below this are flagged (0 = none)

  def __post_init__(self):
    if self.candidates < 1:
      raise ValueError(f'candidates={self.candidates} must be >= 1')
    for name in ('confidence_threshold', 'flag_below'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'{name}={getattr(self, name)} must be in [0, 1]')


@dataclasses.dataclass(frozen=True)
class Span:
  """A run of low-confidence tokens in a candidate's text."""
  start: int          # character offsets into the text: text[start:end]
  end: int
  confidence: float   # the lowest token confidence in the run


@dataclasses.dataclass
class Candidate:
  """One sampled continuation and how confident the head was about it."""
  seed: int
  text: str
  token_ids: list[int]      # the new tokens whose text is in `text` (a stop string cuts both)
  confidences: list[float]  # the head's confidence at each of those tokens
  score: float              # their mean (no tokens: the confidence of the prediction that ended it)
  flagged: list[Span]


@dataclasses.dataclass
class Regulated:
  """The regulator's answer: the most confident candidate, and every candidate it sampled."""
  text: str
  score: float
  chosen: int                  # index into candidates
  candidates: list[Candidate]
  stopped_early: bool          # a candidate exceeded the threshold before all N were sampled

  @property
  def flagged(self) -> list[Span]:
    return self.candidates[self.chosen].flagged


@functools.partial(jax.jit, static_argnames=('config',))
def _confidence_T(params: PyTree, tokens_1T: jax.Array, config: ModelConfig) -> jax.Array:
  _, meta = VesperLM(config).apply({'params': params}, tokens_1T, with_metacog=True)
  return meta.confidence_BT[0]


def token_confidences(params: PyTree, config: ModelConfig, prompt_ids: Sequence[int],
                      new_ids: Sequence[int]) -> np.ndarray:
  """The head's confidence at the prediction of each new token (and, for no new tokens, of the one that
  ended the row), from one forward pass over prompt + new tokens. float32 [max(len(new_ids), 1)].

  For text that was not just decoded (the regulator reads its confidences from the decode steps, which
  give the same values: tested)."""
  if not config.metacog:
    raise ValueError('token confidences need the metacognition head (model.metacog=True)')
  tokens = list(prompt_ids) + list(new_ids)
  padded = -(-len(tokens) // _SCORE_BUCKET) * _SCORE_BUCKET  # few shapes, few compilations
  tokens_1T = np.zeros((1, padded), np.int32)
  tokens_1T[0, :len(tokens)] = tokens  # causal: the padding after the tokens changes nothing before it
  conf_T = np.asarray(_confidence_T(params, tokens_1T, config.replace(decode=False)))
  first = len(prompt_ids) - 1  # the position whose output predicts the first new token
  return conf_T[first:first + max(len(new_ids), 1)]


def _score(tokenizer: TextCodec, prompt_ids: Sequence[int], new_ids: Sequence[int], conf: Sequence[float],
           text: str, seed: int, flag_below: float) -> Candidate:
  """A candidate's kept tokens, their confidences, its score and its low-confidence spans; `conf` holds
  the decode steps' confidences (one per new token, and the EOS's when it ended the row)."""
  context = list(prompt_ids[-_STREAM_CONTEXT:])
  base = len(tokenizer.decode(context))
  ends = [max(0, len(tokenizer.decode(context + list(new_ids[:k + 1]))) - base) for k in range(len(new_ids))]
  ends = list(np.maximum.accumulate(ends)) if ends else []
  starts = [0] + ends[:-1]
  kept = [k for k in range(len(new_ids)) if starts[k] < len(text)]
  confidences = [float(conf[k]) for k in kept]
  score = float(np.mean(confidences)) if confidences else float(conf[0])
  flagged, run = [], []
  for k in kept + [None]:  # None closes the last run
    if k is not None and conf[k] < flag_below:
      run.append(k)
      continue
    if run:
      flagged.append(Span(int(starts[run[0]]), int(min(ends[run[-1]], len(text))),
                          float(min(conf[j] for j in run))))
      run = []
  return Candidate(seed, text, [int(new_ids[k]) for k in kept], confidences, score, flagged)


def regulate(params: PyTree, config: ModelConfig, tokenizer: TextCodec, prompt: str | Sequence[int], *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_strings: Sequence[str] = (), chunk_size: int = 1,
             regulator: RegulatorConfig = RegulatorConfig(),
             on_candidate: Callable[[int, Candidate], None] | None = None) -> Regulated:
  """Confidence-guided generation: candidate i samples with seed + i; stops after the first whose mean
  confidence exceeds `regulator.confidence_threshold`, or after `regulator.candidates`; returns the most
  confident (the first of equals). Deterministic for a given seed. `on_candidate(i, candidate)` is
  called as each one is scored (for a progress line). Needs the metacognition head."""
  return regulate_batch(params, config, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                        sampling=sampling, seed=seed, stop_strings=stop_strings, chunk_size=chunk_size,
                        regulator=regulator,
                        on_candidate=None if on_candidate is None else lambda _, i, c: on_candidate(i, c))[0]


def regulate_batch(params: PyTree, config: ModelConfig, tokenizer: TextCodec,
                   prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int,
                   sampling: SamplingConfig = SamplingConfig(), seed: int = 0, stop_strings: Sequence[str] = (),
                   chunk_size: int = 1, regulator: RegulatorConfig = RegulatorConfig(),
                   on_candidate: Callable[[int, int, Candidate], None] | None = None) -> list[Regulated]:
  """`regulate` for several prompts at once: round i decodes candidate i of every prompt still
  undecided as one batch (seed + i), the head's confidences read from the decode steps; a prompt leaves
  the rounds once a candidate exceeds the threshold. A prompt's candidates depend on the batch it ran
  in (as generate_text's rows do). `on_candidate(prompt index, i, candidate)` is called as each one is
  scored. Needs the metacognition head."""
  if not config.metacog:
    raise ValueError('the regulator needs a model trained with the metacognition head (model.metacog=True); '
                     'this model has none')
  ids = [_prompt_ids(tokenizer, p) for p in prompts]
  candidates: list[list[Candidate]] = [[] for _ in ids]
  active = list(range(len(ids)))
  for i in range(regulator.candidates):
    if not active:
      break
    confidences: list[list[float]] = []
    texts, new_ids = _generate_rows(params, config, tokenizer, [ids[r] for r in active],
                                    max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + i,
                                    stop_strings=stop_strings, chunk_size=chunk_size, confidences=confidences)
    still = []
    for row, r in enumerate(active):
      candidate = _score(tokenizer, ids[r], new_ids[row], confidences[row], texts[row], seed + i,
                         regulator.flag_below)
      candidates[r].append(candidate)
      if on_candidate is not None:
        on_candidate(r, i, candidate)
      if candidate.score <= regulator.confidence_threshold:
        still.append(r)
    active = still
  results = []
  for r, cands in enumerate(candidates):
    chosen = max(range(len(cands)), key=lambda i: (cands[i].score, -i))
    stopped_early = len(cands) < regulator.candidates
    logging.info('regulator: prompt %d, %d candidate(s), chose %d (mean confidence %.3f)%s', r, len(cands),
                 chosen, cands[chosen].score, ', stopped early' if stopped_early else '')
    results.append(Regulated(cands[chosen].text, cands[chosen].score, chosen, cands, stopped_early))
  return results


FLAG_OPEN, FLAG_CLOSE = '[[', ']]'  # how the CLIs mark low-confidence spans in printed text


def mark_spans(text: str, spans: Sequence[Span], open_mark: str = FLAG_OPEN, close_mark: str = FLAG_CLOSE) -> str:
  """`text` with each span wrapped in the marks (spans in order, not overlapping)."""
  out, at = [], 0
  for span in spans:
    out += [text[at:span.start], open_mark, text[span.start:span.end], close_mark]
    at = span.end
  return ''.join(out + [text[at:]])


# ------------------------------------------------------------------------------------------ CLI

def load_from_flags() -> tuple[ModelConfig, PyTree, Tokenizer, SamplingConfig]:
  """The model, tokenizer and sampling settings named by `define_common_flags` (chat uses this too)."""
  if not FLAGS['verbosity'].present:  # library INFO logs would interleave with the text in a terminal
    logging.set_verbosity(logging.WARNING)
  logging.info('devices: %s', jax.devices())
  try:
    settings = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                              repetition_penalty=FLAGS.repetition_penalty)
  except ValueError as e:  # e.g. --top_p=0: the flag's name and range, without a traceback
    raise app.UsageError(str(e)) from e
  config, params, tokenizer = checkpoint.load_for_inference(FLAGS.workdir)
  if FLAGS.regulate and not config.metacog:  # bad input (exit 1), found before any compilation
    raise ValueError(f'--regulate: {FLAGS.workdir} was trained without the metacognition head '
                     '(model.metacog=False); train with --config.model.metacog=True')
  if FLAGS.quantize:  # from the float32 weights, before any cast
    config, params = quantize.quantize_model(config, params, FLAGS.quantize,
                                             quantize_head=FLAGS.quantize_head)
  if FLAGS.dtype:
    config, params = cast_for_inference(config, params, FLAGS.dtype)
  return config, params, tokenizer, settings


def regulator_from_flags() -> RegulatorConfig | None:
  """The --regulate settings, or None without --regulate (chat uses this too)."""
  if not FLAGS.regulate:
    return None
  return RegulatorConfig(candidates=FLAGS.candidates, confidence_threshold=FLAGS.confidence_threshold,
                         flag_below=FLAGS.flag_below)


def progress_line(i: int, candidate: Candidate, regulator: RegulatorConfig) -> str:
  """The stderr line printed as candidate i is scored."""
  return (f'[regulator: candidate {i + 1}/{regulator.candidates}, mean confidence {candidate.score:.3f}'
          f'{" > threshold: stopping" if candidate.score > regulator.confidence_threshold else ""}]')


def summary_line(result: Regulated, regulator: RegulatorConfig) -> str:
  """The stderr line printed after the selection."""
  flags_note = (f'; {len(result.flagged)} span(s) under confidence {regulator.flag_below} marked '
                f'{FLAG_OPEN}...{FLAG_CLOSE}' if regulator.flag_below > 0 else '')
  return (f'[regulator: chose candidate {result.chosen + 1} of {len(result.candidates)} generated, mean '
          f'confidence {result.score:.3f}{", stopped early" if result.stopped_early else ""}{flags_note}]')


def _main_regulated(params: PyTree, config: ModelConfig, tokenizer: Tokenizer, settings: SamplingConfig,
                    max_new_tokens: int) -> None:
  """--regulate: the prompts as one batch; progress lines on stderr, then per prompt the chosen text
  (spans marked) on stdout."""
  regulator = regulator_from_flags()
  several = len(FLAGS.prompt) > 1

  def progress(r: int, j: int, candidate: Candidate) -> None:
    print(f'{f"[{r}] " if several else ""}{progress_line(j, candidate, regulator)}', file=sys.stderr,
          flush=True)

  results = regulate_batch(params, config, tokenizer, FLAGS.prompt, max_new_tokens=max_new_tokens,
                           sampling=settings, seed=FLAGS.seed, stop_strings=FLAGS.stop,
                           chunk_size=FLAGS.chunk_size, regulator=regulator, on_candidate=progress)
  for i, (prompt, result) in enumerate(zip(FLAGS.prompt, results)):
    header = f'--- [{i}]\n' if several else ''
    sys.stdout.write(f'{header}{prompt}{mark_spans(result.text, result.flagged)}\n')
    sys.stdout.flush()
    print(f'{f"[{i}] " if several else ""}{summary_line(result, regulator)}', file=sys.stderr, flush=True)


def main(argv):
  del argv
  config, params, tokenizer, settings = load_from_flags()
  prompts = FLAGS.prompt
  longest = max(len(tokenizer.encode(p)) or 1 for p in prompts)
  max_new_tokens = min(FLAGS.max_new_tokens, config.max_seq_len - longest)
  if max_new_tokens < 1:
    raise app.UsageError(f'the prompt ({longest} tokens) fills the context window '
                         f'(model.max_seq_len={config.max_seq_len})')
  if max_new_tokens < FLAGS.max_new_tokens:
    logging.warning('max_new_tokens capped to %d: the prompt is %d tokens of a %d-token context window',
                    max_new_tokens, longest, config.max_seq_len)
  if FLAGS.regulate:  # candidates are compared before anything is shown: no streaming
    _main_regulated(params, config, tokenizer, settings, max_new_tokens)
    return
  streaming = len(prompts) == 1

  def on_text(row: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()

  if streaming:
    sys.stdout.write(prompts[0])
    sys.stdout.flush()
  stats = decode.GenerationStats()
  texts = generate_text(params, config, tokenizer, prompts, max_new_tokens=max_new_tokens,
                        sampling=settings, seed=FLAGS.seed, stop_strings=FLAGS.stop,
                        chunk_size=FLAGS.chunk_size, on_text=on_text if streaming else None, stats=stats)
  if streaming:
    sys.stdout.write('\n')
  else:
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
      sys.stdout.write(f'--- [{i}]\n{prompt}{text}\n')
  sys.stdout.flush()
  print(f'[{stats.prompt_tokens} prompt tokens; first token after {stats.prefill_s:.2f} s (compilation '
        f'included); {stats.new_tokens} new tokens; decode {stats.decode_tokens_per_s:.1f} tokens/s]',
        file=sys.stderr)


def define_common_flags() -> None:
  """The flags generate and chat share: the workdir, the sampling filters, the inference dtype and
  quantization."""
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json, tokenizer.json, '
                      'checkpoints/).', required=True)
  flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
  flags.DEFINE_integer('top_k', 50, '0 = off.', lower_bound=0)
  flags.DEFINE_float('top_p', 0.9, '1.0 = off.')
  flags.DEFINE_float('repetition_penalty', 1.0, '> 1 discourages repeats; 1.0 = off.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute and weight dtype for '
                    'inference; default: the trained compute dtype with float32 weights.')
  flags.DEFINE_enum('quantize', None, list(quantize.SCHEMES), 'Weight-only quantization of the '
                    'projections: int8 (per output channel) or int4 (groups of 128 along the input).')
  flags.DEFINE_bool('quantize_head', False, 'With --quantize, quantize the output head too.')
  # The regulator (SPEC §9): needs a model trained with the metacognition head.
  flags.DEFINE_bool('regulate', False, 'Confidence-guided resampling: sample up to --candidates '
                    'continuations, keep the most confident (printed after selection, not streamed).')
  flags.DEFINE_integer('candidates', 3, 'With --regulate: candidates sampled at most.', lower_bound=1)
  flags.DEFINE_float('confidence_threshold', 0.85, 'With --regulate: stop once a candidate\'s mean '
                     'confidence exceeds this.', lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_float('flag_below', 0.5, 'With --regulate: mark tokens under this confidence '
                     f'{FLAG_OPEN}like this{FLAG_CLOSE}; 0 = mark nothing.', lower_bound=0.0, upper_bound=1.0)


def define_flags() -> None:
  define_common_flags()
  flags.DEFINE_multi_string('prompt', [''], 'Prompt text; repeat the flag for a batch of prompts. '
                            'An empty prompt starts a new document.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to sample at most, per prompt '
                       '(capped to what fits the context window).', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'The same seed and settings give the same text.')
  flags.DEFINE_multi_string('stop', [], 'Stop strings (repeatable); the text ends before the first.')
  flags.DEFINE_integer('chunk_size', 1, 'Tokens per device call: 1 = a jitted step per token; '
                       'more = a while_loop per chunk (fewer host round trips).', lower_bound=1)


if __name__ == '__main__':
  cli.run('vesper_jax.generate', main, define_flags)
