"""Chat with a trained model in the terminal; replies are streamed (SPEC §10).

  python -m vesper_jax.chat --workdir=runs/tiny
  printf 'Hello\\nHow are you?\\n/exit\\n' | python -m vesper_jax.chat --workdir=runs/tiny

The model sees the conversation as plain text in this template, one line per turn, and continues
after the last `Assistant:`:

  User: <first message>
  Assistant: <first reply>
  User: <new message>
  Assistant:

A reply ends at EOS, at the start of a new `User:`/`Assistant:` line, or after --max_new_tokens.
When the conversation no longer fits the context window (model.max_seq_len minus the reply's budget),
the oldest turns are left out of the prompt (they stay in the history until /reset). Commands: /reset
forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C interrupts a reply, or quits at the prompt.
Piped stdin works: each line is a message; only the replies (`Assistant: ...` lines) go to stdout, a
reply's further lines indented by two spaces so that each turn stays one record.
"""

import sys
from collections.abc import Callable
from typing import TextIO

from absl import flags, logging

from vesper_jax import cli, generate, sources
from vesper_jax.model import ModelConfig
from vesper_jax.pytree import PyTree
from vesper_jax.sampling import SamplingConfig

FLAGS = flags.FLAGS

# The template chat records are trained on (sources.render_chat), so prompts read like the training data.
USER_PREFIX = f"{sources.CHAT_ROLE_NAMES['user']}: "
ASSISTANT_PREFIX = f"{sources.CHAT_ROLE_NAMES['assistant']}:"
CONTINUATION = '  '  # piped output: the prefix of a reply's second and later lines
STOP_STRINGS = (f'\n{USER_PREFIX.rstrip()}', f'\n{ASSISTANT_PREFIX}')


def format_prompt(history: list[tuple[str, str]], message: str) -> str:
  """The template's text for the given past turns and a new message, ending in 'Assistant:'."""
  messages = [{'role': role, 'content': text} for user, reply in history
              for role, text in (('user', user), ('assistant', reply))]
  return f"{sources.render_chat(messages + [{'role': 'user', 'content': message}])}\n{ASSISTANT_PREFIX}"


