"""Decoding (decode.py): KV-cache greedy against full recomputation, batched prompts against one by one,
chunked against stepwise, seeds, EOS, the streaming callback, left padding and the refusals."""

import functools
import math
import re

import jax
import numpy as np
import pytest

from conftest import naive_greedy, tiny_model
from vesper_jax import decode
from vesper_jax.sampling import GREEDY, SamplingConfig

NEW_TOKENS = 64


@pytest.mark.parametrize('chunk_size', [1, 16])
@pytest.mark.parametrize('num_kv_heads', [None, 2])
def test_kv_cache_greedy_equals_full_recompute(num_kv_heads, chunk_size):
  config, params = tiny_model(num_kv_heads=num_kv_heads)
  prompt = [5, 17, 300, 42, 7, 7, 1000]
  got = decode.generate(params, config, [prompt], max_new_tokens=NEW_TOKENS, sampling=GREEDY,
                        chunk_size=chunk_size)[0]
  assert got == naive_greedy(config, params, prompt, NEW_TOKENS)
  assert len(set(got)) > 5  # a random model still produces varied tokens: the comparison means something


def test_batched_prompts_of_different_lengths_equal_one_by_one():
  config, params = tiny_model()
  # 70 tokens crosses the 64-token padding bucket: the batch is padded differently from each alone.
  prompts = [[3, 4, 5], list(range(100, 170)), [9, 8, 7, 6, 5, 4, 3, 2, 1]]
  batched = decode.generate(params, config, prompts, max_new_tokens=24, sampling=GREEDY)
  alone = [decode.generate(params, config, [p], max_new_tokens=24, sampling=GREEDY)[0] for p in prompts]
  assert batched == alone
  assert len({tuple(b) for b in batched}) == 3


def test_batched_chunked_equals_stepwise():
  config, params = tiny_model()
  prompts = [[3, 4, 5], list(range(100, 130))]
  cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2)
  step = decode.generate(params, config, prompts, max_new_tokens=20, sampling=cfg, seed=3)
  chunk = decode.generate(params, config, prompts, max_new_tokens=20, sampling=cfg, seed=3, chunk_size=8)
  assert step == chunk
  assert all(len(row) == 20 for row in step)  # no EOS: every row ran to the limit


def test_decode_chunk_equals_decode_step_by_step():
  """The device functions themselves: one while_loop of C steps == C calls of decode_step."""
  config, params = tiny_model()
  prompt_BP, mask_BP = decode.left_pad([[3, 4, 5], [7, 8]])
  statics = dict(config=config, sampling=SamplingConfig(temperature=1.0, top_k=0, top_p=1.0), eos_id=None)
  P = prompt_BP.shape[1]

  def start():
    return decode.prefill(params, prompt_BP, mask_BP, jax.random.key(2), cache_len=P + 8, **statics)

  state, first_B = start()
  steps = []
  for _ in range(6):
    state, token_B = decode.decode_step(params, state, **statics)
    steps.append(np.asarray(token_B))
  state, first_again_B = start()
  np.testing.assert_array_equal(np.asarray(first_again_B), np.asarray(first_B))
  state, tokens_BC, count = decode.decode_chunk(params, state, np.int32(6), chunk=8, **statics)
  assert int(count) == 6
  np.testing.assert_array_equal(np.asarray(tokens_BC)[:, :6], np.stack(steps, axis=1))
  np.testing.assert_array_equal(np.asarray(tokens_BC)[:, 6:], 0)  # columns after count: the filler


def test_seeds_and_temperature_zero():
  config, params = tiny_model()
  prompt = [[11, 12, 13]]
  cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
  run = functools.partial(decode.generate, params, config, prompt, max_new_tokens=16)
  assert run(sampling=cfg, seed=0) == run(sampling=cfg, seed=0)
  assert run(sampling=cfg, seed=0) != run(sampling=cfg, seed=1)
  assert run(sampling=GREEDY, seed=0) == run(sampling=GREEDY, seed=1)


