"""The eval preprocessing as one record: built once from the data settings, the eval transform derived from it.

The DataModule builds its :class:`Preprocessing` from ``data.*``; every checkpoint stores it (key
``preprocessing``, beside the class names under ``classes``), and evaluate, predict and export rebuild the same
transform from the stored record. Nothing reads a transform back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from torchvision.transforms import v2

from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, book_resize_size, eval_geometry, eval_transform

log = logging.getLogger(__name__)

# The checkpoint keys under which a model keeps what its data was.
CLASSES = "classes"
PREPROCESSING = "preprocessing"


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform: ``Resize`` to ``resize_size`` (square, or the shorter side: ``eval_resize``),
    ``CenterCrop`` to ``image_size``, [0, 1], normalise with ``mean`` and ``std``."""

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    eval_resize: str = "square"  # checkpoints from before the choice existed were all square

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The record's fields: the ``data.*`` settings that define the eval preprocessing."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(
        cls,
        image_size: int = 224,
        resize_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        eval_resize: str | None = None,
    ) -> Preprocessing:
        """From ``data.*`` settings; ``None`` takes the book's value (256/224 resize ratio, ImageNet, bilinear)."""
        return cls(
            image_size=int(image_size),
            resize_size=int(book_resize_size(image_size) if resize_size is None else resize_size),
            mean=tuple(float(m) for m in (IMAGENET_MEAN if mean is None else mean)),
            std=tuple(float(s) for s in (IMAGENET_STD if std is None else std)),
            interpolation=str(interpolation or "bilinear"),
            eval_resize=str(eval_resize or "square"),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        known = {key: values[key] for key in cls.keys() if values.get(key) is not None}
        return cls.of(**known)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: object = "checkpoint") -> Preprocessing:
        """The checkpoint's own record; for older checkpoints, the image size of the data it was fitted on."""
        if checkpoint.get(PREPROCESSING):
            return cls.from_dict(checkpoint[PREPROCESSING])
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        if data.get("image_size"):
            found = cls.from_dict(data)
            log.warning(
                "%s predates stored preprocessing: using its data settings (image_size=%d, resize_size=%d) and its "
                "normalisation (ImageNet's, bilinear, unless recorded).",
                path,
                found.image_size,
                found.resize_size,
            )
            return found
        log.warning("%s records no preprocessing: assuming image_size=224, resize_size=256, ImageNet mean/std.", path)
        return cls.of()

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    def transform(self) -> v2.Compose:
        """The eval transform: :meth:`geometry`, then [0, 1] and normalisation."""
        return eval_transform(
            self.image_size, self.resize_size, self.mean, self.std, self.interpolation, self.eval_resize
        )

    def geometry(self) -> v2.Compose:
        """The deterministic, pixel-changing part of :meth:`transform` (what the image cache stores)."""
        return eval_geometry(self.image_size, self.resize_size, self.interpolation, self.eval_resize)
