"""Rebuilds the test fixtures in this folder from the original corpora (README.md here names them).

    python tests/data/make_fixtures.py --source_dir=/path/to/the/originals

--source_dir holds the four originals under these names: tinyshakespeare.txt, tinystories_2MB.txt (the
first 2,096,346 bytes of TinyStories-train.txt, cut after a story), les_miserables_fr.txt, piaf-v1.1.json.
Each excerpt is a prefix (or a slice of whole articles) so that it is a faithful sample of its file's
layout; the French tokenizer is then trained on the two French excerpts written here. Deterministic:
the same originals and `tokenizers` version give the same bytes. The tests hold golden values of these
files (counts, a sha256): rebuilding them is a change to review, not a routine step.
"""

import json
import pathlib

from absl import app, flags
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = pathlib.Path(__file__).resolve().parent

_SOURCE_DIR = flags.DEFINE_string('source_dir', None, 'Folder holding the original corpora.', required=True)

SHAKESPEARE_CHARS = 50_000      # then back to the end of the last complete speech
STORIES = 120                   # the first stories, each followed by its separator
MISERABLES_CHARS = 80_000       # then back to the end of the last complete paragraph
PIAF_ARTICLES = slice(168, 176)  # eight whole articles, among them $.data[173] (tests/test_data.py)
FRENCH_VOCAB = 1000             # the French tokenizer's size, specials included
STORY_END = '\n<|endoftext|>\n'


def _head(text: str, chars: int, boundary: str) -> str:
  """text[:chars], shortened to end just after the last `boundary` in it."""
  return text[:text.rindex(boundary, 0, chars) + len(boundary)]


def french_tokenizer(texts: list[str]) -> Tokenizer:
  """A SentencePiece-style BPE laid out as BARThez's tokenizer.json: NFKC, whitespace split, '▁' word
  prefix, <s> <pad> </s> <unk> at ids 0-3, <mask> last, and a `<s> $A </s>` post-processor."""
  tokenizer = Tokenizer(models.BPE(unk_token='<unk>', fuse_unk=True))
  tokenizer.normalizer = normalizers.NFKC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace()])
  tokenizer.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=FRENCH_VOCAB - 1, special_tokens=['<s>', '<pad>', '</s>', '<unk>'],
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  tokenizer.add_special_tokens(['<mask>'])
  tokenizer.post_processor = processors.TemplateProcessing(
      single='<s> $A </s>', pair='<s> $A </s> </s> $B </s>', special_tokens=[('<s>', 0), ('</s>', 2)])
  return tokenizer


def main(argv):
  del argv
  source = pathlib.Path(_SOURCE_DIR.value)
  read = lambda name: (source / name).read_text(encoding='utf-8')  # noqa: E731

  shakespeare = _head(read('tinyshakespeare.txt'), SHAKESPEARE_CHARS, '\n\n')
  stories = ''.join(story + STORY_END for story in read('tinystories_2MB.txt').split(STORY_END)[:STORIES])
  miserables = _head(read('les_miserables_fr.txt'), MISERABLES_CHARS, '\n\n')
  piaf = json.loads(read('piaf-v1.1.json'))
  piaf = {'data': piaf['data'][PIAF_ARTICLES], 'version': piaf['version']}

  (HERE / 'tinyshakespeare_head.txt').write_text(shakespeare, encoding='utf-8')
  (HERE / 'tinystories_head.txt').write_text(stories, encoding='utf-8')
  (HERE / 'les_miserables_fr_head.txt').write_text(miserables, encoding='utf-8')
  (HERE / 'piaf_excerpt.json').write_text(json.dumps(piaf), encoding='ascii')  # as the original: \u escapes
  contexts = [p['context'] for article in piaf['data'] for p in article['paragraphs']]
  french_tokenizer(miserables.split('\n\n') + contexts).save(str(HERE / 'tokenizer_fr.json'))
  for path in sorted(HERE.iterdir()):
    print(f'{path.stat().st_size:>9,}  {path.name}')


if __name__ == '__main__':
  app.run(main)
