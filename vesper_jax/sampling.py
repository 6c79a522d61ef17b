"""Sampling filters, KV-cache decoding and streamed text generation (SPEC §10).

Shape suffixes: B batch, P (padded) prompt length, C tokens per decode chunk, V vocabulary.

Decoding is a prefill followed by steps, all pure jitted functions over a small `DecodeState`:
  * `prefill` runs the left-padded prompts through the model in one call (filling the KV cache) and
    samples each row's first token;
  * `decode_step` feeds the newest token at each row's own position and samples the next;
  * `decode_chunk` runs up to C steps inside one `jax.lax.while_loop` (no host round trip per token).
`generate` drives them from the host and hands each batch of new tokens to a callback as it arrives;
`TextStream` turns a growing list of ids into printable text (whole UTF-8 characters, stop strings);
`generate_text` puts the two together for prompts given as strings.

Filters are applied in the usual order: repetition penalty, temperature, top-k, top-p, then a draw.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vesper_jax.model import ModelConfig, VesperLM, init_cache

PyTree = Any

_PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this, so a new length rarely recompiles
_STREAM_CONTEXT = 4  # prompt ids a TextStream decodes along with the first new ones (see TextStream)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. Hashable: it is a static argument, one compilation per setting."""
  temperature: float = 0.8         # 0 = greedy (argmax, deterministic)
  top_k: int = 50                  # keep the k most likely tokens (and any tied with the k-th); 0 = off
  top_p: float = 0.9               # keep the smallest most-likely set with mass >= top_p; 1.0 = off
  repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output; 1.0 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0 (0 = greedy)')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1 = off)')
    if self.repetition_penalty <= 0:
      raise ValueError(f'repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)')


GREEDY = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


# ------------------------------------------------------------------------------------------ filters
# Each takes and returns float32 logits_BV; a removed token gets -inf (probability exactly 0).
#
# top-k and top-p need a threshold: the k-th largest logit, or the probability of the last token of the
# nucleus. Two exact ways to find it, chosen by backend (`method=None`) or by the caller:
#   'sort':   lax.top_k / a sort over V — fast on accelerators;
#   'search': 32 passes of compare-and-count over V that build the threshold bit by bit (floats ordered
#             through their bit patterns) — on a CPU, XLA's top_k and sort over 32k entries cost 5-10 ms
#             per row, the search well under one.
# Both keep every token tied with the threshold, so they give the same set.

def _method(method: str | None) -> str:
  if method is None:
    return 'search' if jax.default_backend() == 'cpu' else 'sort'
  if method not in ('sort', 'search'):
    raise ValueError(f"method={method!r}: expected 'sort', 'search' or None")
  return method