class ChatSession:
  """A conversation with one model: the history and the sampling settings."""

  def __init__(self, params: PyTree, config: ModelConfig, tokenizer: generate.TextCodec, *,
               max_new_tokens: int, settings: SamplingConfig, seed: int = 0,
               regulator: generate.RegulatorConfig | None = None,
               on_candidate: Callable[[int, generate.Candidate], None] | None = None):
    self._params, self._config, self._tokenizer = params, config, tokenizer
    self.regulator = regulator  # confidence-guided resampling (generate.regulate); None = plain sampling
    self.on_candidate = on_candidate  # with a regulator: called as each candidate is scored (progress)
    self.last_regulated: generate.Regulated | None = None  # the regulator's answer for the last reply
    self.max_new_tokens = min(max_new_tokens, config.max_seq_len // 2)
    self._settings = settings
    self._seed = seed
    self._replies = 0  # replies so far, /reset or not: the n-th reply draws with seed + n
    self.history: list[tuple[str, str]] = []

  def reset(self) -> None:
    self.history = []

  def prompt_ids(self, message: str) -> list[int]:
    """The newest turns that fit the context window with room for a reply, then the message."""
    budget = self._config.max_seq_len - self.max_new_tokens
    for first in range(len(self.history) + 1):
      ids = self._tokenizer.encode(format_prompt(self.history[first:], message))
      if len(ids) <= budget:
        if first:
          logging.info('chat: the oldest %d turn(s) no longer fit the context window', first)
        return ids
    logging.warning('chat: the message alone is %d tokens; keeping its last %d', len(ids), budget)
    return ids[-budget:]

  def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
    """Samples the assistant's reply, streaming it to `on_text`, and adds the turn to the history.

    With a regulator, the candidates are compared first (`self.on_candidate` as each is scored) and the
    chosen reply reaches `on_text` whole; `last_regulated` then holds the regulator's answer (its
    scores and low-confidence spans).
    """
    ids = self.prompt_ids(message)
    if self.regulator is not None:
      return self._regulated_reply(message, ids, on_text)
    started = False

    def on_piece(row: int, piece: str) -> None:
      nonlocal started
      if not started:  # the template puts a space after 'Assistant:'; the model writes it
        piece = piece.lstrip()
        started = bool(piece)
      if piece and on_text is not None:
        on_text(piece)

    text = generate.generate_text(self._params, self._config, self._tokenizer, [ids],
                                  max_new_tokens=self.max_new_tokens, sampling=self._settings,
                                  seed=self._seed + self._replies, stop_strings=STOP_STRINGS,
                                  on_text=on_piece)[0].strip()
    self.history.append((message, text))
    self._replies += 1
    return text

  def _regulated_reply(self, message: str, ids: list[int], on_text: Callable[[str], None] | None) -> str:
    result = generate.regulate(self._params, self._config, self._tokenizer, ids,
                               max_new_tokens=self.max_new_tokens, sampling=self._settings,
                               seed=self._seed + self._replies, stop_strings=STOP_STRINGS,
                               regulator=self.regulator, on_candidate=self.on_candidate)
    self.last_regulated = result
    text = result.text.strip()
    if on_text is not None:
      shown = generate.mark_spans(result.text, result.flagged).strip()
      if shown:
        on_text(shown)
    self.history.append((message, text))
    self._replies += 1
    return text


def run_repl(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
  """Reads messages line by line until /exit or end of input; writes each streamed reply (with a
  regulator: each chosen reply)."""
  interactive = stdin.isatty()

  def write(text: str) -> None:
    stdout.write(text)
    stdout.flush()

  while True:
    try:
      line = input(USER_PREFIX) if interactive and stdin is sys.stdin else stdin.readline()
    except (EOFError, KeyboardInterrupt):
      line = ''
    if not line:  # Ctrl-D, Ctrl-C at the prompt, or the end of piped input
      if interactive:
        write('\n')
      return
    message = line.strip()
    if not message:
      continue
    if message == '/exit':
      return
    if message == '/reset':
      session.reset()
      write('[conversation cleared]\n')
      continue
    if message.startswith('/'):
      write(f'[unknown command {message}: /reset clears the conversation, /exit quits]\n')
      continue
    write(f'{ASSISTANT_PREFIX} ')
    # Piped, each line is a record: a reply's own line breaks become indented continuation lines, so
    # every line that does not start with two spaces begins a new turn.
    on_text = write if interactive else (lambda piece: write(piece.replace('\n', '\n' + CONTINUATION)))
    try:
      session.reply(message, on_text=on_text)
    except KeyboardInterrupt:
      write(' [interrupted]')
    write('\n')


def main(argv):
  del argv
  config, params, tokenizer, settings = generate.load_from_flags()
  regulator = generate.regulator_from_flags()

  def on_candidate(i: int, candidate: generate.Candidate) -> None:
    print(generate.progress_line(i, candidate, regulator), file=sys.stderr, flush=True)

  session = ChatSession(params, config, tokenizer, max_new_tokens=FLAGS.max_new_tokens,
                        settings=settings, seed=FLAGS.seed, regulator=regulator, on_candidate=on_candidate)
  if sys.stdin.isatty():
    print(f'Chatting with {FLAGS.workdir} ({config.max_seq_len}-token context). /reset clears the '
          'conversation, /exit or Ctrl-D quits.', file=sys.stderr)
  run_repl(session, sys.stdin, sys.stdout)


def define_flags() -> None:
  generate.define_common_flags()
  flags.DEFINE_integer('max_new_tokens', 128, 'Longest reply, in tokens (at most half '
                       'the context window).', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Seed of the first reply (the n-th reply uses seed + n).')


if __name__ == '__main__':
  cli.run('vesper_jax.chat', main, define_flags)
