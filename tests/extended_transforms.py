"""``finetune.data.transforms.train_transform`` as a researcher extends it with a new augmentation setting: one
argument, its check and its branch (``color_jitter``), the rest unchanged. ``tests/test_extending.py`` points
``data.augmentation._target_`` here instead of editing the package's own file."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.transforms import v2

from finetune.checks import check_number
from finetune.data import transforms


def train_transform(
    image_size: int,
    mean: Sequence[float] = transforms.IMAGENET_MEAN,
    std: Sequence[float] = transforms.IMAGENET_STD,
    interpolation: str = "bilinear",
    crop_scale: Sequence[float] = transforms.CROP_SCALE,
    policy: str | None = None,
    random_erasing: float = 0.0,
    zoom_out: float | None = None,
    color_jitter: float = 0.0,
) -> v2.Compose:
    """The package's training transform, with ``color_jitter``: brightness, contrast and saturation jitter."""
    check_number("data.augmentation.color_jitter", color_jitter, "in [0, 1]", lambda x: 0 <= x <= 1, "e.g. 0.4.")
    steps = transforms.train_transform(
        image_size, mean, std, interpolation, crop_scale, policy, random_erasing, zoom_out
    ).transforms
    if not color_jitter:
        return v2.Compose(steps)
    jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
    after = next(i for i, step in enumerate(steps) if isinstance(step, v2.RandomHorizontalFlip)) + 1
    return v2.Compose([*steps[:after], jitter, *steps[after:]])  # after the crop and flip
