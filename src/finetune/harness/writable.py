"""Output folders checked before the work: a command that cannot write its results says so before it starts."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import PathError, describe_path


def check_writable(folder: str | Path, setting: str, given: str | Path | None = None) -> None:
    """Refuse ``folder`` (where ``setting=given`` sends the results; ``given`` defaults to the folder) if they could
    not be written there: the folder, or the nearest part of its path that exists, is not a folder or is not
    writable for this user.

    Only checks; creates nothing. Raises :class:`~finetune.errors.PathError` naming the setting.
    """
    folder = Path(folder).expanduser()
    named = f"{setting}={folder if given is None else given}"
    check_name_lengths(folder, named, f"Pass {setting}= a shorter path.")
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(
            f"{named}: {str(existing)!r} is {describe_path(existing)}, not a folder, so nothing can be "
            f"written there. Pass {setting}= a folder (it is created if missing)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == folder.absolute() else f"would be created in {str(existing)!r}, which is"
        raise PathError(
            f"{named}: the folder {where} not writable for this user (read-only), so the results could "
            f"not be written. Pass {setting}= a folder you can write to."
        )


def check_name_lengths(path: str | Path, what: str, advice: str) -> None:
    """Refuse ``path`` if this filesystem cannot hold it: one of its names is longer than the file or folder name
    limit (255 bytes on most filesystems), or the whole path longer than the path limit. Only checks; the message
    starts with ``what`` (the setting, or the folder it is) and ends with ``advice`` (which setting to shorten).
    Raises :class:`~finetune.errors.PathError`.

    Without this check the first ``mkdir`` or ``stat`` fails with ``ENAMETOOLONG`` (``File name too long``), deep in
    Hydra or Lightning.
    """
    path = Path(path).expanduser().absolute()
    name_max, path_max = _name_limits(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 60 else f"{part[:40]}...{part[-12:]}"
            raise PathError(
                f"{what}: the name {shown!r} is {size} bytes long, more than the {name_max} a file or folder name may "
                f"have on this filesystem. {advice}"
            )
    size = len(os.fsencode(str(path)))
    if size >= path_max:
        raise PathError(
            f"{what}: the path is {size} bytes long, more than the {path_max - 1} a path may have on this "
            f"filesystem. {advice}"
        )


def _name_limits(path: Path) -> tuple[int, int]:
    """This filesystem's (name, path) length limits in bytes, asked of the nearest existing folder above ``path``."""
    existing = path
    while existing != existing.parent:
        try:
            if existing.is_dir():
                break
        except OSError:  # e.g. ENAMETOOLONG for the part that is too long
            pass
        existing = existing.parent
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(int(os.pathconf(existing, name)))
        except (OSError, ValueError, AttributeError):  # not on this OS, or the filesystem does not say
            limits.append(default)
    return limits[0], limits[1]
