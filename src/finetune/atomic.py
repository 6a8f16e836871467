"""Files that appear whole or not at all: every file the package writes goes through here.

A file is written under a temporary name in its own folder (so that the rename stays on one file system, where it is
atomic), flushed and fsynced, renamed over the final name with ``os.replace``, and the folder is fsynced so that the
rename itself survives a power cut. On any failure (a full disk, Ctrl+C, a bug in the writer) the temporary file is
removed and the final name keeps what it held before: nothing, or the previous complete file.

A write that fails because the disk is full (``ENOSPC``), the quota is used up (``EDQUOT``) or the file is larger than
allowed there (``EFBIG``) becomes one :class:`~finetune.errors.DiskFullError` naming the folder and what to do.

The temporary name is ``.<name>.<host>.<pid>.tmp``, the one :func:`remove_stale` recognises: a
process killed with SIGKILL mid-write leaves only such a file, never a partial file under the final name.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from finetune.errors import DiskFullError, OverwriteError

NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

log = logging.getLogger(__name__)


def temp_path(path: str | Path) -> Path:
    """The temporary file ``path`` is written to first: in the same folder, named after its writer (host, pid)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def temp_name(prefix: str, suffix: str) -> str:
    """``<prefix><host>.<pid><suffix>``: a temporary file name that says which process writes it."""
    return f"{prefix}{socket.gethostname()}.{os.getpid()}{suffix}"


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to another user
    except OverflowError:
        return False
    return True


def remove_stale(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """Delete ``folder``'s :func:`temp_name` files (``prefix`` may hold ``*``) left by dead processes on this host."""
    host = socket.gethostname()
    removed = []
    for path in sorted(Path(folder).glob(f"{prefix}{glob.escape(host)}.*{glob.escape(suffix)}")):
        writer, _, pid = path.name[: -len(suffix)].rpartition(".")
        if not writer.endswith(host) or not pid.isdigit() or pid_is_alive(int(pid)):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:
            continue  # another run removed it first
        removed.append(path)
    if removed:
        log.warning("Removed %d file(s) left by ended processes: %s", len(removed), ", ".join(map(str, removed)))
    return removed


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for ``path``; when the block ends without an error it becomes ``path`` (fsynced).

    ``mode`` is ``"wb"`` or ``"w"`` (with ``open``'s ``encoding``, ``newline``); the folder is created if missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_output(path) as tmp, open(tmp, mode, **open_kwargs) as file:
        yield file


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path for writers that take a file name (``torch.onnx.export``, ``torch.jit.save``, PIL): what the
    block writes there becomes ``path`` when it ends without an error, else is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as err:
        full = disk_full_error(err, path)  # before the removal, which frees the space the partial file held
        _remove(tmp)
        if full is not None and full is not err:
            raise full from err
        raise


@contextmanager
def staged_files(folder: str | Path, last: str, replace: bool = True, main: str | None = None) -> Iterator[Path]:
    """A temporary folder inside ``folder`` for outputs that belong together (an exported model, the weights file
    ONNX writes beside a large one, their description): what the block writes there moves into ``folder`` under the
    same names when it ends without an error, ``last`` last, each by an atomic rename; else all of it is removed.

    Renames need no space, so a full disk stops the block before any final name is touched. The renames hold a lock
    on ``folder``, so two commands writing the same outputs at once leave one's whole set, never a mix; with
    ``replace=False`` the second finds the first one's files and raises :class:`OverwriteError` instead. ``main``:
    the file a full disk's error names (default ``last``).
    """
    folder = Path(folder)
    staging = temp_path(folder / last)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder, glob.escape(f".{last}."), ".tmp")  # the staging folder of a killed writer
        staging.mkdir()
        yield staging
        names = sorted(p.name for p in staging.iterdir() if p.name != last) + [last]
        for name in names:
            _fsync_file(staging / name)
        with _locked(folder):
            there = [str(folder / name) for name in names if (folder / name).exists()]
            if there and not replace:
                raise OverwriteError(
                    f"{', '.join(there)} appeared while this command ran (another command wrote it): nothing was "
                    "replaced. Pass overwrite=true to replace it, or another output."
                )
            for name in names:
                os.replace(staging / name, folder / name)
            fsync_folder(folder)
    except BaseException as err:
        full = disk_full_error(err, folder / (main or last))
        _remove(staging)
        if full is not None and full is not err:
            raise full from err
        raise
    _remove(staging)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as file:
        file.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as file:
        file.write(text)


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> None:
    """``payload`` as JSON (a trailing newline); serialised before anything is written, so a value JSON cannot hold
    fails without touching the file."""
    write_text(path, json.dumps(payload, indent=indent) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` whole or not at all. Written through a Python file object, so that a full disk raises an
    ``OSError`` with its errno (saving to a file name reports it only as a ``RuntimeError`` from torch's writer)."""
    import torch

    with atomic_write(path, "wb") as file:
        torch.save(obj, file)


def save_figure(figure: Any, path: str | Path, **savefig_kwargs: Any) -> None:
    """A matplotlib figure saved whole or not at all, in the format its suffix names (``.png``, ``.pdf``, ...)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_write(path, "wb") as file:
        figure.savefig(file, format=fmt, **savefig_kwargs)


def copy_file(source: str | Path, destination: str | Path) -> None:
    """``shutil.copy2`` (contents, then times and mode) into a temporary file renamed to ``destination``."""
    with atomic_output(destination) as tmp:
        shutil.copy2(source, tmp)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable; silently skipped where the platform cannot open a folder for it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows) refuse fsync on a folder: the rename itself is still atomic
    finally:
        os.close(fd)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from, or while handling) is a full disk, quota or size limit."""
    return _no_space_cause(err) is not None


def disk_full_error(
    err: BaseException, path: str | Path | None = None, whole: bool = True, folder: str | Path | None = None
) -> DiskFullError | None:
    """The :class:`DiskFullError` for ``err`` when it comes from a full disk (``path``: the file being written; else
    the file the ``OSError`` names); ``None`` for any other error. A ``DiskFullError`` is returned as it is.
    ``whole``: the write was atomic; ``folder``: where the command writes, named when nothing names the file (see
    :meth:`DiskFullError.for_file`).

    A writer that reports a full disk without an errno (torch's own file writer; LitData, whose workers' errors
    arrive as text) is recognised by the ``[Errno N]`` in its message, or by the folder's file system having no
    space left.
    """
    if isinstance(err, DiskFullError):
        return err
    cause = _no_space_cause(err)
    if cause is None:
        if path is None or not isinstance(err, (OSError, RuntimeError)):
            return None
        code = _errno_in_text(str(err))
        if code is None and not _no_space_left(Path(path).parent):
            return None
        code = code or errno.ENOSPC
    else:
        code = cause.errno
        path = path if path is not None else (cause.filename2 or cause.filename)
    file = None if path is None else Path(os.fsdecode(path))
    return DiskFullError.for_file(code, file, whole, None if folder is None else Path(folder))


def _no_space_cause(err: BaseException | None) -> OSError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _errno_in_text(text: str) -> int | None:
    """The full-disk errno an error's text quotes (``[Errno 28] No space left on device``), if any."""
    for code in NO_SPACE_ERRNOS:
        if f"[Errno {code}]" in text:
            return code
    return None


def _no_space_left(folder: Path, below: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` (or its nearest existing parent) has under ``below`` bytes free."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < below
    except OSError:
        return False


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` (advisory: it orders this module's writers); none where unsupported."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # nothing more to do: the final name was never touched
