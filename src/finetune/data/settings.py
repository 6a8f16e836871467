"""The checks of the ``data.*`` settings, by config name: ``check_data_settings`` runs them all for the DataModule."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pytorch_lightning.utilities.parsing import AttributeDict

from finetune.data.cache import CACHE_MODES
from finetune.data.device_augment import AUGMENT_ON, RESAMPLING
from finetune.data.loading import AUTO
from finetune.data.transforms import EVAL_RESIZES, INTERPOLATIONS, book_resize_size


def check_int(key: str, value: object, minimum: int | None, meaning: str) -> None:
    """``data.<key>`` must be a whole number (not a bool or a float), at least ``minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"data.{key} must be {bound} ({meaning}), got {value!r}.")


def check_channels(key: str, value: object, positive: bool) -> None:
    """``data.mean`` / ``data.std``: three numbers, one per RGB channel (std > 0: it divides)."""
    if not _numbers(value, 3) or (positive and min(value) <= 0):
        rule = "three positive numbers" if positive else "three numbers"
        raise ValueError(
            f"data.{key} must be {rule} (one per RGB channel of images in [0, 1]), got {value!r}. Leave it null for "
            "the backbone's pretrained normalisation (ImageNet's for torchvision backbones, e.g. 0.5 for timm ViTs)."
        )


def _numbers(value: object, count: int) -> bool:
    """``value`` is a list or tuple of ``count`` numbers (bools are not numbers here)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def check_interpolation(value: object) -> None:
    if value not in INTERPOLATIONS:
        raise ValueError(
            f"Unknown data.interpolation={value!r}: choose one of {INTERPOLATIONS}, or null for the backbone's "
            "pretrained resampling (bilinear for torchvision backbones, often bicubic for timm)."
        )


def check_crop_scale(value: object) -> None:
    """``data.crop_scale``: the random crop's area range ``[min, max]``, fractions of the image, 0 < min <= max <= 1."""
    if not _numbers(value, 2) or not 0 < value[0] <= value[1] <= 1:
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


def check_data_settings(hp: AttributeDict) -> None:
    """Refuse a bad ``data.*`` setting now, by its config name, rather than as a failure deep inside a loader or a
    run. ``hp``: the DataModule's ``hparams``."""
    check_int("image_size", hp.image_size, 1, "the side of the square crop in pixels; the book uses 224")
    if hp.resize_size is not None:
        check_int("resize_size", hp.resize_size, 1, "the resize before the centre crop, or null")
        if hp.resize_size < hp.image_size:
            raise ValueError(
                f"data.resize_size={hp.resize_size} is smaller than data.image_size={hp.image_size}: the centre "
                "crop would pad the resized image with black borders. Use data.resize_size >= data.image_size, "
                f"or null for the book's ratio (round(image_size * 256 / 224) = {book_resize_size(hp.image_size)})."
            )
    check_channels("mean", hp.mean, positive=False)
    check_channels("std", hp.std, positive=True)
    check_interpolation(hp.interpolation)
    check_crop_scale(hp.crop_scale)
    check_choice("eval_resize", hp.eval_resize, EVAL_RESIZES, EVAL_RESIZE_MEANING)
    check_int("batch_size", hp.batch_size, 1, "images per device and step")
    if hp.num_workers != AUTO:
        check_int("num_workers", hp.num_workers, 0, "loader processes, 0 loads in the main process; or auto")
    if hp.augment_on not in AUGMENT_ON:
        raise ValueError(
            f"Unknown data.augment_on={hp.augment_on!r}: choose one of {AUGMENT_ON} (loader: crop and flip in "
            "the loader workers; device: on the model's device, after the transfer)."
        )
    if hp.device_resampling not in RESAMPLING:
        raise ValueError(
            f"Unknown data.device_resampling={hp.device_resampling!r}: choose one of {RESAMPLING} (auto: one "
            "roi_align call per batch on accelerators, torchvision's per-image resize on CPUs)."
        )
    check_int("split_seed", hp.split_seed, None, "the seed of the train/val split")
    if isinstance(hp.val_fraction, bool) or not isinstance(hp.val_fraction, int | float):
        raise ValueError(f"data.val_fraction must be a number, got {hp.val_fraction!r}.")
    if not 0.0 < hp.val_fraction < 1.0:
        raise ValueError(
            f"data.val_fraction must be strictly between 0 and 1, got {hp.val_fraction}: the validation split, "
            "carved from train, selects the checkpoint that is tested (the best val/acc), so it can be neither "
            "empty nor all of train. The book-sized default is data.val_fraction=0.1."
        )
    for key in ("skip_corrupt", "verify_images", "augment"):
        if not isinstance(hp[key], bool):
            raise ValueError(f"data.{key} must be true or false, got {hp[key]!r}.")
    if hp.download is not None and not (
        isinstance(hp.download, Mapping)
        and isinstance(hp.download.get("url"), str)
        and re.fullmatch(r"[0-9a-fA-F]{40}", str(hp.download.get("sha1")))
    ):
        raise ValueError(
            f"data.download must be null or a mapping with a url and the archive's sha1 (40 hex digits), got "
            f"{hp.download!r}. Use data=folder data.download=null for a folder that is already on disk."
        )
    if hp.cache not in CACHE_MODES:
        raise ValueError(f"Unknown data.cache={hp.cache!r}: choose one of {CACHE_MODES}.")
    if hp.cache_short_side is not None:
        check_int("cache_short_side", hp.cache_short_side, 1, "the shorter side of cached training images")
        if hp.cache_short_side < hp.image_size:
            raise ValueError(
                f"data.cache_short_side={hp.cache_short_side} is below data.image_size={hp.image_size}: cached "
                "images would be upsampled for every crop. Use a value >= image_size, or null to keep the "
                "original size."
            )
    _check_folds(hp.folds, hp.fold)
    if hp.cache == "disk" and hp.cache_dir is None:
        raise ValueError("data.cache=disk needs data.cache_dir: a writable folder for the decoded images.")


def _check_folds(folds: object, fold: object) -> None:
    if folds is None:
        if fold is not None:
            raise ValueError(f"data.fold={fold} needs data.folds=K (the number of folds), which is null.")
        return
    check_int("folds", folds, 2, "the number of stratified folds of train; null for data.val_fraction")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(
            f"data.fold must be an integer in [0, {folds}) with data.folds={folds} (the fold that validates), "
            f"got {fold!r}. Sweep every fold: data.fold={','.join(str(i) for i in range(folds))}."
        )