def _ordered_bits(x_BV: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 values (a < b iff key(a) < key(b); -0 sorts below +0)."""
  i = jax.lax.bitcast_convert_type(x_BV.astype(jnp.float32), jnp.uint32)
  negative = (i >> 31) == 1
  return jnp.where(negative, ~i, i | jnp.uint32(1 << 31))


def _largest_key(keys_BV: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The largest t with enough(keys_BV >= t) true, per row: uint32[B, 1]. `enough` must be monotone
  (true at t = 0, and once false for some t, false for every larger t)."""
  def body(i, t_B1):
    candidate_B1 = t_B1 | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(enough(keys_BV >= candidate_B1), candidate_B1, t_B1)
  return jax.lax.fori_loop(0, 32, body, jnp.zeros((keys_BV.shape[0], 1), jnp.uint32))


def apply_temperature(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """Divides by the temperature (> 0; temperature 0 is handled as argmax by `sample_logits`)."""
  return logits_BV / temperature


def top_k_filter(logits_BV: jax.Array, k: int, method: str | None = None) -> jax.Array:
  """Keeps the tokens whose logit is at least the k-th largest (so ties with the k-th are all kept)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  if _method(method) == 'sort':
    keep_BV = logits_BV >= jax.lax.top_k(logits_BV, k)[0][:, -1:]
  else:
    keys_BV = _ordered_bits(logits_BV)
    keep_BV = keys_BV >= _largest_key(keys_BV, lambda m: jnp.sum(m, -1, keepdims=True) >= k)
  return jnp.where(keep_BV, logits_BV, -jnp.inf)


def top_p_filter(logits_BV: jax.Array, p: float, method: str | None = None) -> jax.Array:
  """Nucleus: keeps the most likely tokens up to and including the one that brings the mass to >= p.

  Every token as likely as the least likely member is kept too, so tied tokens are all in or all out
  whatever order a sort put them in. p = 1 keeps everything (without trusting a float32 sum to reach 1).
  """
  if p >= 1.0:
    return logits_BV
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  if _method(method) == 'sort':
    sorted_BV = -jnp.sort(-probs_BV, axis=-1)  # descending
    mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
    # A token is in the nucleus if the mass strictly before it is < p; the top token always is.
    threshold_B1 = jnp.min(jnp.where(mass_before_BV < p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    keep_BV = probs_BV >= threshold_B1
  else:
    # The threshold is the largest probability t such that the tokens at least t likely hold >= p.
    keys_BV = _ordered_bits(probs_BV)
    mass_reaches_p = lambda m: jnp.sum(jnp.where(m, probs_BV, 0.0), -1, keepdims=True) >= p
    keep_BV = keys_BV >= _largest_key(keys_BV, mass_reaches_p)
  return jnp.where(keep_BV, logits_BV, -jnp.inf)


def _top_k_top_p_sorted(logits_BV: jax.Array, k: int, p: float) -> jax.Array:
  """top_p_filter(top_k_filter(x, k), p) from the k values lax.top_k returns sorted: no sort over V."""
  top_Bk = jax.lax.top_k(logits_BV, k)[0]
  logits_BV = jnp.where(logits_BV >= top_Bk[:, -1:], logits_BV, -jnp.inf)
  lse_B1 = jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True)
  probs_Bk = jnp.exp(top_Bk - lse_B1)
  mass_before_Bk = jnp.cumsum(probs_Bk, axis=-1) - probs_Bk
  # Tokens tied with the k-th beyond the k returned share its probability: if the nucleus is not complete
  # within the k, the threshold is the k-th's probability and every tied token stays, as in top_k_filter.
  threshold_B1 = jnp.min(jnp.where(mass_before_Bk < p, probs_Bk, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(jnp.exp(logits_BV - lse_B1) >= threshold_B1, logits_BV, -jnp.inf)


def repetition_penalty_filter(logits_BV: jax.Array, seen_BV: jax.Array, penalty: float) -> jax.Array:
  """CTRL's rule on tokens already seen: a positive logit is divided by the penalty, a negative multiplied."""
  if penalty == 1.0:
    return logits_BV
  penalized_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalized_BV, logits_BV)


def sample_logits(rng: jax.Array, logits_BV: jax.Array, seen_BV: jax.Array, sampling: SamplingConfig,
                  method: str | None = None) -> jax.Array:
  """Applies the filters in order and draws one token per row (argmax at temperature 0): int32[B]."""
  logits_BV = repetition_penalty_filter(logits_BV, seen_BV, sampling.repetition_penalty)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = apply_temperature(logits_BV, sampling.temperature)
  k, p = sampling.top_k, sampling.top_p
  if _method(method) == 'sort' and 0 < k < logits_BV.shape[-1] and p < 1.0:
    logits_BV = _top_k_top_p_sorted(logits_BV, k, p)
  else:
    logits_BV = top_p_filter(top_k_filter(logits_BV, k, method), p, method)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------ decoding

@flax.struct.dataclass
class DecodeState:
  """What one decode step needs; the sampled tokens themselves are returned, not kept here."""
  cache: PyTree           # the model's KV cache: per layer keys/values [B, S, K, H], key_valid [B, S],
                          # and one shared write index (S = padded prompt length + max new tokens)
  last_B: jax.Array       # int32 [B]: the newest sampled token, not yet written to the cache
  position_B: jax.Array   # int32 [B]: RoPE position of last_B (= the row's real tokens before it)
  seen_BV: jax.Array      # bool [B, V]: tokens in the prompt or sampled so far (repetition penalty)
  done_B: jax.Array       # bool [B]: the row has sampled EOS; it then only emits eos_id
  rng: jax.Array          # PRNG key for the next draw


def _sample_into_state(state: DecodeState, logits_BV: jax.Array, sampling: SamplingConfig,
                       eos_id: int | None) -> tuple[DecodeState, jax.Array]:
  rng, draw_rng = jax.random.split(state.rng)
  token_B = sample_logits(draw_rng, logits_BV, state.seen_BV, sampling)
  done_B = state.done_B
  if eos_id is not None:
    token_B = jnp.where(done_B, eos_id, token_B)  # a finished row stays finished
    done_B = done_B | (token_B == eos_id)
  seen_BV = state.seen_BV
  if sampling.repetition_penalty != 1.0:
    seen_BV = seen_BV.at[jnp.arange(token_B.shape[0]), token_B].set(True)
  return state.replace(last_B=token_B, seen_BV=seen_BV, done_B=done_B, rng=rng), token_B


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'eos_id', 'cache_len'))
def prefill(params: PyTree, prompt_BP: jax.Array, prompt_mask_BP: jax.Array, rng: jax.Array, *,
            config: ModelConfig, sampling: SamplingConfig, eos_id: int | None,
            cache_len: int) -> tuple[DecodeState, jax.Array]:
  """Runs the prompts through the model in one call and samples each row's first token.

  Args:
    params: the model's parameters.
    prompt_BP: int32 prompts, left-padded (each row's last column is its last real token).
    prompt_mask_BP: 1 for real tokens, 0 for padding.
    rng: PRNG key; the same key, prompts and settings give the same tokens.
    config: the model config (decode mode is switched on here).
    sampling: the filters.
    eos_id: the token that ends a row; None = rows end only at the length limit.
    cache_len: KV-cache slots, at least P + the number of decode steps that will follow.
  Returns:
    (state, token_B): the state for `decode_step`/`decode_chunk` and the first sampled token per row.
  """
  config = config.replace(decode=True)
  B, P = prompt_BP.shape
  mask_BP = prompt_mask_BP.astype(jnp.int32)
  # Left padding: a row's positions count only its real tokens, so a prompt's RoPE positions (and hence
  # its continuation) do not depend on how much padding the batch gave it.
  positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
  cache = init_cache(config, B, cache_len)
  logits_BPV, variables = VesperLM(config).apply({'params': params, 'cache': cache}, prompt_BP,
                                                 positions_BT=positions_BP, attention_mask_BT=mask_BP,
                                                 last_only=True, mutable=['cache'])
  V = logits_BPV.shape[-1]
  seen_BV = jnp.zeros((B, V), jnp.bool_)
  if sampling.repetition_penalty != 1.0:
    rows_BP = jnp.broadcast_to(jnp.arange(B)[:, None], (B, P))
    seen_BV = seen_BV.at[rows_BP, prompt_BP].max(mask_BP.astype(jnp.bool_))
  state = DecodeState(cache=variables['cache'], last_B=jnp.zeros((B,), jnp.int32),
                      position_B=jnp.sum(mask_BP, axis=1), seen_BV=seen_BV,
                      done_B=jnp.zeros((B,), jnp.bool_), rng=rng)
  return _sample_into_state(state, logits_BPV[:, -1], sampling, eos_id)


