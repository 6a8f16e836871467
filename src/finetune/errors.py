"""The errors that mean "what you asked for cannot be done as asked", as opposed to a bug.

Entry points end a :class:`UserError` with one ``Error: ...`` line on stderr and exit code 2, no traceback
(:mod:`finetune.harness.exits`); every other exception keeps its traceback. Raise a subclass where the fix is the
user's: a setting, a file, a folder, a resume. Each subclasses the builtin it replaces (``ValueError``,
``FileNotFoundError``, ...), so code that catches the builtin still catches it.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in a setting, a file or a folder the user gave: the message says what was wrong and what to do."""


class SettingError(UserError, ValueError):
    """A config setting with a value that cannot work; the message names the setting (``data.batch_size``)."""


class PathError(UserError, FileNotFoundError):
    """A path the user gave that is missing, or of the wrong kind (a file where a folder is needed, or the reverse)."""


class DataError(UserError, ValueError):
    """An image folder whose layout or content cannot be used as asked (no class folders, corrupt images, ...)."""


class OverwriteError(UserError, FileExistsError):
    """Writing would replace or mix with an earlier result (a run folder that holds a run, an existing output)."""


class ResumeError(UserError, ValueError):
    """A resume that cannot continue the run it names (another setup, no readable checkpoint)."""


class DownloadError(UserError, RuntimeError):
    """A download that failed or arrived corrupt: the message says how to work offline."""


class DivergedError(UserError, FloatingPointError):
    """Training diverged (a loss that is ``nan`` or ``inf``), or a checkpoint or its logits hold what such a run left:
    the message names the learning rate (``optimizer.lr``) and the settings that keep training stable."""


class MissingPackageError(UserError, ModuleNotFoundError):
    """An optional package a setting needs is not installed; the message names the extra to install."""


def describe_path(path: str | Path) -> str:
    """What is at ``path``, for messages: ``'a file'``, ``'a folder'``, ``'something that is neither...'`` or
    ``'nothing'``."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return "a folder"
    if p.is_file():
        return "a file"
    if p.exists() or p.is_symlink():
        return "neither a file nor a folder (a broken link, a device, ...)"
    return "nothing"


class DiskFullError(UserError, OSError):
    """A file that could not be written because its disk is full, the quota is used up or the file is too large
    there; the message names the folder. Nothing was left under the file's name (see :mod:`finetune.atomic`)."""

    @classmethod
    def for_file(
        cls, code: int | None, path: Path | None, whole: bool = True, folder: Path | None = None
    ) -> DiskFullError:
        """The error for a failed write of ``path`` with ``errno`` ``code`` (ENOSPC, EDQUOT or EFBIG); ``whole``:
        the writer was atomic, so nothing incomplete is left under the file's name (else the message says nothing
        about what is left). Without a ``path`` (a library's writer that does not say), ``folder`` is named as where
        the command writes."""
        import errno

        if path is not None:
            where = repr(str(path.parent))
        elif folder is not None:
            where = f"{str(folder)!r} (where this command writes)"
        else:
            where = "a folder this command writes to"
        what = f"{path.name} could not be written" if path is not None else "a file could not be written"
        if whole and path is not None:
            what += " (nothing incomplete was left under that name)"
        elsewhere = "write elsewhere: paths.log_dir=DIR for runs, output=PATH where a command takes one"
        if code == errno.EFBIG:
            message = (
                f"File too large for {where}: {what}, it is larger than the largest file allowed there (the file "
                f"system's limit, or ulimit -f). Raise the limit, or {elsewhere}."
            )
        else:
            full = "The disk quota is used up on" if code == errno.EDQUOT else "No space left on"
            message = f"{full} the disk holding {where}: {what}. Free space there, or {elsewhere}."
        err = cls(message)
        err.errno = code if code is not None else errno.ENOSPC
        return err
