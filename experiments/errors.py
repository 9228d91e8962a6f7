"""What the binary says when the input or the machine is at fault: one line, exit status 1.

A bad config or flag value, a missing or corrupt data file, a workdir that
cannot receive the run, a full disk or an unwritable directory is the user's
to fix: :func:`user_message` gives the one line they see (naming the value or
the path and what to do), without a traceback unless asked for with
``--verbosity=1``. Any other exception is a bug and keeps its traceback.
Errors found while parsing the flags (a misspelt ``--config.field``, a
missing ``--config`` file) happen before ``main``; :func:`parse_flags`, given
to ``app.run``, reports them the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from typing import Iterator, Optional, Sequence

from absl import app, flags, logging

from parle_jax import data


class UserError(Exception):
  """Bad input; the message names the value or path and what to do about it."""


class ConfigError(UserError, ValueError):
  """A config or flag value that is invalid or does not fit the data or the devices."""


class WorkdirError(UserError):
  """``--workdir`` cannot receive the run: a file, not writable, or a corrupt file in it."""


# Errors of the file system that the user fixes (space, permissions, a file
# where a directory belongs); any other OSError is treated as a bug.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)
# How wrapped errors (orbax's RESOURCE_EXHAUSTED from tensorstore, ...) say it.
_DISK_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
  """ValueErrors raised inside come from the config or flags: re-raised as ConfigError.

  For the code that validates and plans a run, whose ValueErrors name a field,
  its value and what is allowed.
  """
  try:
    yield
  except UserError:
    raise
  except ValueError as err:
    raise ConfigError(str(err)) from err


def _chain(err: BaseException) -> list[BaseException]:
  """`err`, what it was raised from or while handling, and the members of groups."""
  found, todo = [], [err]
  while todo:
    error = todo.pop()
    if error is None or any(error is seen for seen in found):
      continue
    found.append(error)
    todo += [error.__cause__, error.__context__, *getattr(error, 'exceptions', ())]
  return found


def _says_disk_full(text: str) -> bool:
  return any(words in text for words in _DISK_FULL_TEXT)


def disk_full(err: BaseException) -> bool:
  """Whether `err`, or an error it wraps, says that the disk (or the quota) is full."""
  return any((isinstance(e, OSError) and e.errno in _DISK_FULL) or _says_disk_full(str(e))
             for e in _chain(err))


def _path_in(err: BaseException) -> Optional[str]:
  """The file an error was about: an OSError's filename, or a path tensorstore quotes."""
  for e in _chain(err):
    if isinstance(e, OSError) and e.filename:
      return os.fspath(e.filename)
    match = re.search(r'(?:local file|Failed writing:) "([^"]+)"', str(e))
    if match:
      return match.group(1)
  return None


def user_message(err: BaseException, workdir: Optional[str] = None) -> Optional[str]:
  """The one line a user sees for `err`, or None when `err` is a bug."""
  if isinstance(err, (UserError, data.DataUnavailableError, data.CorruptCacheError)):
    return str(err)
  if disk_full(err):
    path = _path_in(err)
    if workdir and (path is None or _within(path, workdir)):
      where = f'--workdir={workdir}' + (
          f' (writing {os.path.relpath(path, workdir).split(os.sep)[0]})' if path else '')
    else:
      where = path or 'a file of the run'
    return (f'No space left on device for {where}. Free space on that disk (or use '
            'another), then run the same command again: it resumes from the last checkpoint.')
  if isinstance(err, OSError) and err.errno in _NOT_WRITABLE:
    path = err.filename or workdir
    return (f'cannot write{f" {path}" if path else ""}: {err.strerror}. Make it writable, or '
            'point --workdir (or --config.data_dir) elsewhere.')
  return None


def _within(path: str, directory: str) -> bool:
  path, directory = os.path.abspath(path), os.path.abspath(directory)
  return os.path.commonpath([path, directory]) == directory


def quiet_failed_saves() -> None:
  """Drops the noise of an orbax save that failed for a full disk (reported once, by us).

  Orbax logs the failed write from each of its threads, with tracebacks, and
  the callbacks of its other writes then raise 'Event loop is closed' into the
  void (``sys.unraisablehook``), dozens of times.
  """
  logging.get_absl_handler().addFilter(
      lambda record: 'orbax' not in record.pathname or not _says_disk_full(record.getMessage()))
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous_hook(unraisable)

  sys.unraisablehook = hook


def exit_now(status: int) -> None:
  """Flushes and exits at once, skipping the interpreter's shutdown (and orbax's noise in it)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Errors while parsing the flags.


def _innermost_text(err: BaseException) -> str:
  """ml_collections wraps a KeyError's text in more errors: the text itself."""
  while err.args and isinstance(err.args[0], BaseException):
    err = err.args[0]
  return str(err.args[0]) if err.args else str(err)


def _unknown_field(err: BaseException, argv: Sequence[str]) -> str:
  lines = _innermost_text(err).strip().split('\n')
  field = lines[0].strip("'\"")
  hint = ' '.join(line.strip() for line in lines[1:])
  argument = next((a for a in argv if a.startswith('--') and '.' in a.split('=', 1)[0]
                   and field in re.split(r'[.=]', a)), f'--config.{field}')
  return (f'{argument} is invalid: the config has no field {field!r}.'
          + (f' {hint}' if hint else ''))


def _config_file_error(name: str, argv: Sequence[str], err: BaseException) -> str:
  path = ''
  for i, argument in enumerate(argv):
    if argument.startswith(f'--{name}='):
      path = argument.split('=', 1)[1]
    elif argument == f'--{name}' and i + 1 < len(argv):
      path = argv[i + 1]
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  return (f'--{name}={path}: cannot load the config file '
          f'({lines[-1] if lines else type(err).__name__}).')


def parse_flags(argv: Sequence[str], config_flags: Sequence[str] = ('config',)) -> list[str]:
  """``app.run``'s flags_parser: absl's parsing, with one message for config-file errors.

  A ``--config.field`` the config does not have, or a ``--config`` file that
  cannot be loaded (ml_collections reports that only when the config is first
  used), prints one line and exits with status 1, as absl does for its own
  flag errors.
  """
  try:
    remaining = app.parse_flags_with_usage(list(argv))  # absl's own errors: one message, exit 1
  except (AttributeError, KeyError) as err:  # ml_collections: a field the config lacks
    _flag_error(_unknown_field(err, argv))
  except OSError as err:  # ml_collections: overrides of a config file that did not load
    _flag_error(_config_file_error(config_flags[0], argv, err))
  for name in config_flags:
    try:
      flags.FLAGS[name].value.keys()  # a file that did not load raises on first use
    except OSError as err:
      _flag_error(_config_file_error(name, argv, err))
    except AttributeError:  # not given (None): main says it is required
      pass
  return remaining


def _flag_error(message: str) -> None:
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)
