"""How tokens are produced: the KV cache, prefill and decode steps (SPEC §10).

Shape suffixes follow the package's key (model.py): B batch, P (padded) prompt length, C tokens per
decode chunk, V vocabulary.

Decoding is a prefill followed by steps, all pure jitted functions over a small `DecodeState`:
  * `prefill` runs the left-padded prompts through the model in one call (filling the KV cache) and
    samples each row's first token;
  * `decode_step` feeds the newest token at each row's own position and samples the next;
  * `decode_chunk` runs up to C steps inside one `jax.lax.while_loop` (no host round trip per token).
`generate` drives them from the host and hands each batch of new tokens to a callback as it arrives.
Which token is drawn is sampling.py's business; turning tokens into streamed text is generate.py's.

With `with_confidence=True` (a model with the metacognition head, SPEC §9) each of them also returns the
head's confidence in the prediction each token was drawn from, computed from the same hidden state and
logits in the same call: the regulator (generate.regulate) reads it while decoding, with no second
forward pass. Plain decoding never runs the head.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vesper_jax.model import ModelConfig, VesperLM, init_cache
from vesper_jax.pytree import PyTree
from vesper_jax.sampling import SamplingConfig, method_for, sample_logits

_PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this, so a new length rarely recompiles


@flax.struct.dataclass
class DecodeState:
  """What one decode step needs; the sampled tokens themselves are returned, not kept here."""
  cache: PyTree           # the model's KV cache: per layer keys [J, H, S], values [J, S, H] (J = B·K),
                          # key_valid [B, S], and one shared write index (S = padded prompt length
                          # + max new tokens); the layouts model._update_cache explains
  last_B: jax.Array       # int32 [B]: the newest sampled token, not yet written to the cache
  position_B: jax.Array   # int32 [B]: RoPE position of last_B (= the row's real tokens before it)
  seen_BV: jax.Array      # bool [B, V]: tokens in the prompt or sampled so far (repetition penalty)
  done_B: jax.Array       # bool [B]: the row has sampled EOS; it then only emits eos_id
  rng: jax.Array          # PRNG key for the next draw


def _confidence(config: ModelConfig, with_confidence: bool) -> None:
  if with_confidence and not config.metacog:
    raise ValueError('with_confidence=True needs the metacognition head (model.metacog=True)')


def _sample_into_state(state: DecodeState, logits_BV: jax.Array, sampling: SamplingConfig,
                       eos_id: int | None, method: str) -> tuple[DecodeState, jax.Array]:
  rng, draw_rng = jax.random.split(state.rng)
  token_B = sample_logits(draw_rng, logits_BV, state.seen_BV, sampling, method)
  done_B = state.done_B
  if eos_id is not None:
    token_B = jnp.where(done_B, eos_id, token_B)  # a finished row stays finished
    done_B = done_B | (token_B == eos_id)
  seen_BV = state.seen_BV
  if sampling.repetition_penalty != 1.0:
    seen_BV = seen_BV.at[jnp.arange(token_B.shape[0]), token_B].set(True)
  return state.replace(last_B=token_B, seen_BV=seen_BV, done_B=done_B, rng=rng), token_B


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'eos_id', 'cache_len', 'with_confidence'))
def prefill(params: PyTree, prompt_BP: jax.Array, prompt_mask_BP: jax.Array, rng: jax.Array, *,
            config: ModelConfig, sampling: SamplingConfig, eos_id: int | None,
            cache_len: int, with_confidence: bool = False) -> tuple[jax.Array, ...]:
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
    with_confidence: also return the metacognition head's confidence (float32 [B]) in the prediction
      the first token was drawn from.
  Returns:
    (state, token_B): the state for `decode_step`/`decode_chunk` and the first sampled token per row;
    with_confidence: (state, token_B, confidence_B).
  """
  _confidence(config, with_confidence)
  config = config.replace(decode=True)
  B, P = prompt_BP.shape
  mask_BP = prompt_mask_BP.astype(jnp.int32)
  # Left padding: a row's positions count only its real tokens, so a prompt's RoPE positions (and hence
  # its continuation) do not depend on how much padding the batch gave it.
  positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
  cache = init_cache(config, B, cache_len)
  out, variables = VesperLM(config).apply({'params': params, 'cache': cache}, prompt_BP,
                                          positions_BT=positions_BP, attention_mask_BT=mask_BP,
                                          last_only=True, with_metacog=with_confidence, mutable=['cache'])
  logits_BPV, meta = out if with_confidence else (out, None)
  V = logits_BPV.shape[-1]
  seen_BV = jnp.zeros((B, V), jnp.bool_)
  if sampling.repetition_penalty != 1.0:
    rows_BP = jnp.broadcast_to(jnp.arange(B)[:, None], (B, P))
    seen_BV = seen_BV.at[rows_BP, prompt_BP].max(mask_BP.astype(jnp.bool_))
  state = DecodeState(cache=variables['cache'], last_B=jnp.zeros((B,), jnp.int32),
                      position_B=jnp.sum(mask_BP, axis=1), seen_BV=seen_BV,
                      done_B=jnp.zeros((B,), jnp.bool_), rng=rng)
  state, token_B = _sample_into_state(state, logits_BPV[:, -1], sampling, eos_id, method_for(config.runs_on))
  return (state, token_B, meta.confidence_BT[:, -1]) if with_confidence else (state, token_B)


