"""Sampling filters against numpy references, KV-cache decoding against full recomputation, batching,
seeds, EOS and the streaming detokenizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vesper_jax import sampling
from vesper_jax.model import ModelConfig, VesperLM, init_params

NEW_TOKENS = 64


def _tiny(**overrides) -> ModelConfig:
  return ModelConfig(**load_config('tiny').model).replace(**overrides)


@functools.lru_cache(maxsize=None)
def _model(**overrides) -> tuple[ModelConfig, dict]:
  config = _tiny(**overrides)
  return config, init_params(config, jax.random.key(1))


# ------------------------------------------------------------------------------ numpy references

def _np_top_k(logits: np.ndarray, k: int) -> np.ndarray:
  out = logits.astype(np.float64).copy()
  for row in out:
    kth = np.sort(row)[::-1][k - 1]
    row[row < kth] = -np.inf
  return out


def _np_top_p(logits: np.ndarray, p: float) -> np.ndarray:
  """Walk the tokens from most to least likely until the mass reaches p; keep all as likely as the last."""
  out = logits.astype(np.float64).copy()
  for row in out:
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    mass, threshold = 0.0, None
    for prob in sorted(probs, reverse=True):
      threshold = prob
      mass += prob
      if mass >= p:
        break
    row[probs < threshold] = -np.inf  # tied tokens have bit-identical probabilities
  return out


def _np_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
  out = logits.astype(np.float64).copy()
  for b, v in zip(*np.nonzero(seen)):
    out[b, v] = out[b, v] / penalty if out[b, v] > 0 else out[b, v] * penalty
  return out


def _random_logits(seed: int, shape=(6, 300), ties: bool = False) -> np.ndarray:
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2.0, shape).astype(np.float32)
  if ties:
    # Round to a coarse grid so many tokens share a logit, the top ones included.
    logits = np.round(logits * 2) / 2
  return logits


def _kept(logits) -> np.ndarray:
  return np.isfinite(np.asarray(logits))


METHODS = ['sort', 'search']


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('k', [1, 5, 50, 299, 300, 0])
def test_top_k_matches_numpy(k, ties, method):
  logits = _random_logits(k, ties=ties)
  got = sampling.top_k_filter(jnp.asarray(logits), k, method)
  want = logits if k == 0 else _np_top_k(logits, k)
  np.testing.assert_array_equal(_kept(got), _kept(want))
  np.testing.assert_array_equal(np.asarray(got)[_kept(got)], logits[_kept(want)])
  if ties and 0 < k < 300:
    assert (_kept(got).sum(axis=1) >= k).all()  # ties with the k-th are kept: at least k survive


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('p', [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_numpy(p, ties, method):
  logits = _random_logits(int(p * 1000), ties=ties)
  got = sampling.top_p_filter(jnp.asarray(logits), p, method)
  want = _np_top_p(logits, p)
  np.testing.assert_array_equal(_kept(got), _kept(want))
  np.testing.assert_array_equal(np.asarray(got)[_kept(got)], logits[_kept(want)])
  if p == 1.0:
    assert _kept(got).all()


@pytest.mark.parametrize('method', METHODS)
def test_top_p_keeps_tied_tokens_together(method):
  # Four tokens of 0.2 each and two of 0.1: p = 0.3 is reached inside the tie, so all four stay.
  logits = np.log(np.array([[0.2, 0.1, 0.2, 0.2, 0.1, 0.2]], np.float32))
  np.testing.assert_array_equal(_kept(sampling.top_p_filter(jnp.asarray(logits), 0.3, method)),
                                [[True, False, True, True, False, True]])
  # The top token alone suffices when it holds p.
  np.testing.assert_array_equal(
      _kept(sampling.top_p_filter(jnp.asarray(logits[:, [0, 1]] * 3), 0.1, method)), [[True, False]])


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('k, p', [(5, 0.5), (50, 0.9), (50, 0.99), (3, 0.9999)])
def test_fused_top_k_top_p_matches_numpy(k, p, ties):
  logits = _random_logits(k, ties=ties)
  got = sampling._top_k_top_p_sorted(jnp.asarray(logits), k, p)
  want = _np_top_p(_np_top_k(logits, k), p)
  np.testing.assert_array_equal(_kept(got), _kept(want))


def test_ordered_bits_preserve_float_order():
  x = np.array([[-np.inf, -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.0, 3e38, np.inf]], np.float32)
  keys = np.asarray(sampling._ordered_bits(jnp.asarray(x)))[0].astype(np.int64)
  assert (np.diff(keys) > 0).all()


@pytest.mark.parametrize('penalty', [1.0, 1.3, 0.7])
def test_repetition_penalty_matches_numpy(penalty):
  logits = _random_logits(7)
  seen = np.random.default_rng(8).random(logits.shape) < 0.3
  got = sampling.repetition_penalty_filter(jnp.asarray(logits), jnp.asarray(seen), penalty)
  np.testing.assert_allclose(np.asarray(got), _np_repetition_penalty(logits, seen, penalty), rtol=1e-6)
  if penalty > 1:
    assert (np.asarray(got) <= logits + 1e-7).all()  # a penalty never makes a seen token more likely


@pytest.mark.parametrize('method', METHODS)
def test_sample_logits_draws_from_the_filtered_distribution(method):
  """The filters compose in order (penalty, temperature, top-k, top-p): empirical frequencies match."""
  logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 1.9]], np.float32)
  seen = np.array([[False, False, False, False, False, False, True]])
  cfg = sampling.SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.5)
  want = _np_repetition_penalty(logits, seen, 1.5) / 0.7
  want = _np_top_p(_np_top_k(want, 5), 0.9)[0]
  want = np.exp(want - want.max())
  want /= want.sum()
  n = 20000
  draw = jax.jit(jax.vmap(lambda key: sampling.sample_logits(key, jnp.asarray(logits), jnp.asarray(seen),
                                                             cfg, method)[0]))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
  freq = np.bincount(tokens, minlength=logits.shape[1]) / n
  np.testing.assert_allclose(freq, want, atol=0.015)
  assert freq[want == 0].sum() == 0  # filtered tokens are never drawn


def test_sampling_config_rejects_bad_values():
  with pytest.raises(ValueError, match='top_p'):
    sampling.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match='temperature'):
    sampling.SamplingConfig(temperature=-1.0)


# ------------------------------------------------------------------------------ decoding

def _naive_greedy(config: ModelConfig, params, prompt: list[int], n: int) -> list[int]:
  """Greedy decoding without a cache: every token recomputes the whole sequence from scratch."""
  model = VesperLM(config)
  length = len(prompt) + n
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(prompt)] = prompt
  for t in range(len(prompt), length):
    # Causal: the zeros after position t cannot change the logits at t - 1.
    buf[0, t] = int(np.argmax(np.asarray(forward(params, buf))[0, t - 1]))
  return buf[0, len(prompt):].tolist()


@pytest.mark.parametrize('chunk_size', [1, 16])
@pytest.mark.parametrize('num_kv_heads', [None, 2])
def test_kv_cache_greedy_equals_full_recompute(num_kv_heads, chunk_size):
  config, params = _model(num_kv_heads=num_kv_heads)
  prompt = [5, 17, 300, 42, 7, 7, 1000]
  got = sampling.generate(params, config, [prompt], max_new_tokens=NEW_TOKENS, sampling=sampling.GREEDY,
                          chunk_size=chunk_size)[0]
  assert got == _naive_greedy(config, params, prompt, NEW_TOKENS)
  assert len(set(got)) > 5  # a random model still produces varied tokens: the comparison means something


def test_batched_prompts_of_different_lengths_equal_one_by_one():
  config, params = _model()
  # 70 tokens crosses the 64-token padding bucket: the batch is padded differently from each alone.
  prompts = [[3, 4, 5], list(range(100, 170)), [9, 8, 7, 6, 5, 4, 3, 2, 1]]
  batched = sampling.generate(params, config, prompts, max_new_tokens=24, sampling=sampling.GREEDY)
  alone = [sampling.generate(params, config, [p], max_new_tokens=24, sampling=sampling.GREEDY)[0]
           for p in prompts]
  assert batched == alone
  assert len({tuple(b) for b in batched}) == 3


def test_batched_chunked_equals_stepwise():
  config, params = _model()
  prompts = [[3, 4, 5], list(range(100, 130))]
  cfg = sampling.SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2)
  step = sampling.generate(params, config, prompts, max_new_tokens=20, sampling=cfg, seed=3)
  chunk = sampling.generate(params, config, prompts, max_new_tokens=20, sampling=cfg, seed=3, chunk_size=8)
  assert step == chunk


def test_seeds_and_temperature_zero():
  config, params = _model()
  prompt = [[11, 12, 13]]
  cfg = sampling.SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
  run = functools.partial(sampling.generate, params, config, prompt, max_new_tokens=16)
  assert run(sampling=cfg, seed=0) == run(sampling=cfg, seed=0)
  assert run(sampling=cfg, seed=0) != run(sampling=cfg, seed=1)
  assert run(sampling=sampling.GREEDY, seed=0) == run(sampling=sampling.GREEDY, seed=1)


def test_eos_ends_a_row_and_is_not_returned():
  config, params = _model()
  prompts = [[3, 4, 5], [40, 41]]
  free = sampling.generate(params, config, prompts, max_new_tokens=20, sampling=sampling.GREEDY)
  eos = free[0][6]
  assert eos not in free[0][:6]
  stopped = sampling.generate(params, config, prompts, max_new_tokens=20, sampling=sampling.GREEDY,
                              eos_id=eos)
  assert stopped[0] == free[0][:6]
  cut = free[1].index(eos) if eos in free[1] else len(free[1])
  assert stopped[1] == free[1][:cut]  # the other row goes on until its own EOS or the limit


def test_on_tokens_streams_and_can_stop():
  config, params = _model()
  seen = []

  def on_tokens(new):
    seen.append(new[0])
    return len(seen) == 5

  out = sampling.generate(params, config, [[1, 2, 3]], max_new_tokens=30, sampling=sampling.GREEDY,
                          on_tokens=on_tokens)
  assert [len(s) for s in seen] == [1] * 5
  assert out[0] == [t for s in seen for t in s]


def test_context_window_is_enforced():
  config, params = _model()
  with pytest.raises(ValueError, match='max_seq_len=256'):
    sampling.generate(params, config, [[1] * 200], max_new_tokens=100)
  with pytest.raises(ValueError, match='at least one token'):
    sampling.generate(params, config, [[]], max_new_tokens=4)


def test_chunk_size_must_be_positive():
  config, params = _model()
  with pytest.raises(ValueError, match='chunk_size=0 must be >= 1'):
    sampling.generate(params, config, [[1, 2]], max_new_tokens=4, chunk_size=0)


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
  stream = sampling.TextStream(bpe)
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
  stream = sampling.TextStream(_CharTokenizer(), stop_strings=['\nUser:'])
  out = [stream.push(_CharTokenizer().encode(s)) for s in ['Hello', '\nUs', 'e', 'r:', ' more']]
  assert out == ['Hello', '', '', '', '']
  assert stream.stopped and stream.text == 'Hello' and stream.finish() == ''
  # A false start is released once it cannot be a stop string any more.
  stream = sampling.TextStream(_CharTokenizer(), stop_strings=['\nUser:'])
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
  stream = sampling.TextStream(tok, context=prompt)
  pieces = [stream.push([i]) for i in new] + [stream.finish()]
  assert tok.decode(prompt) + ''.join(pieces) == tok.decode(prompt + new) == 'Il était un petit garçon'
  assert stream.text == ' un petit garçon'


def test_generate_text_stops_at_a_stop_string(bpe):
  config, params = _model(vocab_size=bpe.vocab_size)
  free = sampling.generate_text(params, config, bpe, ['The quick'], max_new_tokens=40,
                                sampling=sampling.GREEDY)[0]
  stop = free[10:14]
  assert free.find(stop) == 10
  pieces = []
  got = sampling.generate_text(params, config, bpe, ['The quick'], max_new_tokens=40,
                               sampling=sampling.GREEDY, stop_strings=[stop],
                               on_text=lambda row, piece: pieces.append(piece))[0]
  assert got == free[:10] == ''.join(pieces)


def test_cast_for_inference_bfloat16_runs():
  config, params = _model()
  config16, params16 = sampling.cast_for_inference(config, params, 'bfloat16')
  assert config16.dtype == 'bfloat16'
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
  out = sampling.generate(params16, config16, [[1, 2, 3]], max_new_tokens=8, sampling=sampling.GREEDY)
  assert len(out[0]) == 8
