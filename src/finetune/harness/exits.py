"""How an entry point ends on a user's mistake: one ``Error: ...`` line on stderr and exit code 2, no traceback.

A :class:`~finetune.errors.UserError` (a setting, a file, a folder, a refused resume or overwrite, a bad checkpoint)
is the user's to fix, so its message is all they need; any other exception is a bug and keeps its traceback (Hydra
prints it). ``HYDRA_FULL_ERROR=1`` shows the full stack for everything. The line also goes to the run's log file
(``train.log``), and ``finetune.train`` has already recorded the failure in ``results.json`` by then.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, NoReturn, TypeVar

from hydra.errors import CompactHydraException

from finetune.atomic import disk_full_error, is_disk_full
from finetune.errors import UserError

USER_ERROR_EXIT_CODE = 2  # the shell's convention for "wrong usage" (argparse's too)
F = TypeVar("F", bound=Callable[..., Any])


def full_errors() -> bool:
    """``HYDRA_FULL_ERROR=1``: every error with its stack, user errors included."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> NoReturn:
    """End the program on a user's mistake: ``Error: message`` on stderr (and in the log file), exit code 2."""
    line = f"Error: {message}"
    _log_to_files(line)
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT_CODE)


@contextmanager
def user_errors(job: bool = True) -> Iterator[None]:
    """Turn a :class:`UserError` raised inside, or an ``OSError`` of a full disk (as a :class:`DiskFullError`), into
    :func:`fail` (unless ``HYDRA_FULL_ERROR=1``). Inside a multirun's ``job`` it becomes a :class:`MultirunJobError`
    instead: Hydra records the failed job, runs the others, and prints the message without a stack."""
    quiet_full_log_files()
    try:
        yield
    except Exception as err:
        # A full disk is the user's to fix too, whichever writer met it (a library's log or metrics file included).
        mistake = err if isinstance(err, UserError) else disk_full_error(err, whole=False, folder=_output_dir())
        if mistake is None or full_errors():
            raise
        if job and _in_a_multirun_job():
            _log_to_files(f"Error: {mistake}")
            raise MultirunJobError(str(mistake)) from err
        fail(str(mistake))


class MultirunJobError(CompactHydraException):
    """A user error inside one multirun job: Hydra prints its message alone, not a traceback, after the batch."""


def ends_user_errors_cleanly(main: F) -> F:
    """Decorator for an entry point's task function (inside ``@hydra.main``): see :func:`user_errors`."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return main(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def quiet_full_log_files() -> None:
    """Make the log files (Hydra's ``train.log``) stop quietly when their disk is full: one warning line on stderr,
    then the console only. Python's logging would print a traceback for every line it could not write, burying the
    one error line that says what happened."""
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and "handleError" not in vars(handler):
            handler.handleError = functools.partial(_log_file_failed, handler)  # type: ignore[method-assign]


def _log_file_failed(handler: logging.FileHandler, record: logging.LogRecord) -> None:
    err = sys.exc_info()[1]
    if err is None or not is_disk_full(err):
        type(handler).handleError(handler, record)  # anything else: logging's own report
        return
    logging.getLogger().removeHandler(handler)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    print(f"Warning: stopped writing the log file {handler.baseFilename} ({reason}).", file=sys.stderr, flush=True)


def _output_dir() -> str | None:
    """The folder this Hydra job writes to, if any: named when a full disk's error does not name its file."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def _in_a_multirun_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _log_to_files(line: str) -> None:
    """The line into the log files the root logger writes (Hydra's ``train.log``), not again on the console."""
    record = logging.LogRecord("finetune", logging.ERROR, __file__, 0, line, None, None)
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
