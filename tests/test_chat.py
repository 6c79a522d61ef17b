"""The chat entry point (chat.py): piped conversations, commands, and the history cut to the context
window."""

import io
import os
import subprocess
import sys

from conftest import REPO
from vesper_jax import chat
from vesper_jax.model import ModelConfig
from vesper_jax.sampling import GREEDY, SamplingConfig


def _chat(workdir, *args: str, stdin: bytes) -> tuple[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', PYTHONUNBUFFERED='1')
  proc = subprocess.run([sys.executable, '-m', 'vesper_jax.chat', f'--workdir={workdir}', *args], cwd=REPO,
                        env=env, input=stdin, capture_output=True, timeout=120)
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  return proc.stdout.decode(), proc.stderr.decode()


def test_chat_with_piped_stdin_two_turns_then_exit(inference_workdir):
  out, _ = _chat(inference_workdir, '--max_new_tokens=16', '--temperature=0.8',
                 stdin=b'Hello\nHow are you?\n/exit\nnever read\n')
  replies = out.split(chat.ASSISTANT_PREFIX + ' ')
  assert replies[0] == '' and len(replies) == 3, out
  assert all(r.endswith('\n') for r in replies[1:])


def test_chat_reset_and_end_of_input(inference_workdir):
  out, _ = _chat(inference_workdir, '--max_new_tokens=4', stdin=b'Hi\n/reset\n/nonsense\nHi again\n')  # no /exit
  assert out.count(chat.ASSISTANT_PREFIX + ' ') == 2
  assert '[conversation cleared]' in out and '[unknown command /nonsense' in out


class _Chars:
  """A stand-in tokenizer with one id per character, so prompt lengths are easy to reason about."""
  eos_id = 0

  def encode(self, text):
    return [ord(c) % 250 + 1 for c in text]

  def decode(self, ids):
    return ''.join(chr(96 + i % 26) for i in ids)


def test_chat_history_is_truncated_to_the_context_window():
  config = ModelConfig(vocab_size=256, max_seq_len=256)
  session = chat.ChatSession(None, config, _Chars(), max_new_tokens=48, settings=GREEDY)
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

  session = chat.ChatSession(None, ModelConfig(max_seq_len=256), Tok(), max_new_tokens=8,
                             settings=SamplingConfig(), seed=10)
  session.reply('hi')
  session.reset()
  session.reply('hi')
  assert seeds == [10, 11]


def test_chat_with_the_regulator_answers_with_the_chosen_candidate(metacog_workdir):
  from vesper_jax import checkpoint, generate
  config, params, tokenizer = checkpoint.load_for_inference(metacog_workdir / 'run')
  regulator = generate.RegulatorConfig(candidates=2, confidence_threshold=1.0, flag_below=0.0)
  pieces, seen = [], []
  session = chat.ChatSession(params, config, tokenizer, max_new_tokens=8, settings=SamplingConfig(),
                             seed=1, regulator=regulator, on_candidate=lambda i, c: seen.append(i))
  text = session.reply('Hello', on_text=pieces.append)
  assert seen == [0, 1] and session.last_regulated is not None
  assert text == session.last_regulated.text.strip() and session.history == [('Hello', text)]
  assert pieces == ([text] if text else [])  # the chosen reply, whole, after the selection
  out, err = _chat(metacog_workdir / 'run', '--max_new_tokens=6', '--regulate', '--candidates=2',
                   stdin=b'Hi\n/exit\n')
  assert out.startswith(chat.ASSISTANT_PREFIX) and '[regulator: candidate 1/2' in err
