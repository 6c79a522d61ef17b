"""PENDING (merge into the module test files): issue 11's data, tokenizer, sampling, chat and metrics edges."""

import io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, models, pre_tokenizers, processors, trainers

from vesper_jax import chat, metrics_writer, sampling, sources
from vesper_jax import config as config_lib
from vesper_jax.tokenizer import Tokenizer, train_bpe


# ------------------------------------------------------------------ tokenizer (test_tokenizer.py)

def _bpe_with_specials(path, specials, post_processor=None):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(['hello world, hello tokenizer'] * 20, trainer)
  if post_processor is not None:
    tok.post_processor = post_processor
  tok.save(str(path))
  return path


def test_eos_is_the_tokenizers_own_special_token(tmp_path):
  # A byte-level BPE whose end token is <EOT>, id 0, marked special: no built-in name matches it.
  path = _bpe_with_specials(tmp_path / 'eot.json', ['<EOT>'])
  assert Tokenizer.load(path).eos_id == 0
  # Several specials: the one the post-processor appends to a sequence ends a text.
  template = processors.TemplateProcessing(single='<S> $A <E>', special_tokens=[('<S>', 1), ('<E>', 2)])
  path = _bpe_with_specials(tmp_path / 'tpl.json', ['<PAD>', '<S>', '<E>'], template)
  assert Tokenizer.load(path).eos_id == 2


def test_eos_named_by_config_or_refused_listing_the_specials(tmp_path):
  path = _bpe_with_specials(tmp_path / 'two.json', ['<A>', '<B>'])
  with pytest.raises(ValueError, match=r"special tokens \['<A>', '<B>'\].*data.eos_token"):
    Tokenizer.load(path)
  assert Tokenizer.load(path, eos_token='<B>').eos_id == 1
  with pytest.raises(ValueError, match="data.eos_token='<C>' is not in the tokenizer"):
    Tokenizer.load(path, eos_token='<C>')


def test_unreadable_tokenizer_is_one_error_naming_it(tmp_path, monkeypatch):
  path = _bpe_with_specials(tmp_path / 't.json', ['<|endoftext|>'])
  real = type(path).read_text

  def failing(self, *args, **kwargs):
    if self == path:
      raise PermissionError(13, 'Permission denied')
    return real(self, *args, **kwargs)

  monkeypatch.setattr(type(path), 'read_text', failing)
  with pytest.raises(ValueError, match=f'{path}: cannot read the tokenizer file .*Permission denied'):
    Tokenizer.load(path)


def test_bpe_on_two_megabytes_without_whitespace_trains_in_seconds(tmp_path):
  rng = np.random.default_rng(0)
  blob = ''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), size=2_000_000))
  start = time.perf_counter()
  tok = train_bpe([blob], 512, tmp_path / 'bpe.json')
  elapsed = time.perf_counter() - start
  # Unbounded pre-tokens make this quadratic (about 10 minutes here); cut, it takes a few seconds.
  assert elapsed < 60, elapsed
  assert tok.decode(tok.encode(blob[:1000])) == blob[:1000]


# ------------------------------------------------------------------ sources (test_data.py)

def _errors(policy='skip'):
  return sources.ErrorLog(policy, quiet=True)


def _read(path, policy='skip'):
  errors = _errors(policy)
  options = sources.ReadOptions.from_config(config_lib.get_config().data)
  kind = sources._kind(path)  # the reader under test is chosen by suffix, as resolve_sources does
  return list(sources.read_documents(sources.Source(kind, str(path)), options, errors)), errors


def test_squad_question_without_answers_is_a_bad_record(tmp_path):
  path = tmp_path / 'q.json'
  path.write_text(json.dumps({'data': [{'paragraphs': [{'context': 'Paris est en France.', 'qas': [
      {'question': 'Où est Paris ?', 'answers': [{'text': 'en France'}]},
      {'question': 'Sans réponse ?'},
      {'question': 'Impossible ?', 'answers': [], 'is_impossible': True}]}]}]}))
  docs, errors = _read(path)
  assert len(docs) == 1 and 'Où est Paris' in docs[0] and 'Sans réponse' not in docs[0]
  assert errors.skipped == [f'{path}: $.data[0].paragraphs[0].qas[1] has no answer (and is not marked '
                            '"is_impossible")']
  with pytest.raises(sources.DataError, match=r'qas\[1\]'):
    _read(path, policy='fail')