def _step(params: PyTree, state: DecodeState, config: ModelConfig, sampling: SamplingConfig,
          eos_id: int | None, with_confidence: bool = False) -> tuple[DecodeState, jax.Array, jax.Array | None]:
  config = config.replace(decode=True)
  out, variables = VesperLM(config).apply(
      {'params': params, 'cache': state.cache}, state.last_B[:, None],
      positions_BT=state.position_B[:, None], attention_mask_BT=jnp.ones_like(state.last_B)[:, None],
      with_metacog=with_confidence, mutable=['cache'])
  logits_B1V, meta = out if with_confidence else (out, None)
  state = state.replace(cache=variables['cache'], position_B=state.position_B + 1)
  state, token_B = _sample_into_state(state, logits_B1V[:, 0], sampling, eos_id, method_for(config.runs_on))
  return state, token_B, (meta.confidence_BT[:, 0] if with_confidence else None)


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'eos_id', 'with_confidence'),
                   donate_argnames=('state',))
def decode_step(params: PyTree, state: DecodeState, *, config: ModelConfig, sampling: SamplingConfig,
                eos_id: int | None, with_confidence: bool = False) -> tuple[jax.Array, ...]:
  """One token per row: feeds `state.last_B` to the cache and samples the next. Returns (state, token_B),
  and with_confidence the head's confidence in the prediction it was drawn from: (state, token_B,
  confidence_B)."""
  _confidence(config, with_confidence)
  state, token_B, confidence_B = _step(params, state, config, sampling, eos_id, with_confidence)
  return (state, token_B, confidence_B) if with_confidence else (state, token_B)


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'eos_id', 'chunk', 'with_confidence'),
                   donate_argnames=('state',))
def decode_chunk(params: PyTree, state: DecodeState, num_steps: jax.Array, *, config: ModelConfig,
                 sampling: SamplingConfig, eos_id: int | None, chunk: int,
                 with_confidence: bool = False) -> tuple[jax.Array, ...]:
  """Up to `num_steps` (<= chunk) steps in one `while_loop`, stopping early once every row is done.

  Returns:
    (state, tokens_BC, count): the tokens sampled, column by column (eos_id, or 0, after `count`), and
    how many steps ran; with_confidence, also confidence_BC (float32, the head's confidence in the
    prediction each token was drawn from; 0 after `count`): (state, tokens_BC, count, confidence_BC).
  """
  _confidence(config, with_confidence)
  B = state.last_B.shape[0]
  tokens_BC = jnp.full((B, chunk), 0 if eos_id is None else eos_id, jnp.int32)
  confidence_BC = jnp.zeros((B, chunk) if with_confidence else (B, 0), jnp.float32)

  def cond(carry):
    i, state, _, _ = carry
    return (i < jnp.minimum(num_steps, chunk)) & ~jnp.all(state.done_B)

  def body(carry):
    i, state, tokens_BC, confidence_BC = carry
    state, token_B, conf_B = _step(params, state, config, sampling, eos_id, with_confidence)
    if with_confidence:
      confidence_BC = jax.lax.dynamic_update_slice(confidence_BC, conf_B[:, None], (0, i))
    return i + 1, state, jax.lax.dynamic_update_slice(tokens_BC, token_B[:, None], (0, i)), confidence_BC

  count, state, tokens_BC, confidence_BC = jax.lax.while_loop(
      cond, body, (jnp.int32(0), state, tokens_BC, confidence_BC))
  return (state, tokens_BC, count, confidence_BC) if with_confidence else (state, tokens_BC, count)


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


