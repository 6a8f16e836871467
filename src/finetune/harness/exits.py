"""How an entry point ends on a user's mistake: one ``Error: ...`` line on stderr and exit code 2, no traceback.

A :class:`~finetune.errors.UserError` (a setting, a file, a folder, a refused resume or overwrite, a bad checkpoint)
is the user's to fix, so its message is all they need, also when it was raised inside ``hydra.utils.instantiate``
(which wraps it in an ``InstantiationException``); any other exception is a bug and keeps its traceback (Hydra
prints it). An override that Hydra's grammar cannot read ends the same way, before Hydra starts
(:func:`checks_command_line`). ``HYDRA_FULL_ERROR=1`` shows the full stack for everything. A single command refused
before it did any work leaves no run folder behind (:func:`finetune.harness.run_folder.release_unstarted`): the line
is its whole record. Otherwise the line also goes to the run's log file (``train.log``), and ``finetune.train`` has
already recorded the failure in ``results.json`` by then; a multirun job always keeps its folder and record.

How it ends well: :func:`tell` prints what the command found and where it wrote it, and puts the same text into the
log file (``evaluate.log``, ``predict.log``, ...), which would otherwise hold only warnings: a run folder's log
then says what the command did without the terminal it ran in.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, NoReturn, TypeVar

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf

from finetune.atomic import disk_full_error, is_disk_full
from finetune.errors import SettingError, UserError
from finetune.harness.overrides import check_override_syntax
from finetune.harness.run_folder import release_unstarted

USER_ERROR_EXIT_CODE = 2  # the shell's convention for "wrong usage" (argparse's too)
F = TypeVar("F", bound=Callable[..., Any])


def full_errors() -> bool:
    """``HYDRA_FULL_ERROR=1``: every error with its stack, user errors included."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def tell(text: str) -> None:
    """Say ``text`` (a command's results, where it wrote them) on stdout and in the log files of the run's folder."""
    print(text, flush=True)
    _log_to_files(text, logging.INFO)


def fail(message: str) -> NoReturn:
    """End the program on a user's mistake: ``Error: message`` on stderr (and in the log file), exit code 2.

    The message is one line even where it quotes another library's message that spans several."""
    line = f"Error: {one_line(message)}"
    _log_to_files(line)
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT_CODE)


@contextmanager
def user_errors(job: bool = True) -> Iterator[None]:
    """Turn a :class:`UserError` raised inside (also one wrapped by Hydra's ``instantiate``: :func:`user_error_in`),
    or an ``OSError`` of a full disk (as a :class:`DiskFullError`), into :func:`fail` (unless ``HYDRA_FULL_ERROR=1``).
    Inside a multirun's ``job`` it becomes a :class:`MultirunJobError` instead: Hydra records the failed job, runs the
    others, and prints the message without a stack."""
    quiet_full_log_files()
    try:
        yield
    except Exception as raised:
        # A full disk is the user's to fix too, whichever writer met it (a library's log or metrics file included).
        err = user_error_in(raised) or disk_full_error(raised, whole=False, folder=_output_dir())
        if err is None or full_errors():
            raise
        if job and _in_a_multirun_job():
            _log_to_files(f"Error: {one_line(str(err))}")
            raise MultirunJobError(one_line(str(err))) from raised
        if job and _in_a_single_run():
            release_unstarted()  # refused before it did any work: no folder left behind
        fail(str(err))


def one_line(message: str) -> str:
    """``message`` with its line breaks (and the spaces around them) as single spaces."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def user_error_in(err: BaseException) -> UserError | None:
    """The :class:`UserError` that ``err`` is, or that Hydra's ``instantiate`` wrapped into it (an
    ``InstantiationException`` chains the original as its ``__cause__``); ``None`` for anything else."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, UserError) else None


class MultirunJobError(CompactHydraException):
    """A user error inside one multirun job: Hydra prints its message alone, not a traceback, after the batch."""


def ends_user_errors_cleanly(main: F) -> F:
    """Decorator for an entry point's task function (inside ``@hydra.main``): see :func:`user_errors`."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            if args and isinstance(args[0], DictConfig):
                check_required(args[0])
            return main(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_required(cfg: DictConfig) -> None:
    """Refuse, before any work, a command whose config still holds a required value that was not given (``???``:
    ``data.root``, ``ckpt_path``, ...); read later, it would end in OmegaConf's traceback."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join(f"{key}=..." for key in missing)
        raise SettingError(f"{', '.join(missing)}: required and not given; add {given} to the command line.")


def checks_command_line(hydra_main: F) -> F:
    """Decorator for an entry point's ``@hydra.main`` function (outside it): an override on the command line that
    Hydra's grammar cannot read (``data.root=/x/bob's photos``) ends as one ``Error:`` line that names it and shows it
    quoted, exit code 2, before Hydra starts (Hydra's own report names neither the fix nor the override's value)."""

    @wraps(hydra_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:  # @hydra.main reads sys.argv only when called without a config
            with user_errors(job=False):
                check_override_syntax(sys.argv[1:])
        return hydra_main(*args, **kwargs)

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

    if not HydraConfig.initialized():
        return None
    return OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None, throw_on_missing=False)


def _in_a_multirun_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _in_a_single_run() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


def _log_to_files(line: str, level: int = logging.ERROR) -> None:
    """The line into the log files the root logger writes (Hydra's ``train.log``), not again on the console."""
    record = logging.LogRecord("finetune", level, __file__, 0, line, None, None)
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
