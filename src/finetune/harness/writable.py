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
