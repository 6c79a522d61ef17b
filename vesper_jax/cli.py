"""What every entry point (`python -m vesper_jax.<name>`) shares.

Each entry-point module defines `define_flags()` and `main(argv)` and ends with

    if __name__ == '__main__':
      cli.run('vesper_jax.<name>', main, define_flags)

so flags exist only when the module runs as a program (importing it from a notebook or a test defines
none), and every entry point reports a mistake a person can fix the same way, one line
`vesper_jax.<name>: error: <what and where>` on stderr and never a traceback: exit status 2 for a usage
error (an unknown flag, a value of the wrong type or out of range), 1 for bad input (a config value, a
missing or broken file). `--verbosity=1` shows the traceback.
Library functions never print or exit: they raise, and this wrapper speaks to the person.
"""

import logging as std_logging
import sys
from collections.abc import Callable

from absl import app, flags, logging


# Exceptions that mean "the input is wrong", not "the code is wrong" (DataError is a ValueError).
USER_ERRORS = (ValueError, OSError)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (a line per file per save or restore) and of the HTTP client under
  huggingface_hub (a line per request), keeping their warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not (
        '/orbax/' in record.pathname or record.name.startswith(('httpx', 'httpcore')))


def run(prog: str, main: Callable[[list[str]], None], define_flags: Callable[[], None], *,
        flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """Defines the entry point's flags, parses them and runs `main`, turning user errors into one line."""
  define_flags()

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags_parser(argv) if flags_parser else flags.FLAGS(argv)
    except flags.Error as e:
      usage_error(prog, e)
    except Exception as e:  # pylint: disable=broad-except  (a --config file that fails to load)
      if logging.get_verbosity() >= logging.DEBUG:
        raise
      where = getattr(e, 'filename', None)
      sys.exit(f'{prog}: error: {where + ": " if where else ""}{type(e).__name__}: {e}')

  def guarded(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
      main(argv)
    except app.UsageError as e:
      usage_error(prog, e)
    except USER_ERRORS as e:
      if logging.get_verbosity() >= logging.DEBUG:  # --verbosity=1: where it came from
        raise
      sys.exit(f'{prog}: error: {e}')

  app.run(guarded, flags_parser=parse)


def usage_error(prog: str, error: Exception | str) -> None:
  """Exits with status 2 and one line naming the flag (`prog --help` lists them all)."""
  print(f'{prog}: error: {error}', file=sys.stderr)
  sys.exit(2)
