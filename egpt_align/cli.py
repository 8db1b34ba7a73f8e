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
import difflib
import logging
import os
import sys
import traceback
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


def _suggestions(word: str, keys: Sequence[str]) -> list[str]:
  """Keys `word` may have meant: by initials ('lr' for learning_rate), then
  difflib's close matches."""
  head = word.split("_")[0]
  initials = [
    k
    for k in keys
    if len(head) > 1 and "".join(w[:1] for w in k.split("_")) == head
  ]
  close = difflib.get_close_matches(word, keys, n=3, cutoff=0.5)
  return list(dict.fromkeys(initials + close))[:3]


def _unknown_override(argv: Sequence[str]) -> str | None:
  """'no config key ...; did you mean ...' for the first override whose key
  the loaded config lacks (None if every key exists)."""
  # absl leaves the flag unparsed when an override fails: load the file anew.
  path = None
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.removeprefix("--config=")
  if path is None or "config" not in flags.FLAGS:
    return None
  try:
    config = flags.FLAGS["config"].parser.parse(path)
  except Exception:  # noqa: BLE001 -- the file's own error is reported
    return None
  if not hasattr(config, "keys"):  # ml_collections' deferred load error
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg.removeprefix("--config.").partition("=")[0]
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys"):
        break  # a leaf given sub-keys: ml_collections' message says more
      keys = list(node.keys())
      if part in keys:
        node = node[part]
        continue
      prefix = "".join(f"{p}." for p in parts[:depth])
      message = f"no config key '{key}' ({arg})"
      guesses = _suggestions(part, keys)
      if guesses:
        names = " or ".join(f'"{prefix}{g}"' for g in guesses)
        return f"{message}; did you mean {names}?"
      where = f"config.{prefix[:-1]}" if prefix else "the config"
      return f"{message}; {where} has {', '.join(sorted(keys))}"
  return None


def _config_error(error: BaseException, argv: Sequence[str]) -> str:
  unknown = _unknown_override(argv)
  if unknown:
    return unknown
  return f"bad --config override: {one_line(error)}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing; a bad flag or config override is a UserError."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(_unknown_override(argv) or one_line(e)) from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Raised by ml_collections while applying --config.KEY=VALUE.
    raise UserError(_config_error(e, argv)) from e
  except OSError as e:  # an override applied to a config that did not load
    raise UserError(_load_error(e)) from e
  if "config" in flags.FLAGS and flags.FLAGS["config"].present:
    try:  # ml_collections defers a config file's load error to first use.
      flags.FLAGS["config"].value.keys  # noqa: B018
    except OSError as e:
      raise UserError(_load_error(e)) from e
  return rest


def _load_error(error: OSError) -> str:
  """'--config: <why>' from ml_collections' multi-line load failure."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"--config: {lines[-1]}"


def traceback_wanted() -> bool:
  return os.environ.get("EGPT_ALIGN_TRACEBACK", "") not in ("", "0")


def exit_now(error: BaseException) -> NoReturn:
  """Reports `error` and leaves with os._exit, skipping exit handlers.

  For one process of several, whose normal exit would wait in
  jax.distributed's shutdown for peers: a user error is one `error:` line
  (status 2), anything else its traceback (status 1).
  """
  if isinstance(error, USER_ERRORS) and not traceback_wanted():
    print(f"error: {one_line(error)}", file=sys.stderr)
    code = EXIT_USER_ERROR
  else:
    traceback.print_exception(error)
    code = 1
  sys.stderr.flush()
  os._exit(code)


def run_absl(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with user errors as one line and exit status 2."""
  quiet_logs()
  try:
    app.run(main, flags_parser=parse_flags)
  except USER_ERRORS as e:
    if traceback_wanted():
      raise
    fail(one_line(e))


def run(main: Callable[..., Any], *args: Any) -> Any:
  """Calls an argparse `main(*args)`; user errors as one line, exit 2."""
  quiet_logs()
  try:
    return main(*args)
  except USER_ERRORS as e:
    if traceback_wanted():
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