def test_eos_ends_a_row_and_is_not_returned():
  config, params = tiny_model()
  prompts = [[3, 4, 5], [40, 41]]
  free = decode.generate(params, config, prompts, max_new_tokens=20, sampling=GREEDY)
  eos = free[0][6]
  assert eos not in free[0][:6]
  stopped = decode.generate(params, config, prompts, max_new_tokens=20, sampling=GREEDY, eos_id=eos)
  assert stopped[0] == free[0][:6]
  cut = free[1].index(eos) if eos in free[1] else len(free[1])
  assert stopped[1] == free[1][:cut]  # the other row goes on until its own EOS or the limit


def test_on_tokens_streams_and_can_stop():
  config, params = tiny_model()
  seen = []

  def on_tokens(new):
    seen.append(new[0])
    return len(seen) == 5

  out = decode.generate(params, config, [[1, 2, 3]], max_new_tokens=30, sampling=GREEDY, on_tokens=on_tokens)
  assert [len(s) for s in seen] == [1] * 5
  assert out[0] == [t for s in seen for t in s]


def test_stats_count_the_prompt_and_the_new_tokens():
  config, params = tiny_model()
  stats = decode.GenerationStats()
  out = decode.generate(params, config, [[1, 2, 3], [4, 5]], max_new_tokens=7, sampling=GREEDY, stats=stats)
  assert stats.prompt_tokens == 5
  assert stats.new_tokens == sum(len(o) for o in out) == 14
  assert stats.decode_tokens == 12  # the first token of each row comes with the prefill
  assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.decode_tokens_per_s > 0


def test_left_pad_aligns_the_last_tokens_in_a_bucket():
  prompt_BP, mask_BP = decode.left_pad([[1, 2, 3], [4]], bucket=4)
  np.testing.assert_array_equal(prompt_BP, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(mask_BP, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert decode.left_pad([list(range(1, 6))], bucket=4)[0].shape == (1, 8)
  assert decode.left_pad([[1]])[0].shape == (1, 64)  # the default bucket
  with pytest.raises(ValueError, match='at least one token'):
    decode.left_pad([[1], []])


def test_context_window_is_enforced():
  config, params = tiny_model()
  with pytest.raises(ValueError, match='max_seq_len=256'):
    decode.generate(params, config, [[1] * 200], max_new_tokens=100)
  with pytest.raises(ValueError, match='at least one token'):
    decode.generate(params, config, [[]], max_new_tokens=4)
  with pytest.raises(ValueError, match='max_new_tokens=0 must be >= 1'):
    decode.generate(params, config, [[1]], max_new_tokens=0)


def test_chunk_size_must_be_positive():
  config, params = tiny_model()
  with pytest.raises(ValueError, match='chunk_size=0 must be >= 1'):
    decode.generate(params, config, [[1, 2]], max_new_tokens=4, chunk_size=0)


@pytest.mark.parametrize('num_kv_heads', [None, 2])
def test_decode_updates_the_kv_cache_in_place(num_kv_heads):
  """No copy of a cache-sized buffer in the compiled step and loop, at batch 1 (the CPU decode case).

  The cache's layouts ([J, H, S] keys, [J, S, H] values: model._update_cache) are the ones the attention
  dots read; stored [B, S, K, H], every layer's keys and values were copied into them at each step.
  """
  config, params = tiny_model(num_kv_heads=num_kv_heads)
  prompt_BP, mask_BP = decode.left_pad([[3, 4, 5]])
  statics = dict(config=config, sampling=SamplingConfig(), eos_id=None)
  state, _ = decode.prefill(params, prompt_BP, mask_BP, jax.random.key(0), cache_len=96, **statics)
  cache_sizes = {x.size for x in jax.tree.leaves(state.cache) if x.ndim >= 3}  # keys and values
  assert cache_sizes
  for lowered in (decode.decode_step.lower(params, state, **statics),
                  decode.decode_chunk.lower(params, state, jax.numpy.int32(8), chunk=8, **statics)):
    copied = [re.search(r'= \w+\[([\d,]*)\]', line) for line in lowered.compile().as_text().splitlines()
              if ' copy(' in line]
    sizes = [math.prod(int(d) for d in m.group(1).split(',') if d) for m in copied if m]
    assert not cache_sizes & set(sizes), sorted(sizes)
