"""The ``data.*`` settings, checked by their config names before any image is read
(``ImageFolderDataModule.check_settings``)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

from pytorch_lightning.utilities.parsing import AttributeDict

from finetune.checks import check_choice, check_int, numbers
from finetune.data.cache import CACHE_MODES
from finetune.data.device_augment import AUGMENT_ON, RESAMPLING
from finetune.data.loading import AUTO
from finetune.data.sampling import check_sampler
from finetune.data.transforms import EVAL_RESIZES, INTERPOLATIONS, book_resize_size, train_transform
from finetune.data.verify import DUPLICATES
from finetune.errors import SettingError


# --- data.* ---------------------------------------------------------------------------------------------------------
def check_channels(key: str, value: object, positive: bool) -> None:
    """``data.mean`` / ``data.std``: three numbers, one per RGB channel (std > 0: it divides)."""
    if not numbers(value, 3) or (positive and min(value) <= 0):
        rule = "three positive numbers" if positive else "three numbers"
        raise SettingError(
            f"data.{key} must be {rule} (one per RGB channel of images in [0, 1]), got {value!r}. Leave it null for "
            "the backbone's pretrained normalisation (ImageNet's for torchvision backbones, e.g. 0.5 for timm ViTs)."
        )


def check_interpolation(value: object) -> None:
    if value not in INTERPOLATIONS:
        raise SettingError(
            f"Unknown data.interpolation={value!r}: choose one of {INTERPOLATIONS}, or null for the backbone's "
            "pretrained resampling (bilinear for torchvision backbones, often bicubic for timm)."
        )


EVAL_RESIZE_MEANING = (
    "square squashes each photo to resize_size x resize_size, the book's; shorter_side keeps its aspect ratio, "
    "torchvision's ImageNet evaluation"
)


# The smallest data.image_size: the total stride of the CNN backbones (ResNet, MobileNet, EfficientNet, ConvNeXt,
# RegNet, DenseNet, VGG: five halvings). Below it every stage past the fifth sees a 1x1 map of mostly zero padding.
MIN_IMAGE_SIZE = 32

# The data.* settings that only shape training and validation: evaluation (test_only) ignores them.
TRAIN_ONLY_DATA_KEYS = (
    "val_fraction",
    "split_seed",
    "folds",
    "fold",
    "shots",
    "shot_seed",
    "sampler",
    "augmentation",
    "augment_on",
    "device_resampling",
    "cache_short_side",
)


def check_data_settings(settings: Mapping[str, Any]) -> None:
    """``data.*``, every argument of the DataModule (the assembly fills the backbone's preprocessing into the nulls
    first)."""
    hp = AttributeDict(settings)
    if isinstance(settings.get("root"), str) and not settings["root"].strip():
        raise SettingError(  # Path("") is the current folder: the error would be about the wrong folder
            "data.root is empty: set data.root=PATH, a folder holding train/<class>/ and test/<class>/ image folders."
        )
    hp.setdefault("image_size", None)
    if hp.image_size is not None:
        check_int("data.image_size", hp.image_size, 1, "the side of the square crop in pixels; the book uses 224")
        if hp.image_size < MIN_IMAGE_SIZE:
            raise SettingError(
                f"data.image_size={hp.image_size} is below {MIN_IMAGE_SIZE} pixels: the backbones halve the image "
                f"five times (a total stride of {MIN_IMAGE_SIZE}), so their last stages would see one pixel made "
                "mostly of zero padding, and some (AlexNet, VGG) fail outright. Use data.image_size >= 32 (smaller "
                "photos are scaled up by the crop), or null for the backbone's pretrained size (224 for torchvision "
                "backbones)."
            )
    if hp.resize_size is not None:
        check_int("data.resize_size", hp.resize_size, 1, "the resize before the centre crop, or null")
        if hp.image_size is not None and hp.resize_size < hp.image_size:
            raise SettingError(
                f"data.resize_size={hp.resize_size} is smaller than data.image_size={hp.image_size}: the centre "
                "crop would pad the resized image with black borders. Use data.resize_size >= data.image_size, "
                f"or null for the book's ratio (round(image_size * 256 / 224) = {book_resize_size(hp.image_size)})."
            )
    if hp.mean is not None:
        check_channels("mean", hp.mean, positive=False)
    if hp.std is not None:
        check_channels("std", hp.std, positive=True)
    if hp.interpolation is not None:
        check_interpolation(hp.interpolation)
    check_choice("data.eval_resize", hp.eval_resize, EVAL_RESIZES, EVAL_RESIZE_MEANING)
    check_int("data.batch_size", hp.batch_size, 1, "images per device and step")
    if hp.num_workers != AUTO:
        check_int("data.num_workers", hp.num_workers, 0, "loader processes, 0 loads in the main process; or auto")
    if hp.augment_on not in AUGMENT_ON:
        raise SettingError(
            f"Unknown data.augment_on={hp.augment_on!r}: choose one of {AUGMENT_ON} (loader: crop and flip in "
            "the loader workers; device: on the model's device, after the transfer)."
        )
    if hp.device_resampling not in RESAMPLING:
        raise SettingError(
            f"Unknown data.device_resampling={hp.device_resampling!r}: choose one of {RESAMPLING} (auto: one "
            "roi_align call per batch on accelerators, torchvision's per-image resize on CPUs)."
        )
    check_int("data.split_seed", hp.split_seed, None, "the seed of the train/val split")
    if isinstance(hp.val_fraction, bool) or not isinstance(hp.val_fraction, int | float):
        raise SettingError(f"data.val_fraction must be a number, got {hp.val_fraction!r}.")
    if not 0.0 < hp.val_fraction < 1.0:
        raise SettingError(
            f"data.val_fraction must be strictly between 0 and 1, got {hp.val_fraction}: the validation split, "
            "carved from train, selects the checkpoint that is tested (the best val/acc), so it can be neither "
            "empty nor all of train. The book-sized default is data.val_fraction=0.1."
        )
    check_choice(
        "data.duplicates", hp.duplicates, DUPLICATES, "byte-identical images in train and test, or in two classes"
    )
    for key in ("skip_corrupt", "verify_images"):
        if not isinstance(hp[key], bool):
            raise SettingError(f"data.{key} must be true or false, got {hp[key]!r}.")
    check_augmentation(hp.augmentation, hp.augment_on)
    if hp.download is not None and not (
        isinstance(hp.download, Mapping)
        and isinstance(hp.download.get("url"), str)
        and re.fullmatch(r"[0-9a-fA-F]{40}", str(hp.download.get("sha1")))
    ):
        raise SettingError(
            f"data.download must be null or a mapping with a url and the archive's sha1 (40 hex digits), got "
            f"{hp.download!r}. Use data=folder data.download=null for a folder that is already on disk."
        )
    if hp.cache not in CACHE_MODES:
        raise SettingError(f"Unknown data.cache={hp.cache!r}: choose one of {CACHE_MODES}.")
    if hp.cache_short_side is not None:
        check_int("data.cache_short_side", hp.cache_short_side, 1, "the shorter side of cached training images")
        if hp.cache_short_side < hp.image_size:
            raise SettingError(
                f"data.cache_short_side={hp.cache_short_side} is below data.image_size={hp.image_size}: cached "
                "images would be upsampled for every crop. Use a value >= image_size, or null to keep the "
                "original size."
            )
    _check_folds(hp.folds, hp.fold)
    if hp.get("shots") is not None:
        check_int("data.shots", hp.shots, 1, "training images kept per class (few-shot); null keeps them all")
    check_int("data.shot_seed", hp.get("shot_seed", 0), None, "the seed of the few-shot draw")
    check_sampler(hp.get("sampler"))
    if hp.cache == "disk" and hp.cache_dir is None:
        raise SettingError("data.cache=disk needs data.cache_dir: a writable folder for the decoded images.")


def _check_folds(folds: object, fold: object) -> None:
    if folds is None:
        if fold is not None:
            raise SettingError(f"data.fold={fold} needs data.folds=K (the number of folds), which is null.")
        return
    check_int("data.folds", folds, 2, "the number of stratified folds of train; null for data.val_fraction")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise SettingError(
            f"data.fold must be an integer in [0, {folds}) with data.folds={folds} (the fold that validates), "
            f"got {fold!r}. Sweep every fold: data.fold={','.join(str(i) for i in range(folds))}."
        )


def check_augmentation(augmentation: Any, augment_on: str) -> None:
    """``data.augmentation`` (null: the eval transform): a transform is built from it, which checks its own settings
    (:func:`~finetune.data.transforms.train_transform`); policies, erasing and zooming out only run on the loader
    path."""
    if augmentation is None:
        return
    settings = dict(augmentation.keywords if isinstance(augmentation, partial) else augmentation)
    target = settings.pop("_target_", None)
    settings.pop("_partial_", None)
    build = train_transform
    if target is not None and target != f"{train_transform.__module__}.{train_transform.__name__}":
        module, _, name = str(target).rpartition(".")
        build = getattr(importlib.import_module(module), name)  # a researcher's own transform checks itself too
    build(64, **settings)  # raises SettingError naming data.augmentation.<key>
    loader_only = ("policy", "random_erasing", "zoom_out")
    extra = [f"data.augmentation.{key}={settings[key]}" for key in loader_only if settings.get(key)]
    if augment_on == "device" and extra:
        raise SettingError(
            f"{' and '.join(extra)} run in the loader: data.augment_on=device only does the book's crop and flip. "
            "Use data.augment_on=loader, or leave them out."
        )
