"""Tokenizer: loading Hugging Face tokenizer.json files, special tokens, errors, deterministic BPE training."""

import hashlib
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers

from conftest import FRENCH_TOKENIZER, MISERABLES, TINYSTORIES
from vesper_jax import tokenizer as tokenizer_lib
from vesper_jax.tokenizer import Tokenizer, train_bpe


def _french_lines():
  return [line for line in MISERABLES.read_text(encoding='utf-8').split('\n') if line.strip()]


def test_french_tokenizer_loads_with_its_special_tokens():
  # tests/data/tokenizer_fr.json: a SentencePiece-style BPE laid out as BARThez's tokenizer.json.
  tok = Tokenizer.load(FRENCH_TOKENIZER)
  assert tok.vocab_size == 1000  # 999 trained entries and <mask>, added last as BARThez's is
  assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)  # <s>, <pad>, </s> in its added_tokens
  assert tok.token_to_id('<mask>') == 999
  assert tok.path == str(FRENCH_TOKENIZER)
  expected = hashlib.sha256(FRENCH_TOKENIZER.read_bytes()).hexdigest()
  # The committed file's hash: update it only with the file (tests/data/make_fixtures.py rebuilds it).
  assert tok.sha256() == expected == 'c93f22b29884491e595107832943a427385cc1725b8b1d37c648c9b6dd9b43d0'


def test_french_tokenizer_round_trips_french_lines():
  tok = Tokenizer.load(FRENCH_TOKENIZER)
  normalizer = tokenizers.Tokenizer.from_file(str(FRENCH_TOKENIZER)).normalizer
  unk = tok.token_to_id('<unk>')
  lines = _french_lines()
  encoded = tok.encode_batch(lines)
  known = [(line, ids) for line, ids in zip(lines, encoded) if unk not in ids]
  # A character outside a tokenizer's alphabet becomes <unk>, and such a line cannot round-trip. This one
  # was trained on these lines, so few (if any) hold it; a pretrained tokenizer misses a few ('Ç', 'Ô').
  assert len(known) > 0.95 * len(lines)
  for line, ids in known:
    assert ids == tok.encode(line)  # encode_batch agrees with encode
    # Up to the tokenizer's normalisation: its NFKC-like charsmap, and whitespace split into single spaces.
    assert tok.decode(ids) == ' '.join(normalizer.normalize_str(line).split()), line
  assert 'Myriel' in tok.decode(tok.encode('M. Myriel était évêque de Digne.'))
  assert tok.encode('Jean Valjean')[0] not in (tok.bos_id, tok.eos_id)  # no special tokens added


def test_load_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope/tokenizer.json'):
    Tokenizer.load(tmp_path / 'nope' / 'tokenizer.json')


@pytest.mark.parametrize('content', ['{"this is": not json', '{"version": "1.0", "model": {"type": "Nope"}}', ''])
def test_load_invalid_file_names_it(tmp_path, content):
  path = tmp_path / 'broken.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=f'{path}: not a valid Hugging Face tokenizer.json'):
    Tokenizer.load(path)


def test_tokenizer_without_eos_is_refused(tmp_path):
  vocab = {'a': 0, 'b': 1, '[UNK]': 2}
  raw = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  path = tmp_path / 'no_eos.json'
  raw.save(str(path))
  with pytest.raises(ValueError, match=f'{path}: cannot tell which token ends a text: .*data.eos_token'):
    Tokenizer.load(path)


def test_gpt2_style_eos_and_gapped_vocabulary(tmp_path):
  # Ids with a gap: the model needs max id + 1 rows, not the number of entries.
  raw = tokenizers.Tokenizer(models.WordLevel({'a': 0, 'b': 7, '<unk>': 1}, unk_token='<unk>'))
  raw.add_special_tokens(['<|endoftext|>', '<pad>'])
  path = tmp_path / 'gapped.json'
  raw.save(str(path))
  tok = Tokenizer.load(path)
  assert tok.eos_id == raw.token_to_id('<|endoftext|>')
  assert tok.pad_id == raw.token_to_id('<pad>')
  assert tok.bos_id is None
  assert tok.vocab_size == max(raw.get_vocab(with_added_tokens=True).values()) + 1


