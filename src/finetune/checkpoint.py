"""Checkpoints as files a user hands over: read safely, explained when broken, and carrying what their data was.

- :func:`load_checkpoint`: ``torch.load(..., weights_only=True)`` (tensors and plain data only, never arbitrary
  pickled objects), with an error that names the file, and for a truncated file the run's other checkpoint.
- :class:`Preprocessing`: the eval geometry and normalisation a model was trained with. Every checkpoint written by
  ``finetune.train`` stores it (key ``preprocessing``) and the class names in order (key ``classes``), recorded by
  the module from the datamodule it was fitted on (see :func:`describe_data`).
- :func:`class_names` and :meth:`Preprocessing.from_checkpoint` read them back, falling back with a warning for
  checkpoints written before they were stored.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchvision.transforms import v2

from finetune.data import eval_transform
from finetune.run_folder import LAST, RunFolder

log = logging.getLogger(__name__)

CLASSES = "classes"
PREPROCESSING = "preprocessing"

if TYPE_CHECKING:
    from finetune.module import FineTuneModule


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or not written by ``finetune.train``."""


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
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


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform: ``Resize`` to ``resize_size`` (square, or the shorter side: ``eval_resize``),
    ``CenterCrop`` to ``image_size``, [0, 1], normalise."""

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    eval_resize: str = "square"  # checkpoints from before the choice existed were all square

    @classmethod
    def of(cls, image_size: int, resize_size: int | None = None, **normalisation: Any) -> Preprocessing:
        """What ``finetune.data.eval_transform(image_size, resize_size, ...)`` does, read from the transform itself.

        ``normalisation``: ``mean``, ``std``, ``interpolation``, ``eval_resize`` (the book's ImageNet ones, bilinear
        and square if absent).
        """
        return cls.of_transform(eval_transform(image_size, resize_size, **normalisation))

    @classmethod
    def of_transform(cls, transform: v2.Compose) -> Preprocessing:
        found: dict[str, Any] = {}
        for step in transform.transforms:
            if isinstance(step, v2.Resize):
                found["resize_size"] = int(step.size[0])
                found["eval_resize"] = "square" if len(step.size) == 2 else "shorter_side"
                found["interpolation"] = str(getattr(step.interpolation, "value", step.interpolation))
            elif isinstance(step, v2.CenterCrop):
                found["image_size"] = int(step.size[0])
            elif isinstance(step, v2.Normalize):
                found["mean"] = tuple(float(m) for m in step.mean)
                found["std"] = tuple(float(s) for s in step.std)
        missing = {"resize_size", "image_size", "mean"} - set(found)
        if missing:
            raise RuntimeError(f"The eval transform has changed shape (no {sorted(missing)}): {transform}")
        return cls(**found)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(values["image_size"]),
            resize_size=int(values["resize_size"]),
            mean=tuple(float(m) for m in values["mean"]),
            std=tuple(float(s) for s in values["std"]),
            interpolation=str(values.get("interpolation", "bilinear")),
            eval_resize=str(values.get("eval_resize", "square")),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> Preprocessing:
        """The checkpoint's own preprocessing; for older checkpoints, the image size of the data it was fitted on."""
        if checkpoint.get(PREPROCESSING):
            return cls.from_dict(checkpoint[PREPROCESSING])
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        if data.get("image_size"):
            stored = {k: data[k] for k in ("mean", "std", "interpolation", "eval_resize") if data.get(k) is not None}
            found = cls.of(int(data["image_size"]), data.get("resize_size"), **stored)
            log.warning(
                "%s predates stored preprocessing: using its data settings (image_size=%d, resize_size=%d) and its "
                "normalisation (ImageNet's, bilinear, unless recorded).",
                path,
                found.image_size,
                found.resize_size,
            )
            return found
        log.warning("%s records no preprocessing: assuming image_size=224, resize_size=256, ImageNet mean/std.", path)
        return cls.of(224, None)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    def transform(self) -> v2.Compose:
        """The eval transform that reproduces this preprocessing (refused when this version cannot)."""
        try:
            transform = eval_transform(
                self.image_size, self.resize_size, self.mean, self.std, self.interpolation, self.eval_resize
            )
        except ValueError as err:  # e.g. an interpolation this version does not know
            raise CheckpointError(f"The checkpoint's preprocessing {self} cannot be reproduced: {err}") from err
        actual = Preprocessing.of_transform(transform)
        if not _same(actual, self):
            raise CheckpointError(
                f"The checkpoint was preprocessed with {self}, but this version's eval transform gives {actual}: "
                "predictions would not match what the model was trained and tested on."
            )
        return transform


def _same(a: Preprocessing, b: Preprocessing) -> bool:
    close = all(abs(x - y) < 1e-6 for x, y in zip(a.mean + a.std, b.mean + b.std, strict=True))
    geometry = ("image_size", "resize_size", "interpolation", "eval_resize")
    return close and all(getattr(a, key) == getattr(b, key) for key in geometry)


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


def describe_data(datamodule: Any) -> dict[str, Any] | None:
    """``{"classes": [...], "preprocessing": {...}}`` of an image datamodule (or the one a feature cache wraps)."""
    images = getattr(datamodule, "images", datamodule)
    classes = list(getattr(images, "classes", None) or [])
    if callable(getattr(images, "eval_transform", None)):  # the transform val/test actually used
        preprocessing = Preprocessing.of_transform(images.eval_transform())
    else:
        image_size = getattr(images, "image_size", None) or (getattr(images, "hparams", None) or {}).get("image_size")
        if not image_size:
            return None
        preprocessing = Preprocessing.of(int(image_size), getattr(images, "resize_size", None))
    if not classes:
        return None
    return {CLASSES: classes, PREPROCESSING: preprocessing.to_dict()}


def load_for_inference(path: str | Path) -> tuple[FineTuneModule, dict[str, Any]]:
    """The model in a checkpoint file, in eval mode on the CPU, and the checkpoint itself.

    Loaded with ``weights_only=True`` (see :func:`finetune.checkpoint.load_checkpoint`). ``weights=None``: the
    checkpoint holds every weight, so nothing is fetched first. ``cache_features=False``: a model trained on cached
    features takes images (its frozen backbone is in the checkpoint).
    """
    from finetune.module import FineTuneModule  # here, not at the top: the module imports this file's metadata

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
