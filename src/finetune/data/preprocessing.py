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

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    book_resize_size,
    eval_geometry,
    eval_transform,
    interpolation_mode,
    to_normalized_tensor,
)
from finetune.errors import SettingError

log = logging.getLogger(__name__)

# The checkpoint keys under which a model keeps what its data was.
CLASSES = "classes"
PREPROCESSING = "preprocessing"
# Test-time views (tta=...): none, the centre crop and its mirror image, five crops of the resized photo (corners and
# centre), or "full": the centre crop and the whole photo letterboxed into the square, each with its mirror image.
TTA_MODES = ("none", "flip", "five_crop", "full")


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

    def views(self, tta: str) -> v2.Transform:
        """The ``tta`` views of one image as a ``(V, C, H, W)`` tensor (``none``: the plain ``(C, H, W)`` transform).

        A model averages its probabilities over the views (:meth:`finetune.module.FineTuneModule.forward`).
        """
        if tta not in TTA_MODES:
            raise SettingError(f"Unknown tta={tta!r}: choose one of {TTA_MODES}.")
        if tta == "none":
            return self.transform()
        return TestViews(self, tta)


class TestViews(torch.nn.Module):
    """:meth:`Preprocessing.views` for ``flip``, ``five_crop`` and ``full``."""

    def __init__(self, preprocessing: Preprocessing, tta: str) -> None:
        super().__init__()
        self.preprocessing, self.tta = preprocessing, tta
        self.normalize = to_normalized_tensor(preprocessing.mean, preprocessing.std)

    def forward(self, image: Any) -> torch.Tensor:
        p = self.preprocessing
        centre = self.normalize(p.geometry()(image))
        if self.tta == "flip":
            return torch.stack([centre, centre.flip(-1)])
        mode = interpolation_mode(p.interpolation)
        if self.tta == "five_crop":
            size = [p.resize_size, p.resize_size] if p.eval_resize == "square" else p.resize_size
            resized = v2.Resize(size, interpolation=mode, antialias=True)(image)
            return torch.stack([self.normalize(crop) for crop in F.five_crop(resized, [p.image_size, p.image_size])])
        whole = self.normalize(letterbox(image, p.image_size, p.mean, mode))
        return torch.stack([centre, centre.flip(-1), whole, whole.flip(-1)])


def letterbox(image: Any, size: int, mean: Sequence[float], interpolation: Any) -> Any:
    """The whole photo in a ``size`` x ``size`` square: longer side to ``size``, padded with the mean colour (which
    normalises to 0) on both sides of the shorter one."""
    width, height = F.get_size(image)[::-1]
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = F.resize(image, [new_h, new_w], interpolation=interpolation, antialias=True)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    fill = [round(255 * m) for m in mean]
    return F.pad(resized, [left, top, size - new_w - left, size - new_h - top], fill=fill)
