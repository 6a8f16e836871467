"""The book's image transforms: random-crop augmentation for training, square resize + centre crop for evaluation.

Each takes the normalisation (``mean``, ``std``) and resampling (``interpolation``) of the backbone's pretrained
weights; the defaults are the book's (ImageNet mean/std, bilinear), which torchvision backbones expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.errors import SettingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's default area range, the book's augmentation
EVAL_RESIZES = ("square", "shorter_side")  # the book's squash to a square / torchvision's aspect-keeping resize
# data.augment: false (eval transform), true (the book's crop and flip), or the crop and flip then one of
# torchvision's automatic policies (TrivialAugmentWide, RandAugment, AutoAugment's ImageNet policy).
AUGMENT_POLICIES = ("trivial", "randaugment", "autoaugment")


def book_resize_size(image_size: int) -> int:
    """The evaluation resize for a crop of ``image_size``: the book's 256/224 ratio (256 for 224, 439 for 384)."""
    return round(image_size * 256 / 224)


def interpolation_mode(interpolation: str) -> InterpolationMode:
    """``"bilinear"`` | ``"bicubic"`` | ``"nearest"`` -> torchvision's ``InterpolationMode``."""
    if interpolation not in INTERPOLATIONS:
        raise SettingError(f"Unknown interpolation {interpolation!r}: choose one of {INTERPOLATIONS}.")
    return InterpolationMode(interpolation)


def train_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    crop_scale: Sequence[float] = CROP_SCALE,
    policy: str | None = None,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """The book's training augmentation: random resized crop, horizontal flip, normalisation.

    ``crop_scale``: the range of the crop's area as a fraction of the image (torchvision's and the book's
    ``(0.08, 1.0)``; a larger minimum keeps more of each photo, which small datasets often prefer).
    ``policy`` (one of :data:`AUGMENT_POLICIES`) adds a colour/geometry policy on the cropped uint8 image, and
    ``random_erasing`` the probability of erasing a random rectangle of the normalised tensor (timm's recipe order).
    """
    mode = interpolation_mode(interpolation)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
            *([augment_policy(policy, mode)] if policy else []),
            *to_normalized_tensor(mean, std).transforms,
            *([v2.RandomErasing(p=random_erasing, value=0)] if random_erasing else []),
        ]
    )


def augment_policy(policy: str, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> v2.Transform:
    """torchvision's automatic augmentation ``policy`` (``trivial`` | ``randaugment`` | ``autoaugment``)."""
    if policy == "trivial":
        return v2.TrivialAugmentWide(interpolation=interpolation)
    if policy == "randaugment":
        return v2.RandAugment(interpolation=interpolation)
    if policy == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    raise SettingError(f"Unknown augmentation policy {policy!r}: choose one of {AUGMENT_POLICIES}.")


def eval_transform(
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    eval_resize: str = "square",
) -> v2.Compose:
    """The book's evaluation transform: a *square* resize (256x256 for 224 crops), then a centre crop.

    ``eval_resize="shorter_side"`` resizes the shorter side to ``resize_size`` and keeps the aspect ratio instead
    (torchvision's ImageNet evaluation): the square resize squashes every non-square photo, so the squash itself
    becomes a feature, and where the photos' shapes differ by class (they do on the Kaggle hot dog set) a model can
    read the label from the shape.
    """
    geometry = eval_geometry(image_size, resize_size, interpolation, eval_resize)
    return v2.Compose([*geometry.transforms, *to_normalized_tensor(mean, std).transforms])


def eval_geometry(
    image_size: int = 224,
    resize_size: int | None = None,
    interpolation: str = "bilinear",
    eval_resize: str = "square",
) -> v2.Compose:
    """The deterministic, pixel-changing part of :func:`eval_transform` (what the image cache stores).

    ``resize_size=None`` keeps the book's ratio (:func:`book_resize_size`), so a larger crop is not cut out of a
    too-small resize.
    """
    if resize_size is None:
        resize_size = book_resize_size(image_size)
    if eval_resize not in EVAL_RESIZES:
        raise SettingError(f"Unknown eval_resize {eval_resize!r}: choose one of {EVAL_RESIZES}.")
    size = [resize_size, resize_size] if eval_resize == "square" else resize_size
    resize = v2.Resize(size, interpolation=interpolation_mode(interpolation), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(image_size)])


def to_normalized_tensor(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 image (PIL or tensor) -> float tensor in [0, 1] -> normalised with ``mean`` and ``std``."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
