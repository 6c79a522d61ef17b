"""What every entry point (`python -m vesper_jax.<name>`) shares.

Each entry-point module defines `define_flags()` and `main(argv)` and ends with

    if __name__ == '__main__':
      cli.run('vesper_jax.<name>', main, define_flags)

so flags exist only when the module runs as a program (importing it from a notebook or a test defines
none), and every entry point reports a mistake a person can fix the same way: bad input (a config value,
a missing or broken file) is one line `vesper_jax.<name>: error: <what and where>` on stderr with exit
status 1, never a traceback; a bad flag is absl's usage error. `--verbosity=1` shows the traceback.
Library functions never print or exit: they raise, and this wrapper speaks to the person.
"""

import sys
from collections.abc import Callable

from absl import app, logging

# Exceptions that mean "the input is wrong", not "the code is wrong" (DataError is a ValueError).
USER_ERRORS = (ValueError, OSError)


def run(prog: str, main: Callable[[list[str]], None], define_flags: Callable[[], None], *,
        flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """Defines the entry point's flags, parses them and runs `main`, turning user errors into one line."""
  define_flags()

  def guarded(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
      main(argv)
    except USER_ERRORS as e:
      if logging.get_verbosity() >= logging.DEBUG:  # --verbosity=1: where it came from
        raise
      sys.exit(f'{prog}: error: {e}')

  app.run(guarded, **({'flags_parser': flags_parser} if flags_parser else {}))
