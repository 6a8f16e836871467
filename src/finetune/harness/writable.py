"""Where a command's outputs may go, checked before the work: a folder it can write to (:func:`check_writable`), and
never one of its inputs or inside the data it reads (:func:`check_apart`, the one rule for every command)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from finetune.errors import PathError, SettingError, describe_path


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
    wanted = "a folder (it is created if missing)" if given is None else "a file in a folder you can write to"
    if not existing.is_dir():
        raise PathError(
            f"{named}: {str(existing)!r} is {describe_path(existing)}, not a folder, so nothing can be "
            f"written there. Pass {setting}= {wanted}."
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


PathLike = str | os.PathLike


def real_path(path: PathLike) -> Path:
    """``path`` as the file system finds it: absolute, ``~`` expanded, every link that exists followed."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def overlap(output: PathLike, read: PathLike) -> str | None:
    """How writing ``output`` would touch ``read``: ``"is"`` (the same file or folder, through links and hard links
    too), ``"inside"`` (``output`` lies inside the folder ``read``), ``"holds"`` (``read`` lies inside the folder
    ``output``), or ``None`` when they are apart."""
    out, inp = real_path(output), real_path(read)
    if out == inp or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
        return "is"
    if out.is_relative_to(inp):
        return "inside"
    if inp.is_relative_to(out):
        return "holds"
    return None


def check_apart(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike | Iterable[PathLike]]) -> None:
    """Refuse a command whose output would be one of its inputs, lie inside the data it reads, or hold an input,
    whatever ``overwrite`` says: writing would destroy or change what it reads (a checkpoint an export's sidecar
    describes, images the next run reads).

    ``outputs`` and ``inputs`` map how the message names each path (``"output=X.ckpt"``, ``"data.root=DATA"``) to
    it; an input may be several paths (a glob's matches, a list of checkpoints). Raises
    :class:`~finetune.errors.SettingError` naming both.
    """
    for out_name, output in outputs.items():
        for in_name, given in inputs.items():
            paths = [given] if isinstance(given, (str, os.PathLike)) else list(given)
            for read in paths:
                relation = overlap(output, read)
                if relation is None:
                    continue
                which = in_name if len(paths) == 1 else f"{in_name} ({read})"
                if relation == "is":
                    problem = f"is {which} itself (the same file on disk): writing it would destroy what it reads"
                elif relation == "inside":
                    problem = (
                        f"is inside {which}, which this command reads: its files would be mixed into that data, "
                        "and read as part of it next time"
                    )
                else:
                    problem = f"holds {which}, which this command reads: writing there could replace or change it"
                raise SettingError(
                    f"{out_name} {problem}. A command never writes over or into its own input, with overwrite=true "
                    f"or not: choose an output outside {str(real_path(read))!r}."
                )
