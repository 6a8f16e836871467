"""The image transforms: the book's random-crop augmentation for training, and the eval preprocessing as a record.

The training transform is one function with one branch per augmentation (torchvision's ``presets.py`` style),
configured as ``data.augmentation`` (``conf/data/folder.yaml``): a new augmentation setting is an argument, its
check and its branch here, and its default in that file. The eval preprocessing is one frozen
:class:`Preprocessing`: the DataModule builds it from ``data.*``, every checkpoint stores it (key ``preprocessing``,
beside the class names under ``classes``), and evaluate, predict and export rebuild the same transform from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.checks import check_number, numbers
from finetune.errors import SettingError

BOOK_IMAGE_SIZE = 224  # the book's crop (ImageNet's evaluation size), resized from 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's default area range, the book's augmentation
EVAL_RESIZES = ("square", "shorter_side")  # the book's squash to a square / torchvision's aspect-keeping resize
# data.augmentation.policy: after the crop and flip, one of torchvision's automatic policies (TrivialAugmentWide,
# RandAugment, AutoAugment's ImageNet policy), or null for none.
AUGMENT_POLICIES = ("trivial", "randaugment", "autoaugment")
# The checkpoint keys under which a model keeps what its data was.
CLASSES = "classes"
PREPROCESSING = "preprocessing"


def book_resize_size(image_size: int) -> int:
    """The evaluation resize for a crop of ``image_size``: the book's 256/224 ratio (256 for 224, 439 for 384)."""
    return round(image_size * 256 / BOOK_IMAGE_SIZE)


def interpolation_mode(interpolation: str) -> InterpolationMode:
    if interpolation not in INTERPOLATIONS:
        raise SettingError(f"Unknown interpolation {interpolation!r}: choose one of {INTERPOLATIONS}.")
    return InterpolationMode(interpolation)


def train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    crop_scale: Sequence[float] = CROP_SCALE,
    policy: str | None = None,
    random_erasing: float = 0.0,
    zoom_out: float | None = None,
) -> v2.Compose:
    """The book's training augmentation: a random resized crop of ``crop_scale`` of the area (the book's and
    torchvision's ``(0.08, 1.0)``; a larger minimum keeps more of each photo), a horizontal flip, normalisation.
    ``policy`` adds a torchvision policy on the cropped uint8 image, ``random_erasing`` erases a random rectangle of
    the normalised tensor with that probability (timm's recipe order). ``zoom_out`` (> 1), before the crop: half
    of the photos are placed at a random spot of a canvas up to ``zoom_out`` times their width and height, filled
    with the mean colour (torchvision's ``RandomZoomOut``), so that objects are also seen small and off-centre.
    The size, normalisation and resampling are the eval preprocessing's (the DataModule passes them); the rest are
    ``data.augmentation.*``."""
    if not (numbers(crop_scale, 2) and 0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise SettingError(
            f"data.augmentation.crop_scale must be [min, max] with 0 < min <= max <= 1 (the random crop's area as a "
            f"fraction of the image), got {crop_scale!r}. The book's is [0.08, 1.0]; [0.35, 1.0] keeps more of "
            "each photo."
        )
    if policy is not None and policy not in AUGMENT_POLICIES:
        raise SettingError(
            f"data.augmentation.policy must be null or one of {', '.join(AUGMENT_POLICIES)} (a torchvision policy "
            f"after the crop and flip), got {policy!r}."
        )
    advice = "It is the probability of erasing a random rectangle of each training image (0: never; timm uses 0.25)."
    check_number("data.augmentation.random_erasing", random_erasing, "in [0, 1]", lambda x: 0 <= x <= 1, advice)
    if zoom_out is not None:
        advice = "It is the largest canvas side as a multiple of the photo's (null: none; 2 to 4 shrinks objects)."
        check_number("data.augmentation.zoom_out", zoom_out, "a number > 1 or null", lambda x: x > 1, advice)
    mode = interpolation_mode(interpolation)
    steps: list[v2.Transform] = []
    if zoom_out is not None:
        fill = tuple(round(255 * m) for m in mean)  # the mean colour: zero after normalisation
        steps.append(v2.RandomZoomOut(fill=fill, side_range=(1.0, float(zoom_out)), p=0.5))
    steps += [
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if policy == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=mode))
    elif policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=mode))
    elif policy == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode))
    steps += to_normalized_tensor(mean, std).transforms
    if random_erasing:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def to_normalized_tensor(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 image (PIL or tensor) -> float tensor in [0, 1] -> normalised with ``mean`` and ``std``."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform: ``Resize`` to ``resize_size`` (``eval_resize``: ``square``, the book's squash, or
    ``shorter_side``, the aspect kept as in torchvision's ImageNet evaluation), ``CenterCrop`` to ``image_size``,
    [0, 1], normalise with ``mean`` and ``std``.

    The square resize squashes every non-square photo, so the squash itself becomes a feature: where the photos'
    shapes differ by class (they do on the Kaggle hot dog set) a model can read the label from the shape.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    eval_resize: str = "square"

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The record's fields: the ``data.*`` settings that define the eval preprocessing."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(
        cls,
        image_size: int,
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
        return cls.of(**{key: values[key] for key in cls.keys() if values.get(key) is not None})

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    def geometry(self) -> v2.Compose:
        """The deterministic, pixel-changing part of :meth:`transform` (what the image cache stores)."""
        if self.eval_resize not in EVAL_RESIZES:
            raise SettingError(f"Unknown eval_resize {self.eval_resize!r}: choose one of {EVAL_RESIZES}.")
        size = [self.resize_size] * 2 if self.eval_resize == "square" else self.resize_size
        resize = v2.Resize(size, interpolation=interpolation_mode(self.interpolation), antialias=True)
        return v2.Compose([resize, v2.CenterCrop(self.image_size)])

    def transform(self) -> v2.Compose:
        """The eval transform: :meth:`geometry`, then [0, 1] and normalisation."""
        return v2.Compose([*self.geometry().transforms, *to_normalized_tensor(self.mean, self.std).transforms])


def eval_transform(image_size: int, resize_size: int | None = None, **settings: Any) -> v2.Compose:
    """The eval transform of :class:`Preprocessing` for these settings (the book's: 256x256 then a 224 crop)."""
    return Preprocessing.of(image_size, resize_size, **settings).transform()
