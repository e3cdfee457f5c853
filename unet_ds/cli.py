"""How the command-line entry points (`unet_ds.main`, `unet_ds.plan`) end on an error: one last
line `error: <type>: <cause>` naming the file, key or shape at fault, exit status 1 (`BUSY` when
the workdir is in use by another process: a launcher counts that point as running elsewhere)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

from absl import flags


class UserError(Exception):
  """Base of the project's own errors whose message names the file, key or shape at fault and
  what to do (e.g. `checkpoint.CheckpointError`); ends in one line, as `USER_ERRORS`."""


BUSY = 75  # EX_TEMPFAIL: the workdir is locked by another live process; try again later


class BusyError(UserError):
  """What the user asked for is in use by another live process (e.g. a locked workdir); ends
  with exit status `BUSY`, so a launcher can tell it from a failure."""


# Errors whose message already names the file, key or shape at fault: one line is enough.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, OSError,
               KeyError, flags.Error, UserError)


def exit_with_error(error: BaseException, show_traceback: bool = False) -> NoReturn:
  """Prints the traceback (when asked, or for an unexpected error type), then the one error
  line, and ends the process without shutdown noise after it."""
  if show_traceback or not isinstance(error, USER_ERRORS):
    traceback.print_exception(error, file=sys.stderr)
  message = ' '.join(str(error).split()) or repr(error)
  # On a line of its own: a progress bar (data preparation, training) ends without a newline.
  print(f'\nerror: {type(error).__name__}: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Library threads (orbax, grain) can print at interpreter shutdown and bury this line.
  os._exit(BUSY if isinstance(error, BusyError) else 1)  # pylint: disable=protected-access