def _dispatch(params: PyTree, state: DecodeState, n: int, chunk_size: int, statics: dict):
  """Starts the next `n` decode steps on the device; returns (state, (tokens_BC, count or None,
  confidence_BC or None))."""
  if chunk_size == 1:
    state, token_B, *conf = decode_step(params, state, **statics)
    return state, (token_B[:, None], None, conf[0][:, None] if conf else None)
  state, tokens_BC, count, *conf = decode_chunk(params, state, jnp.int32(n), chunk=chunk_size, **statics)
  return state, (tokens_BC, count, conf[0] if conf else None)


def _take_new(pending: tuple, finished: list[bool], eos_id: int | None,
              confidences: list[list[float]] | None) -> list[list[int]]:
  """Each row's new tokens from a dispatched call, cut at EOS (marking the row finished); appends the
  rows' confidences (those of the tokens, and of the EOS that ended a row) to `confidences`."""
  tokens_BC, count, confidence_BC = pending
  new_BC = np.asarray(tokens_BC)
  conf_BC = None if confidence_BC is None else np.asarray(confidence_BC)
  if count is not None:
    new_BC = new_BC[:, :int(count)]
  new = []
  for b in range(new_BC.shape[0]):
    row = [] if finished[b] else new_BC[b].tolist()
    kept = len(row)
    if eos_id is not None and eos_id in row:
      kept = row.index(eos_id) + 1
      row, finished[b] = row[:row.index(eos_id)], True
    if confidences is not None:
      confidences[b].extend(conf_BC[b, :kept].tolist())
    new.append(row)
  return new


def generate(params: PyTree, config: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             eos_id: int | None = None, seed: int = 0, chunk_size: int = 1,
             on_tokens: Callable[[list[list[int]]], bool | None] | None = None,
             stats: GenerationStats | None = None,
             confidences: list[list[float]] | None = None) -> list[list[int]]:
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
    confidences: when given (a model with the metacognition head), filled with one list per row: the
      head's confidence in the prediction each returned token was drawn from, plus, for a row that ended
      at EOS, the EOS's; computed by the decode calls themselves (with_confidence), not a second pass.
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
  with_confidence = confidences is not None
  if with_confidence:
    confidences[:] = [[] for _ in range(B)]
  statics = dict(config=config, sampling=sampling, eos_id=eos_id, with_confidence=with_confidence)
  start = time.perf_counter()
  state, token_B, *conf = prefill(params, prompt_BP, mask_BP, jax.random.key(seed),
                                  cache_len=P + max_new_tokens, **statics)
  pending = (token_B[:, None], None, conf[0][:, None] if conf else None)
  remaining = max_new_tokens - 1
  outputs: list[list[int]] = [[] for _ in range(B)]
  finished = [False] * B
  first_read = []
  while True:
    # Dispatch the next device call before reading the pending tokens, so the device computes step
    # n+1 while the host detokenizes and prints step n (its result is dropped if we stop now).
    following = None
    if remaining > 0:
      n = min(chunk_size, remaining)
      state, following = _dispatch(params, state, n, chunk_size, statics)
      remaining -= n
    new = _take_new(pending, finished, eos_id, confidences)
    for row, out in zip(new, outputs):
      out.extend(row)
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
