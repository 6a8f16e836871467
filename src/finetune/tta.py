"""Test-time views (``tta=flip|five_crop|full`` of ``finetune.evaluate`` / ``predict``): several views of each
photo, whose probabilities the scorer averages (:class:`finetune.scoring.Scorer`).

``flip``: the centre crop and its mirror image; ``five_crop``: the corners and centre of the resized photo; ``full``:
the centre crop and the whole photo letterboxed into the square, each with its mirror image. A dataset transform
gives each photo as a ``(V, C, H, W)`` tensor, so a batch is ``(N, V, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.data.transforms import Preprocessing, interpolation_mode, to_normalized_tensor
from finetune.errors import SettingError

TTA_MODES = ("none", "flip", "five_crop", "full")


def views_transform(preprocessing: Preprocessing, tta: str) -> v2.Transform | None:
    """The dataset transform that gives the ``tta`` views of a photo; ``None`` for ``none`` (the plain transform)."""
    if tta not in TTA_MODES:
        raise SettingError(f"Unknown tta={tta!r}: choose one of {TTA_MODES}.")
    return None if tta == "none" else TestViews(preprocessing, tta)


def average_views(logits_of: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor) -> torch.Tensor:
    """The log of the mean of the views' probabilities (a softmax turns it back into that mean), for ``(N, V, ...)``."""
    count, num = views.shape[:2]
    probs = logits_of(views.flatten(0, 1)).float().softmax(dim=-1).view(count, num, -1).mean(dim=1)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class TestViews(torch.nn.Module):
    """The ``flip``, ``five_crop`` or ``full`` views of one photo as a ``(V, C, H, W)`` tensor."""

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