def _stories(n=None):
  text = TINYSTORIES.read_text(encoding='utf-8')
  return [s.strip() for s in text.split('<|endoftext|>') if s.strip()][:n]


def test_trained_bpe_is_deterministic_and_exact_size(tmp_path):
  stories = _stories()
  first = tokenizer_lib.train_bpe(iter(stories), 1000, tmp_path / 'a' / 'tokenizer.json')
  second = tokenizer_lib.train_bpe(iter(stories), 1000, tmp_path / 'b' / 'tokenizer.json')
  assert first.sha256() == second.sha256()
  assert (tmp_path / 'a' / 'tokenizer.json').read_bytes() == (tmp_path / 'b' / 'tokenizer.json').read_bytes()
  assert first.vocab_size == 1000
  assert first.eos_id == first.token_to_id('<|endoftext|>') == 0
  assert not list((tmp_path / 'a').glob('*.tmp-*'))  # the temporary file was renamed into place
  other = tokenizer_lib.train_bpe(iter(stories), 1200, tmp_path / 'c' / 'tokenizer.json')
  assert other.sha256() != first.sha256() and other.vocab_size == 1200


def test_trained_bpe_round_trips_bytes_exactly(tmp_path):
  tok = tokenizer_lib.train_bpe(iter(_stories()), 600, tmp_path / 'tokenizer.json')
  for text in ['Once upon a time, Lily  saw\n\ta dog.', 'Les Misérables — « Jean Valjean »', '日本語 🙂', ' x ']:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text  # byte-level: no normalisation, nothing lost
  assert tok.decode([tok.eos_id], skip_special_tokens=False) == '<|endoftext|>'
  reloaded = Tokenizer.load(tmp_path / 'tokenizer.json')
  assert reloaded.encode('Lily and Tom') == tok.encode('Lily and Tom')


def test_bpe_vocabulary_too_small_is_refused(tmp_path):
  with pytest.raises(ValueError, match='model.vocab_size=100 is too small'):
    tokenizer_lib.train_bpe(iter(['hello']), 100, tmp_path / 'tokenizer.json')


def test_saved_bpe_is_valid_json_with_the_special_token(tmp_path):
  tokenizer_lib.train_bpe(iter(_stories(50)), 400, tmp_path / 'tokenizer.json')
  saved = json.loads((tmp_path / 'tokenizer.json').read_text())
  assert saved['added_tokens'][0]['content'] == '<|endoftext|>' and saved['added_tokens'][0]['special']
  # Long runs without whitespace are cut before the byte-level split (a bounded pre-token length).
  assert saved['pre_tokenizer']['type'] == 'Sequence'
  assert [p['type'] for p in saved['pre_tokenizer']['pretokenizers']] == ['Split', 'ByteLevel']
  assert saved['decoder']['type'] == 'ByteLevel'


# ------------------------------------------------------------------------------ special tokens, edge cases

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


def test_text_without_whitespace_is_cut_into_bounded_pre_tokens(tmp_path):
  """BPE training is quadratic in the pre-token length: 2 MB of text without whitespace took about ten
  minutes before long runs were cut. Checked through the cut itself (timed tests drift)."""
  rng = np.random.default_rng(0)
  blob = ''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), size=20_000))
  tok = train_bpe([blob], 512, tmp_path / 'bpe.json')
  pieces = [p for p, _ in tokenizers.Tokenizer.from_file(str(tmp_path / 'bpe.json')).pre_tokenizer
            .pre_tokenize_str(blob)]
  assert ''.join(pieces) == blob  # lowercase ASCII is its own byte-level character
  assert max(len(p) for p in pieces) == tokenizer_lib.MAX_PRETOKEN_CHARS
  assert tok.decode(tok.encode(blob[:1000])) == blob[:1000]
