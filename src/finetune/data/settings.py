"""Checks of single ``data.*`` settings, called by ``ImageFolderDataModule._check_settings`` with their config names."""

from __future__ import annotations

from finetune.data.transforms import INTERPOLATIONS


def check_int(key: str, value: object, minimum: int | None, meaning: str) -> None:
    """``data.<key>`` must be a whole number (not a bool or a float), at least ``minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"data.{key} must be {bound} ({meaning}), got {value!r}.")


def check_channels(key: str, value: object, positive: bool) -> None:
    """``data.mean`` / ``data.std``: three numbers, one per RGB channel (std > 0: it divides)."""
    numbers = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not numbers or (positive and min(value) <= 0):
        rule = "three positive numbers" if positive else "three numbers"
        raise ValueError(
            f"data.{key} must be {rule} (one per RGB channel of images in [0, 1]), got {value!r}. Leave it null for "
            "the backbone's pretrained normalisation (ImageNet's for torchvision backbones, e.g. 0.5 for timm ViTs)."
        )


def check_interpolation(value: object) -> None:
    if value not in INTERPOLATIONS:
        raise ValueError(
            f"Unknown data.interpolation={value!r}: choose one of {INTERPOLATIONS}, or null for the backbone's "
            "pretrained resampling (bilinear for torchvision backbones, often bicubic for timm)."
        )


def check_crop_scale(value: object) -> None:
    """``data.crop_scale``: the random crop's area range ``[min, max]``, fractions of the image, 0 < min <= max <= 1."""
    numbers = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not numbers or not 0 < value[0] <= value[1] <= 1:
        raise ValueError(
            f"data.crop_scale must be [min, max] with 0 < min <= max <= 1 (the random crop's area as a fraction of "
            f"the image), got {value!r}. The book's is [0.08, 1.0]; [0.35, 1.0] keeps more of each photo."
        )


EVAL_RESIZE_MEANING = (
    "square squashes each photo to resize_size x resize_size, the book's; shorter_side keeps its aspect ratio, "
    "torchvision's ImageNet evaluation"
)


def check_choice(key: str, value: object, choices: tuple[str, ...], meaning: str) -> None:
    if value not in choices:
        raise ValueError(f"data.{key} must be one of {', '.join(choices)} ({meaning}), got {value!r}.")
