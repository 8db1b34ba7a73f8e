"""What every command line shares: bad input as one line, quiet libraries.

A user error (a config typo, a bad value, a missing path, wrong dims) prints
one line `error: ...` on stderr and exits 2; anything else is a bug and keeps
its traceback. Set EGPT_ALIGN_TRACEBACK=1 to see tracebacks for user errors
too.

  if __name__ == "__main__":
    cli.run_absl(main)        # absl entry points (train, evaluate)
    sys.exit(cli.run(main))   # argparse entry points (data, tools/*)
"""

from __future__ import annotations

import ast
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A bad input from the command line or the files it names."""


# Raised by the library for bad inputs (it raises them with a message that
# names the file, field or sample); a bug raises other types.
USER_ERRORS = (
  UserError,
  ValueError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (path first for OS errors)."""
  if isinstance(error, OSError) and error.filename and error.strerror:
    message = f"{error.filename}: {error.strerror}"
  else:
    message = str(error)
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      try:  # KeyError / ml_collections quote their message.
        message = str(ast.literal_eval(message))
      except (ValueError, SyntaxError):
        pass
  return " ".join(message.split()) or type(error).__name__


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits 2."""
  message = message.removeprefix("error: ")
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _config_error(error: BaseException) -> str:
  # ml_collections: "'batch_sise'\nDid you mean "batch_size" instead of ...".
  message = one_line(error)
  key, _, hint = message.partition(" Did you mean")
  if hint:
    return f"no config key {key}; did you mean{hint}"
  return f"bad --config override: {message}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing; a bad flag or config override is a UserError."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(one_line(e)) from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Raised by ml_collections while applying --config.KEY=VALUE.
    raise UserError(_config_error(e)) from e
  if "config" in flags.FLAGS and flags.FLAGS["config"].present:
    try:  # ml_collections defers a config file's load error to first use.
      flags.FLAGS["config"].value.keys  # noqa: B018
    except OSError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      raise UserError(f"--config: {lines[-1]}") from e
  return rest


def _traceback_wanted() -> bool:
  return os.environ.get("EGPT_ALIGN_TRACEBACK", "") not in ("", "0")


def run_absl(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with user errors as one line and exit status 2."""
  quiet_logs()
  try:
    app.run(main, flags_parser=parse_flags)
  except USER_ERRORS as e:
    if _traceback_wanted():
      raise
    fail(one_line(e))


def run(main: Callable[..., Any], *args: Any) -> Any:
  """Calls an argparse `main(*args)`; user errors as one line, exit 2."""
  quiet_logs()
  try:
    return main(*args)
  except USER_ERRORS as e:
    if _traceback_wanted():
      raise
    fail(one_line(e))
  except SystemExit as e:
    if isinstance(e.code, str):  # raise SystemExit("message")
      fail(" ".join(e.code.split()))
    raise


class _QuietLibraries(logging.Filter):
  """Drops INFO records of chatty libraries (orbax logs every file write)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return "/orbax/" not in path and "/etils/" not in path


_QUIET = _QuietLibraries()


def quiet_logs() -> None:
  """Silences orbax/etils INFO records and JAX's missing-TPU message."""
  for target in (
    absl_logging.get_absl_logger(),
    absl_logging.get_absl_handler().python_handler,
  ):
    if _QUIET not in target.filters:
      target.addFilter(_QUIET)
  # "Unable to initialize backend 'tpu'" on every machine without a TPU.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
