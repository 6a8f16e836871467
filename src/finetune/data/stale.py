"""Temporary files named by their writer (host and pid), and the removal of those whose writer has died.

Downloads (``.part``), extractions and disk caches (``.tmp``) are written under a temporary name and renamed
into place when complete. A killed process leaves its temporary file behind; the next run in the same folder
removes it, but only when the writer is known to be dead: same host, and no process with that pid. A file of a
live process, or of another host sharing the folder over a network file system, is never touched.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)


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