def test_recursive_glob_through_a_symlinked_directory_reads_each_file_once(tmp_path):
  (tmp_path / 'real').mkdir()
  (tmp_path / 'real' / 'a.txt').write_text('one document')
  os.symlink(tmp_path / 'real', tmp_path / 'real' / 'loop')  # a symlink back into itself
  os.symlink(tmp_path / 'real', tmp_path / 'alias')
  found = sources.resolve_sources(f'{tmp_path}/**/*.txt', _errors(), cache_dir=tmp_path, download_base_url='')
  assert len(found) == 1 and os.path.realpath(found[0].path) == str(tmp_path / 'real' / 'a.txt')


@pytest.mark.parametrize('name,content', [('bin.txt', b'\xff\xfe\x00garbage\xff'), ('list.json', b'[1, 2]')])
def test_a_bad_file_counts_one_skip(name, content, tmp_path):
  path = tmp_path / name
  path.write_bytes(content)
  _, errors = _read(path)
  assert len(errors.skipped) == 1, errors.skipped


# ------------------------------------------------------------------ sampling (test_sampling.py)

def test_search_and_sort_keep_the_same_tokens_with_signed_zeros():
  logits = jnp.array([[-0.0, 0.0, -1.0, -2.0], [0.0, -0.0, -3.0, 5.0]])
  for k in (1, 2):
    search = jax.jit(lambda x: sampling.top_k_filter(x, k, 'search'))(logits)
    sort = sampling.top_k_filter(logits, k, 'sort')
    np.testing.assert_array_equal(np.isfinite(search), np.isfinite(sort))


@pytest.mark.parametrize('field', ['temperature', 'top_p', 'repetition_penalty'])
def test_non_finite_sampling_settings_are_refused(field):
  with pytest.raises(ValueError, match=f'{field}=nan must be a finite number'):
    sampling.SamplingConfig(**{field: float('nan')})


# ------------------------------------------------------------------ chat (test_chat.py)

class _Session:
  """Stands in for ChatSession in run_repl: a two-line reply, and the seed each reply would use."""

  def __init__(self):
    self.seeds, self.history = [], []

  def reset(self):
    self.history = []

  def reply(self, message, on_text=None):
    on_text('first line\nsecond line')
    return 'first line\nsecond line'


def test_piped_multiline_reply_stays_one_turn():
  out = io.StringIO()
  chat.run_repl(_Session(), io.StringIO('hello\n/exit\n'), out)
  lines = out.getvalue().splitlines()
  assert lines == ['Assistant: first line', f'{chat.CONTINUATION}second line']


def test_reset_does_not_repeat_the_sampling_seed(monkeypatch):
  seeds = []

  def fake_generate_text(params, config, tokenizer, prompts, **kwargs):
    seeds.append(kwargs['seed'])
    return ['reply']

  monkeypatch.setattr(chat.generate, 'generate_text', fake_generate_text)

  class Tok:
    eos_id = 0

    def encode(self, text):
      return [1] * len(text.split())

  from vesper_jax.model import ModelConfig
  session = chat.ChatSession(None, ModelConfig(max_seq_len=256), Tok(), max_new_tokens=8,
                             settings=sampling.SamplingConfig(), seed=10)
  session.reply('hi')
  session.reset()
  session.reply('hi')
  assert seeds == [10, 11]


# ------------------------------------------------------------------ metrics_writer (test_metrics_writer.py)

def test_resume_drops_rows_logged_past_the_restored_step(tmp_path):
  writer = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
  for step in range(0, 9):
    writer.write(step, {'loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 9, "loss"')  # a torn last line of a killed run
  writer = metrics_writer.MetricsWriter(tmp_path, tensorboard=False, resume_step=5)
  writer.write(6, {'loss': 60.0})
  writer.close()
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [0, 1, 2, 3, 4, 5, 6]