def _step(params: PyTree, state: DecodeState, config: ModelConfig, sampling: SamplingConfig,
          eos_id: int | None) -> tuple[DecodeState, jax.Array]:
  config = config.replace(decode=True)
  logits_B1V, variables = VesperLM(config).apply(
      {'params': params, 'cache': state.cache}, state.last_B[:, None],
      positions_BT=state.position_B[:, None], attention_mask_BT=jnp.ones_like(state.last_B)[:, None],
      mutable=['cache'])
  state = state.replace(cache=variables['cache'], position_B=state.position_B + 1)
  return _sample_into_state(state, logits_B1V[:, 0], sampling, eos_id)


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'eos_id'), donate_argnames=('state',))
def decode_step(params: PyTree, state: DecodeState, *, config: ModelConfig, sampling: SamplingConfig,
                eos_id: int | None) -> tuple[DecodeState, jax.Array]:
  """One token per row: feeds `state.last_B` to the cache and samples the next. Returns (state, token_B)."""
  return _step(params, state, config, sampling, eos_id)


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'eos_id', 'chunk'),
                   donate_argnames=('state',))
def decode_chunk(params: PyTree, state: DecodeState, num_steps: jax.Array, *, config: ModelConfig,
                 sampling: SamplingConfig, eos_id: int | None,
                 chunk: int) -> tuple[DecodeState, jax.Array, jax.Array]:
  """Up to `num_steps` (<= chunk) steps in one `while_loop`, stopping early once every row is done.

  Returns:
    (state, tokens_BC, count): the tokens sampled, column by column (eos_id, or 0, after `count`), and
    how many steps ran.
  """
  B = state.last_B.shape[0]
  tokens_BC = jnp.full((B, chunk), 0 if eos_id is None else eos_id, jnp.int32)

  def cond(carry):
    i, state, _ = carry
    return (i < jnp.minimum(num_steps, chunk)) & ~jnp.all(state.done_B)

  def body(carry):
    i, state, tokens_BC = carry
    state, token_B = _step(params, state, config, sampling, eos_id)
    return i + 1, state, jax.lax.dynamic_update_slice(tokens_BC, token_B[:, None], (0, i))

  count, state, tokens_BC = jax.lax.while_loop(cond, body, (jnp.int32(0), state, tokens_BC))
  return state, tokens_BC, count


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = _PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to one length, a multiple of `bucket`: (prompt_BP int32, mask_BP int32)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token (start an empty prompt with the EOS id)')
  P = -(-max(len(p) for p in prompts) // bucket) * bucket
  prompt_BP = np.zeros((len(prompts), P), np.int32)
  mask_BP = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    prompt_BP[b, P - len(p):] = p
    mask_BP[b, P - len(p):] = 1
  return prompt_BP, mask_BP


@dataclasses.dataclass
class GenerationStats:
  """Wall-clock timings of one `generate` call. The first call of a shape also compiles: its
  compilation (prefill's and the decode step's) lands in `prefill_s`, never in the decode rate."""
  prompt_tokens: int = 0   # real prompt tokens, all rows
  prefill_s: float = 0.0   # until the first sampled tokens were on the host
  new_tokens: int = 0      # tokens returned, all rows (EOS excluded)
  decode_tokens: int = 0   # of which sampled after the first (those timed by decode_s)
  decode_s: float = 0.0    # from the first tokens on the host to the last

  @property
  def decode_tokens_per_s(self) -> float:
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else float('nan')


def generate(params: PyTree, config: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             eos_id: int | None = None, seed: int = 0, chunk_size: int = 1,
             on_tokens: Callable[[list[list[int]]], bool | None] | None = None,
             stats: GenerationStats | None = None) -> list[list[int]]:
  """Samples up to `max_new_tokens` after each prompt; rows end at EOS (not included in the output).

  Args:
    params, config: the model.
    prompts: token lists of any lengths (left-padded into one batch).
    max_new_tokens: the length limit per row; prompt + max_new_tokens must fit `config.max_seq_len`.
    sampling: the filters.
    eos_id: the end-of-sequence token, or None.
    seed: the same seed, prompts and settings give the same tokens.
    chunk_size: tokens per device call: 1 = one jitted step per token (lowest latency when streaming);
      larger = a `while_loop` of that many steps per call (fewer host round trips).
    on_tokens: called with each row's new tokens as they reach the host; returning True stops all rows
      (used for stop strings).
    stats: filled with timings when given.
  Returns:
    the new tokens of each row.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if chunk_size < 1:  # 0 would never advance `remaining` below: the loop would not end
    raise ValueError(f'chunk_size={chunk_size} must be >= 1')
  longest = max(len(p) for p in prompts) if prompts else 0
  if longest + max_new_tokens > config.max_seq_len:
    raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context '
                     f'window model.max_seq_len={config.max_seq_len}')
  stats = stats if stats is not None else GenerationStats()
  prompt_BP, mask_BP = left_pad(prompts)
  B, P = prompt_BP.shape
  stats.prompt_tokens = int(mask_BP.sum())
  statics = dict(config=config, sampling=sampling, eos_id=eos_id)
  start = time.perf_counter()
  state, token_B = prefill(params, prompt_BP, mask_BP, jax.random.key(seed),
                           cache_len=P + max_new_tokens, **statics)
  pending = (token_B[:, None], None)
  remaining = max_new_tokens - 1
  outputs: list[list[int]] = [[] for _ in range(B)]
  finished = [False] * B
  first_read = []
  while True:
    # Dispatch the next device call before reading the pending tokens, so the device computes step
    # n+1 while the host detokenizes and prints step n (its result is dropped if we stop now).
    following = None
    if remaining > 0:
      if chunk_size == 1:
        state, token_B = decode_step(params, state, **statics)
        following, remaining = (token_B[:, None], None), remaining - 1
      else:
        n = min(chunk_size, remaining)
        state, tokens_BC, count = decode_chunk(params, state, jnp.int32(n), chunk=chunk_size, **statics)
        following, remaining = (tokens_BC, count), remaining - n
    new_BC = np.asarray(pending[0])
    if pending[1] is not None:
      new_BC = new_BC[:, :int(pending[1])]
    new: list[list[int]] = []
    for b in range(B):
      row = [] if finished[b] else new_BC[b].tolist()
      if eos_id is not None and eos_id in row:
        row, finished[b] = row[:row.index(eos_id)], True
      outputs[b].extend(row)
      new.append(row)
    if not first_read:
      first_read = [time.perf_counter(), sum(len(r) for r in new)]
    stop = on_tokens(new) if on_tokens is not None else False
    if stop or all(finished) or following is None:
      break
    pending = following

  stats.prefill_s = first_read[0] - start
  stats.decode_s = time.perf_counter() - first_read[0]
  stats.new_tokens = sum(len(o) for o in outputs)
  stats.decode_tokens = stats.new_tokens - first_read[1]
  logging.info('generate: %d prompt tokens, first tokens after %.3f s, %d tokens at %.1f tokens/s',
               stats.prompt_tokens, stats.prefill_s, stats.new_tokens, stats.decode_tokens_per_s)
  return outputs


# ------------------------------------------------------------------------------------------ text

class Tokenizer(Protocol):
  """What generation needs of vesper_jax.tokenizer.Tokenizer."""
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

  def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), context: Sequence[int] = ()):
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


def generate_text(params: PyTree, config: ModelConfig, tokenizer: Tokenizer,
                  prompts: Sequence[str | Sequence[int]], *,
                  max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                  stop_strings: Sequence[str] = (), chunk_size: int = 1,
                  on_text: Callable[[int, str], None] | None = None,
                  stats: GenerationStats | None = None) -> list[str]:
  """Continues each prompt; `on_text(row, piece)` receives printable text as it is produced.

  A prompt is a string or its token ids. Rows end at the tokenizer's EOS, at the first stop string
  (excluded from the text) or after `max_new_tokens`. An empty prompt starts from the EOS token (the
  document separator in training). Returns the continuation of each prompt.
  """
  ids = [(tokenizer.encode(p) if isinstance(p, str) else list(p)) or [tokenizer.eos_id] for p in prompts]
  streams = [TextStream(tokenizer, stop_strings, context=row) for row in ids]

  def on_tokens(new: list[list[int]]) -> bool:
    for b, (stream, row) in enumerate(zip(streams, new)):
      piece = stream.push(row) if row else ''
      if piece and on_text is not None:
        on_text(b, piece)
    return all(s.stopped for s in streams)

  generate(params, config, ids, max_new_tokens=max_new_tokens, sampling=sampling,
           eos_id=tokenizer.eos_id, seed=seed, chunk_size=chunk_size, on_tokens=on_tokens, stats=stats)
  for b, stream in enumerate(streams):
    piece = stream.finish()
    if piece and on_text is not None:
      on_text(b, piece)
  return [s.text for s in streams]


def cast_for_inference(config: ModelConfig, params: PyTree, dtype: str) -> tuple[ModelConfig, PyTree]:
  """Computes in `dtype` with the parameters stored in `dtype` too (halves the bytes read per token)."""
  jdtype = jnp.dtype(dtype)
  return config.replace(dtype=dtype), jax.tree.map(lambda x: x.astype(jdtype), params)
