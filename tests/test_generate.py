"""The generate and chat entry points, end to end on a tiny workdir: streaming, piped chat, history."""

import os
import pathlib
import selectors
import subprocess
import sys
import time

import jax
import pytest

from conftest import REPO, load_config
from vesper_jax import chat, checkpoint, sampling
from vesper_jax.model import ModelConfig, init_params

CORPUS = ('The quick brown fox jumps over the lazy dog. User: hello there\nAssistant: hi, how are you?\n'
          'A small language model reads the text one token at a time. ') * 30


def make_workdir(workdir: pathlib.Path, **model_overrides) -> pathlib.Path:
  """A workdir as training leaves it (config.json, tokenizer.json, an orbax checkpoint), untrained."""
  from vesper_jax.tokenizer import train_bpe
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = train_bpe([CORPUS], 400, workdir / 'bpe.json')
  config = load_config('tiny')
  config.model.vocab_size = tokenizer.vocab_size
  config.model.update(model_overrides)
  checkpoint.write_workdir_metadata(workdir, config, workdir / 'bpe.json')
  params = init_params(ModelConfig(**config.model), jax.random.key(0))
  checkpointer = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  checkpointer.save(0, {'params': params})
  checkpointer.close()
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
  return make_workdir(tmp_path_factory.mktemp('run'))


def _cli(module: str, *args: str, **popen) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, '-m', f'vesper_jax.{module}', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_generate_streams_tokens_as_they_are_produced(workdir):
  """Reads stdout while the process runs: the continuation must arrive in many separate pieces."""
  prompt = 'The quick'
  proc = _cli('generate', f'--workdir={workdir}', f'--prompt={prompt}', '--max_new_tokens=150',
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
  config, params, tokenizer = checkpoint.load_for_inference(workdir)
  want = sampling.generate_text(params, config, tokenizer, [prompt], max_new_tokens=150,
                                sampling=sampling.SamplingConfig(temperature=0.0))[0]
  assert out == prompt + want + '\n'


def test_generate_batch_of_prompts(workdir):
  proc = _cli('generate', f'--workdir={workdir}', '--prompt=The quick', '--prompt=A small language',
              '--max_new_tokens=10', '--seed=3')
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-2000:]
  assert out.decode().count('--- [') == 2
  assert '--- [1]\nA small language' in out.decode()


def test_chat_with_piped_stdin_two_turns_then_exit(workdir):
  proc = _cli('chat', f'--workdir={workdir}', '--max_new_tokens=16', '--temperature=0.8',
              stdin=subprocess.PIPE)
  out, err = proc.communicate(b'Hello\nHow are you?\n/exit\nnever read\n', timeout=120)
  assert proc.returncode == 0, err.decode()[-2000:]
  replies = out.decode().split(chat.ASSISTANT_PREFIX + ' ')
  assert replies[0] == '' and len(replies) == 3, out
  assert all(r.endswith('\n') for r in replies[1:])


def test_chat_reset_and_end_of_input(workdir, tmp_path):
  proc = _cli('chat', f'--workdir={workdir}', '--max_new_tokens=4', stdin=subprocess.PIPE)
  out, err = proc.communicate(b'Hi\n/reset\n/nonsense\nHi again\n', timeout=120)  # ends without /exit
  assert proc.returncode == 0, err.decode()[-2000:]
  text = out.decode()
  assert text.count(chat.ASSISTANT_PREFIX + ' ') == 2
  assert '[conversation cleared]' in text and '[unknown command /nonsense' in text


class _Chars:
  """A stand-in tokenizer with one id per character, so prompt lengths are easy to reason about."""
  eos_id = 0

  def encode(self, text):
    return [ord(c) % 250 + 1 for c in text]

  def decode(self, ids):
    return ''.join(chr(96 + i % 26) for i in ids)


def test_chat_history_is_truncated_to_the_context_window():
  config = ModelConfig(vocab_size=256, max_seq_len=256)
  session = chat.ChatSession(None, config, _Chars(), max_new_tokens=48, settings=sampling.GREEDY)
  budget = 256 - 48
  # Each past turn is 46 characters and the new message's part 35: three turns fit in 208, four do not.
  session.history = [(f'message {i} ' + 'x' * 10, f'reply {i}') for i in range(10)]
  prompt = chat.format_prompt(session.history[-3:], 'the newest message')
  assert len(prompt) <= budget < len(chat.format_prompt(session.history[-4:], 'the newest message'))
  assert session.prompt_ids('the newest message') == _Chars().encode(prompt)
  # A message longer than the window keeps its end (the part next to the reply).
  long = 'y' * 500
  assert session.prompt_ids(long) == _Chars().encode(chat.format_prompt([], long))[-budget:]
  assert chat.format_prompt([('a', 'b')], 'c') == 'User: a\nAssistant: b\nUser: c\nAssistant:'
  session.reset()
  assert session.history == []
