"""Checkpoints as files a user hands over: read safely, explained when broken, and carrying what their data was.

- :func:`load_checkpoint`: ``torch.load(..., weights_only=True)`` (tensors and plain data only, never arbitrary
  pickled objects), with an error that names the file, and for a truncated file the run's other checkpoint.
- :func:`class_names` and :func:`checkpoint_transform` read back what every checkpoint of ``finetune.train`` stores
  beside the weights (the class names in order, and the eval :class:`~finetune.data.preprocessing.Preprocessing`).
- :func:`load_for_inference`: the model in a checkpoint file, ready to evaluate, predict or export.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from finetune.data.preprocessing import CLASSES, Preprocessing
from finetune.errors import PathError, UserError
from finetune.harness.run_folder import LAST, RunFolder
from finetune.module import FineTuneModule

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or not written by ``finetune.train``."""


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise PathError(
            f"Checkpoint {str(path)!r} does not exist. Pass ckpt_path=PATH to a .ckpt written by finetune.train "
            "(a run's checkpoints/ folder holds the best one and last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(_unreadable(path, err)) from err
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r}: it holds pickled Python objects, not only tensors and plain data "
            f"({'it refers to ' + named.group(1) if named else _first_line(err)}), and such files are never "
            "unpickled: loading one could run code from it. Use a checkpoint written by finetune.train, from a "
            "source you trust."
        ) from err
    except Exception as err:  # noqa: BLE001 - zip reader, EOF, unpickling: all mean a damaged file
        raise CheckpointError(_unreadable(path, err)) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint of finetune.train (no 'state_dict'; found {found})."
        )
    return checkpoint


def _unreadable(path: Path, err: BaseException) -> str:
    others = other_checkpoints(path)
    hint = (
        f"The run's other checkpoint(s): {', '.join(repr(str(p)) for p in others)}: try one of them."
        if others
        else "There is no other checkpoint beside it: restore the file, or train again."
    )
    return (
        f"Cannot read checkpoint {str(path)!r}: the file is truncated or corrupt ({type(err).__name__}: "
        f"{_first_line(err)}; {path.stat().st_size} bytes). {hint}"
    )


def other_checkpoints(path: Path) -> list[Path]:
    """The run's other ``.ckpt`` files (beside ``path`` and in its run's ``checkpoints/``), ``last.ckpt`` first."""
    folders = {path.parent, RunFolder.of_checkpoint(path).checkpoints}
    found = {p.resolve(): p for folder in folders for p in folder.glob("*.ckpt") if p.resolve() != path.resolve()}
    return sorted(found.values(), key=lambda p: (p.name != LAST, str(p)))


def _first_line(err: BaseException) -> str:
    """The first sentence of an error message (torch's go on for lines)."""
    lines = str(err).strip().splitlines()
    return lines[0].split(". ")[0][:200] if lines else type(err).__name__


def checkpoint_transform(preprocessing: Preprocessing) -> v2.Compose:
    """The eval transform of a checkpoint's preprocessing, refused by name when this version cannot build it."""
    try:
        return preprocessing.transform()
    except ValueError as err:  # e.g. an interpolation this version does not know
        raise CheckpointError(f"The checkpoint's preprocessing {preprocessing} cannot be reproduced: {err}") from err


def class_names(checkpoint: dict[str, Any], num_classes: int, path: str | Path = "checkpoint") -> list[str]:
    """The class names stored in the checkpoint, in output order; ``class_0..`` (with a warning) for older ones."""
    classes = checkpoint.get(CLASSES)
    if classes:
        if len(classes) != num_classes:
            raise CheckpointError(f"{path} lists {len(classes)} class names for a {num_classes}-class model.")
        return [str(c) for c in classes]
    log.warning(
        "%s stores no class names (written before they were recorded): naming its outputs class_0..class_%d.",
        path,
        num_classes - 1,
    )
    return [f"class_{i}" for i in range(num_classes)]


def load_for_inference(path: str | Path) -> tuple[FineTuneModule, dict[str, Any]]:
    """The model in a checkpoint file, in eval mode on the CPU, and the checkpoint itself.

    Loaded with ``weights_only=True`` (see :func:`finetune.harness.checkpoint.load_checkpoint`). ``weights=None``: the
    checkpoint holds every weight, so nothing is fetched first. ``cache_features=False``: a model trained on cached
    features takes images (its frozen backbone is in the checkpoint).
    """
    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "num_classes" not in hparams:
        raise CheckpointError(f"{str(path)!r} has no model hyper-parameters: it was not written by finetune.train.")
    model = FineTuneModule(**{**hparams, "weights": None, "cache_features": False})
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit the model its hyper-parameters describe: {err}") from err
    return model.eval(), checkpoint
