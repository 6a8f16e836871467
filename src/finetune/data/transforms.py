"""The book's image transforms: random-crop augmentation for training, square resize + centre crop for evaluation."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def book_resize_size(image_size: int) -> int:
    """The evaluation resize for a crop of ``image_size``: the book's 256/224 ratio (256 for 224, 439 for 384)."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int = 224) -> v2.Compose:
    """The book's training augmentation: random resized crop, horizontal flip, ImageNet normalisation."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int = 224, resize_size: int | None = None) -> v2.Compose:
    """The book's evaluation transform: a *square* resize (256x256 for 224 crops), then a centre crop."""
    return v2.Compose([*eval_geometry(image_size, resize_size).transforms, *to_normalized_tensor().transforms])


def eval_geometry(image_size: int = 224, resize_size: int | None = None) -> v2.Compose:
    """The deterministic, pixel-changing part of :func:`eval_transform` (what the image cache stores).

    ``resize_size=None`` keeps the book's ratio (:func:`book_resize_size`), so a larger crop is not cut out of a
    too-small resize.
    """
    if resize_size is None:
        resize_size = book_resize_size(image_size)
    return v2.Compose([v2.Resize([resize_size, resize_size], antialias=True), v2.CenterCrop(image_size)])


def to_normalized_tensor() -> v2.Compose:
    """uint8 image (PIL or tensor) -> float tensor in [0, 1] -> ImageNet-normalised."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
