"""Every setting checked in one place, by its config name, once per run (``finetune.run.assemble`` calls
:func:`check_run_settings`): a bad value fails at once with what to set, not deep inside a loader or a fit, and the
objects built from the settings trust them.

Torch and Lightning accept values that train nothing (``lr=0``, ``max_epochs=0``) or fail without naming the
setting (``Invalid learning rate: -0.1``); these rules say which ``data.*``, ``model.*``, ``optimizer.*`` or
``trainer.*`` setting is wrong and a value that works.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.parsing import AttributeDict

from finetune.data.cache import CACHE_MODES
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.device_augment import AUGMENT_ON, RESAMPLING
from finetune.data.folders import DUPLICATES
from finetune.data.loading import AUTO
from finetune.data.transforms import AUGMENT_POLICIES, EVAL_RESIZES, INTERPOLATIONS, book_resize_size
from finetune.errors import SettingError
from finetune.harness.distributed import check_strategy
from finetune.module import FREEZE_MODES

log = logging.getLogger(__name__)


def check_run_settings(cfg: DictConfig, model_configured: bool = True) -> None:
    """The trainer's, model's and optimizer's settings of a composed run config, before anything is built
    (``model_configured=False``: the model comes from a checkpoint). ``data.*`` is checked by
    :func:`check_data_settings` once the backbone's preprocessing has filled its nulls."""
    check_node_keys("trainer", OmegaConf.to_container(cfg.trainer, resolve=False))
    for group in ("callbacks", "logger"):
        nodes = cfg.get(group)
        for name, node in (OmegaConf.to_container(nodes, resolve=False) if nodes else {}).items():
            if isinstance(node, Mapping):
                check_node_keys(f"{group}.{name}", node)
    check_trainer_settings(cfg.trainer)
    if model_configured:
        for node in ("model", "optimizer", "scheduler"):
            if cfg.get(node) is not None:
                check_node_keys(node, OmegaConf.to_container(cfg[node], resolve=False))
        check_model_settings(OmegaConf.to_container(cfg.model, resolve=True))
        check_optimizer_settings(OmegaConf.to_container(cfg.optimizer, resolve=True))
        unfreeze = OmegaConf.select(cfg, "model.unfreeze_at_epoch", default=None)
        if isinstance(unfreeze, int) and unfreeze and not cfg.trainer.get("fast_dev_run"):
            check_unfreeze_epoch(unfreeze, cfg.trainer.get("max_epochs"))


# --- numbers ------------------------------------------------------------------------------------------------------
def check_number(key: str, value: Any, rule: str, holds: Callable[[float], bool], advice: str) -> None:
    """``ValueError`` naming ``key`` and ``value`` unless ``value`` is a finite real number for which ``holds``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and holds(value)):
        raise SettingError(f"{key} must be {rule}, got {value!r}. {advice}")


# --- keys that never reach the object built from their config node -------------------------------------------------
# Arguments the code passes itself when it builds a node's object: hydra's instantiate lets the call's arguments win
# over the config's, so a config key of the same name would be silently replaced (+model.num_classes=5 trained a
# 2-class head and .hydra/config.yaml recorded 5). Each is refused saying where the value comes from.
FILLED_BY_THE_CODE: dict[str, dict[str, str]] = {
    "model": {
        "num_classes": "the number of classes is the number of class folders in data.root's train/ (one output "
        "per folder), so the head always matches the data. To train on fewer classes, point data.root at a folder "
        "holding only their folders",
        "optimizer": "the optimizer is the optimizer group's (optimizer=sgd|adamw, optimizer.lr=...)",
        "scheduler": "the scheduler is the scheduler group's (scheduler=cosine|warmup, scheduler=null for none)",
    },
    "data": {
        "test_only": "the command sets it (finetune.evaluate reads only the images it scores)",
        "require_test": "test_after_fit=false sets it (a run that never tests needs no test/ folder)",
    },
    "optimizer": {"params": "the model hands the optimizer its parameter groups (model.head_lr_mult, model.freeze)"},
    "scheduler": {"optimizer": "the model hands the scheduler its optimizer"},
    "trainer": {
        "callbacks": "callbacks come from the callbacks group (+callbacks=early_stopping, "
        "callbacks=[default,lr_monitor])",
        "logger": "loggers come from the logger group (logger=tensorboard, +logger=wandb, logger=[] for none)",
        "enable_checkpointing": "checkpoints are written while callbacks.model_checkpoint is configured "
        "(~callbacks.model_checkpoint turns them off)",
    },
}
# Keys the code reads itself instead of passing them on (model.compile: torch.compile after building the model).
READ_BY_THE_CODE: dict[str, set[str]] = {"model": {"compile"}}
DATA_TARGET = f"{ImageFolderDataModule.__module__}.{ImageFolderDataModule.__qualname__}"


def check_node_keys(node: str, settings: Mapping[str, Any]) -> None:
    """Refuse a ``node.key`` that the object built from ``node`` would never see: one the code passes itself
    (:data:`FILLED_BY_THE_CODE`), or one its ``_target_`` does not take (a typo, ``+model.lr=0.1``), which
    instantiate would report as a ``TypeError`` traceback, or, for a ``_partial_`` optimizer, only once fitting starts.
    """
    group = node.split(".")[0]
    for key, source in FILLED_BY_THE_CODE.get(group, {}).items():
        if key in settings:
            raise SettingError(f"{node}.{key} cannot be set: {source}. Remove {node}.{key}={settings[key]!r}.")
    target = settings.get("_target_")
    accepted = target_arguments(target)
    if accepted is None:
        return  # takes any keyword, or cannot be imported (instantiate names it)
    known = accepted | READ_BY_THE_CODE.get(group, set())
    unknown = [key for key in settings if not str(key).startswith("_") and key not in known]
    if unknown:
        settable = sorted(known - FILLED_BY_THE_CODE.get(group, {}).keys())
        close = sorted({m for key in unknown for m in difflib.get_close_matches(str(key), settable, n=3)})
        hint = f"Did you mean {', '.join(f'{node}.{m}' for m in close)}? " if close else ""
        listing = f"Its settings: {', '.join(settable)}." if len(settable) <= 30 else "See its documentation."
        raise SettingError(
            f"{', '.join(f'{node}.{key}' for key in unknown)}: not a setting of {node} ({target} takes no argument "
            f"of that name), so it would never be used. {hint}{listing}"
        )


def target_arguments(target: Any) -> set[str] | None:
    """The keyword arguments that ``target`` (a dotted name of a class or function) takes; None when it takes any
    (``**kwargs`` all the way up) or cannot be imported. A class's ``**kwargs`` are followed to its base classes."""
    if not isinstance(target, str):
        return None
    try:
        found = get_object(target)
    except Exception:  # noqa: BLE001 - any import failure: instantiate reports it with the target's name
        return None
    names: set[str] = set()
    for owner in found.__mro__ if isinstance(found, type) else (found,):
        try:
            parameters = inspect.signature(owner.__init__ if isinstance(found, type) else owner).parameters
        except (TypeError, ValueError):
            return None
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names |= {name for name, p in parameters.items() if p.kind in kinds and name != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names
    return None


# Config nodes that a command using a trained checkpoint never reads, and why: their configs have no such node, but
# Hydra adds any +model.backbone=resnet18 (or an experiment= overlay) without a word.
UNUSED_WITH_A_CHECKPOINT = {
    "model": "the model (backbone, head, weights, freezing) is the checkpoint's",
    "optimizer": "nothing is trained",
    "scheduler": "nothing is trained",
    "data": "the images go through the checkpoint's own preprocessing (its image and resize sizes, normalisation)",
}


def check_checkpoint_command(
    cfg: DictConfig, command: str, unused: Sequence[str] = ("model", "optimizer", "scheduler")
) -> None:
    """Refuse settings that ``finetune.<command>`` (which loads a trained checkpoint) would ignore: those of the
    ``unused`` config nodes (:data:`UNUSED_WITH_A_CHECKPOINT`), e.g. ``+model.backbone=resnet18``."""
    given = [key for node in unused if node in cfg for key in _dotted_keys(node, cfg[node])]
    if given:
        reasons = "; ".join(dict.fromkeys(UNUSED_WITH_A_CHECKPOINT[key.split(".")[0]] for key in given))
        raise SettingError(
            f"finetune.{command} does not use {', '.join(given)}: {reasons} (ckpt_path). Remove them; to train "
            "another model, use finetune.train."
        )


def _dotted_keys(prefix: str, node: Any) -> list[str]:
    """The leaf keys of a config node, dotted (``model.backbone``), read without resolving interpolations."""
    tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if not isinstance(tree, Mapping) or not tree:
        return [prefix]
    return [key for name, value in tree.items() for key in _dotted_keys(f"{prefix}.{name}", value)]


# --- data.* ---------------------------------------------------------------------------------------------------------
DATA_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(ImageFolderDataModule.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def check_int(key: str, value: object, minimum: int | None, meaning: str) -> None:
    """``data.<key>`` must be a whole number (not a bool or a float), at least ``minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise SettingError(f"data.{key} must be {bound} ({meaning}), got {value!r}.")


def check_channels(key: str, value: object, positive: bool) -> None:
    """``data.mean`` / ``data.std``: three numbers, one per RGB channel (std > 0: it divides)."""
    if not _numbers(value, 3) or (positive and min(value) <= 0):
        rule = "three positive numbers" if positive else "three numbers"
        raise SettingError(
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
        raise SettingError(
            f"Unknown data.interpolation={value!r}: choose one of {INTERPOLATIONS}, or null for the backbone's "
            "pretrained resampling (bilinear for torchvision backbones, often bicubic for timm)."
        )


def check_crop_scale(value: object) -> None:
    """``data.crop_scale``: the random crop's area range ``[min, max]``, fractions of the image, 0 < min <= max <= 1."""
    if not _numbers(value, 2) or not 0 < value[0] <= value[1] <= 1:
        raise SettingError(
            f"data.crop_scale must be [min, max] with 0 < min <= max <= 1 (the random crop's area as a fraction of "
            f"the image), got {value!r}. The book's is [0.08, 1.0]; [0.35, 1.0] keeps more of each photo."
        )


EVAL_RESIZE_MEANING = (
    "square squashes each photo to resize_size x resize_size, the book's; shorter_side keeps its aspect ratio, "
    "torchvision's ImageNet evaluation"
)


def check_choice(key: str, value: object, choices: tuple[str, ...], meaning: str) -> None:
    if value not in choices:
        raise SettingError(f"data.{key} must be one of {', '.join(choices)} ({meaning}), got {value!r}.")


# The data.* settings that only shape training and validation: evaluation (test_only) ignores them.
TRAIN_ONLY_DATA_KEYS = (
    "val_fraction",
    "split_seed",
    "folds",
    "fold",
    "augment",
    "random_erasing",
    "crop_scale",
    "augment_on",
    "device_resampling",
    "cache_short_side",
)


# The smallest data.image_size: the total stride of the CNN backbones (ResNet, MobileNet, EfficientNet, ConvNeXt,
# RegNet, DenseNet, VGG: five halvings). Below it every stage past the fifth sees a 1x1 map of mostly zero padding.
MIN_IMAGE_SIZE = 32


def check_pretrained_size(image_size: int, backbone: str, weights: Any, pretrained_size: int) -> None:
    """Warn when pretrained weights will see crops under half the size they were pretrained at.

    A fine-tuned network adapts to a moderately different resolution, but under half of it every object appears at
    under half the scale the pretrained filters learnt, and a stride-32 network's last map shrinks from 7x7 (224)
    to 4x4 or less, and the transfer from pretraining weakens: a linear probe of frozen ImageNet MobileNetV2 features
    on the Kaggle hot dog photos (500 test images) scored 0.884 at 224, 0.882 at 160, 0.846 at 112, 0.790 at 64 and
    0.708 at 32. Small crops can be the point of an experiment (speed), hence a warning, not an error. Random
    weights (``model.weights=null``) have no size of their own.
    """
    if weights is not None and image_size * 2 < pretrained_size:
        log.warning(
            "data.image_size=%d is under half the size %s's pretrained weights were trained at (%d): they see every "
            "object at under half the scale they learnt, and transfer less. Use data.image_size=null (%d), or at "
            "least %d, unless small crops are the point.",
            image_size,
            backbone,
            pretrained_size,
            pretrained_size,
            (pretrained_size + 1) // 2,
        )


def check_data_settings(settings: Mapping[str, Any], test_only: bool = False) -> None:
    """``data.*``: the DataModule's arguments, those not given taking its defaults (null mean, std, interpolation
    and image size: the backbone's, or ImageNet's, bilinear and 224). ``test_only`` (evaluation): the train/val
    settings (:data:`TRAIN_ONLY_DATA_KEYS`) are not used, so they are not checked either."""
    check_node_keys("data", {"_target_": DATA_TARGET, **settings})
    ignored = ("_target_", *TRAIN_ONLY_DATA_KEYS) if test_only else ("_target_",)
    hp = AttributeDict({**DATA_DEFAULTS, **{k: v for k, v in settings.items() if k not in ignored}})
    if isinstance(settings.get("root"), str) and not settings["root"].strip():
        raise SettingError(  # Path("") is the current folder: the error would be about the wrong folder
            "data.root is empty: set data.root=PATH, a folder holding train/<class>/ and test/<class>/ image folders."
        )
    hp.image_size = 224 if hp.image_size is None else hp.image_size
    check_int("image_size", hp.image_size, 1, "the side of the square crop in pixels; the book uses 224")
    if hp.image_size < MIN_IMAGE_SIZE:
        raise SettingError(
            f"data.image_size={hp.image_size} is below {MIN_IMAGE_SIZE} pixels: the backbones halve the image five "
            f"times (a total stride of {MIN_IMAGE_SIZE}), so their last stages would see one pixel made mostly of "
            "zero padding, and some (AlexNet, VGG) fail outright. Use data.image_size >= 32 (smaller photos are "
            "scaled up by the crop), or null for the backbone's pretrained size (224 for torchvision backbones)."
        )
    if hp.resize_size is not None:
        check_int("resize_size", hp.resize_size, 1, "the resize before the centre crop, or null")
        if hp.resize_size < hp.image_size:
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
    check_crop_scale(hp.crop_scale)
    check_choice("eval_resize", hp.eval_resize, EVAL_RESIZES, EVAL_RESIZE_MEANING)
    check_int("batch_size", hp.batch_size, 1, "images per device and step")
    if hp.num_workers != AUTO:
        check_int("num_workers", hp.num_workers, 0, "loader processes, 0 loads in the main process; or auto")
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
    check_int("split_seed", hp.split_seed, None, "the seed of the train/val split")
    if isinstance(hp.val_fraction, bool) or not isinstance(hp.val_fraction, int | float):
        raise SettingError(f"data.val_fraction must be a number, got {hp.val_fraction!r}.")
    if not 0.0 < hp.val_fraction < 1.0:
        raise SettingError(
            f"data.val_fraction must be strictly between 0 and 1, got {hp.val_fraction}: the validation split, "
            "carved from train, selects the checkpoint that is tested (the best val/acc), so it can be neither "
            "empty nor all of train. The book-sized default is data.val_fraction=0.1."
        )
    check_choice("duplicates", hp.duplicates, DUPLICATES, "byte-identical images in train and test, or in two classes")
    for key in ("skip_corrupt", "verify_images"):
        if not isinstance(hp[key], bool):
            raise SettingError(f"data.{key} must be true or false, got {hp[key]!r}.")
    check_augment(hp.augment, hp.get("random_erasing", 0.0), hp.augment_on)
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
        check_int("cache_short_side", hp.cache_short_side, 1, "the shorter side of cached training images")
        if hp.cache_short_side < hp.image_size:
            raise SettingError(
                f"data.cache_short_side={hp.cache_short_side} is below data.image_size={hp.image_size}: cached "
                "images would be upsampled for every crop. Use a value >= image_size, or null to keep the "
                "original size."
            )
    _check_folds(hp.folds, hp.fold)
    if hp.cache == "disk" and hp.cache_dir is None:
        raise SettingError("data.cache=disk needs data.cache_dir: a writable folder for the decoded images.")


def _check_folds(folds: object, fold: object) -> None:
    if folds is None:
        if fold is not None:
            raise SettingError(f"data.fold={fold} needs data.folds=K (the number of folds), which is null.")
        return
    check_int("folds", folds, 2, "the number of stratified folds of train; null for data.val_fraction")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise SettingError(
            f"data.fold must be an integer in [0, {folds}) with data.folds={folds} (the fold that validates), "
            f"got {fold!r}. Sweep every fold: data.fold={','.join(str(i) for i in range(folds))}."
        )


# --- model.* --------------------------------------------------------------------------------------------------------
def check_augment(augment: Any, random_erasing: Any, augment_on: str) -> None:
    """``data.augment`` (true, false or a policy) and ``data.random_erasing``, which only the loader path runs."""
    if not isinstance(augment, bool) and augment not in AUGMENT_POLICIES:
        raise SettingError(
            f"data.augment must be true (the book's random crop and flip), false (the eval transform) or one of "
            f"{AUGMENT_POLICIES} (the crop and flip, then that torchvision policy), got {augment!r}."
        )
    check_number(
        "data.random_erasing",
        random_erasing,
        "in [0, 1]",
        lambda x: 0 <= x <= 1,
        "It is the probability of erasing a random rectangle of each training image (0: never; timm uses 0.25).",
    )
    extra = [f"data.augment={augment}"] if isinstance(augment, str) else []
    extra += [f"data.random_erasing={random_erasing}"] if random_erasing else []
    if augment_on == "device" and augment and extra:
        raise SettingError(
            f"{' and '.join(extra)} run in the loader: data.augment_on=device only does the book's crop and flip. "
            "Use data.augment_on=loader, or data.augment=true data.random_erasing=0."
        )


def check_model_settings(model: Mapping[str, Any]) -> None:
    """``model.*``: the freezing mode and the schedules that depend on it, the head's rate multiplier, the EMA."""
    freeze = model.get("freeze", "none")
    head_lr_mult = model.get("head_lr_mult", 10.0)
    unfreeze_at_epoch = model.get("unfreeze_at_epoch", 0)
    cache_features = model.get("cache_features", False)
    ema_decay = model.get("ema_decay")
    if freeze not in FREEZE_MODES:
        raise SettingError(
            f"Unknown freeze mode {freeze!r}: model.freeze must be one of {FREEZE_MODES}. Use model.freeze=none "
            "to train every layer, or model.freeze=backbone to train the head only (experiment=frozen)."
        )
    head_advice = "It multiplies optimizer.lr for the new head: 10 (the book's fine-tuning), 1 for one rate."
    check_number("model.head_lr_mult", head_lr_mult, "> 0", lambda x: x > 0, head_advice)
    if isinstance(unfreeze_at_epoch, bool) or not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0:
        raise SettingError(
            f"model.unfreeze_at_epoch must be an integer >= 0 (0: the backbone trains from the start), "
            f"got {unfreeze_at_epoch!r}."
        )
    if unfreeze_at_epoch and freeze != "none":
        raise SettingError(
            f"model.unfreeze_at_epoch={unfreeze_at_epoch} needs model.freeze=none (got freeze={freeze!r}): "
            "a backbone frozen for the whole run never unfreezes."
        )
    if cache_features and freeze != "backbone" and not unfreeze_at_epoch:
        raise SettingError(
            f"model.cache_features=true needs model.freeze=backbone or model.unfreeze_at_epoch > 0 (got "
            f"freeze={freeze!r}): features can only be cached while the backbone does not train. Use "
            "experiment=frozen or experiment=lpft, or model.cache_features=false."
        )
    if ema_decay is not None:
        check_ema_decay(ema_decay)
    check_number(
        "model.label_smoothing",
        model.get("label_smoothing", 0.0),
        "in [0, 1)",
        lambda x: 0 <= x < 1,
        "It is the share of each training target spread evenly over the classes (0: none; 0.1 is usual).",
    )
    for key in ("mixup_alpha", "cutmix_alpha"):
        check_number(
            f"model.{key}",
            model.get(key, 0.0),
            ">= 0",
            lambda x: x >= 0,
            "It is the Beta(alpha, alpha) of the mixing share (0: off; 0.2 for mixup and 1.0 for cutmix are usual).",
        )
        if model.get(key) and cache_features:
            raise SettingError(
                f"model.{key}={model[key]} mixes training images, but model.cache_features=true trains on cached "
                f"features of unmixed images: use model.cache_features=false, or model.{key}=0."
            )


# --- optimizer.*, trainer.* ----------------------------------------------------------------------------------
def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# optimizer.<setting>: (rule, test, what to do). Torch's own errors do not name the setting ("Invalid learning rate:
# -0.1"), and it accepts lr=0, which trains nothing.
OPTIMIZER_RULES: dict[str, tuple[str, Callable[[float], bool], str]] = {
    "lr": (
        "> 0",
        lambda x: x > 0,
        "It is the backbone's learning rate (the head's is optimizer.lr x model.head_lr_mult): set a positive one, "
        "or leave optimizer.lr out to get the experiment's (README: 'What each experiment sets').",
    ),
    "weight_decay": (">= 0", lambda x: x >= 0, "Use 0 for no weight decay."),
    "momentum": ("in [0, 1)", lambda x: 0 <= x < 1, "Use 0 (the book's plain SGD) or e.g. 0.9."),
}


def check_optimizer_settings(settings: Mapping[str, Any]) -> None:
    """The optimizer config's settings (``cfg.optimizer``, resolved), checked before any optimizer is built.

    Settings the factory does not pass are left to the optimizer's own defaults.
    """
    for key, (rule, holds, advice) in OPTIMIZER_RULES.items():
        if key in settings:
            check_number(f"optimizer.{key}", settings[key], rule, holds, advice)
    betas = settings.get("betas", (0.9, 0.999))
    pair = isinstance(betas, (list, tuple)) and len(betas) == 2
    if not (pair and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise SettingError(
            f"optimizer.betas must be two numbers in [0, 1), got {betas!r}. AdamW's own are [0.9, 0.999]."
        )


def check_trainer_settings(trainer: DictConfig) -> None:
    """Stopping rules Lightning accepts but that train nothing: a run would report "completed" on untrained weights.

    ``max_epochs=-1`` (Lightning's "no epoch limit") is allowed with a step limit, ``+trainer.max_steps=N``.
    """
    steps = trainer.get("max_steps", -1)
    if not (_count(steps) and (steps == -1 or steps >= 1)):
        raise SettingError(
            f"trainer.max_steps must be -1 (no step limit) or an integer >= 1, got {steps!r}. Leave it out to train "
            "for trainer.max_epochs, or set the number of optimizer steps to stop after."
        )
    check_devices(trainer.get("devices", "auto"), trainer.get("num_nodes", 1))
    check_gradient_clipping(trainer.get("gradient_clip_val"), trainer.get("gradient_clip_algorithm"))
    check_accelerator(trainer.get("accelerator", "auto"))
    check_strategy(trainer.get("strategy", "auto"))
    epochs = trainer.get("max_epochs")
    if not (_count(epochs) and (epochs >= 1 or (epochs == -1 and steps >= 1))):
        raise SettingError(
            f"trainer.max_epochs must be an integer >= 1 (the epochs to train), got {epochs!r}. Set e.g. "
            "trainer.max_epochs=5 (the book's): with 0 a run reports 'completed' on untrained weights. -1 (no epoch "
            "limit) needs a step limit, +trainer.max_steps=N."
        )


def check_devices(devices: Any, num_nodes: Any) -> None:
    """``trainer.devices`` and ``trainer.num_nodes`` as Lightning reads them, refused with the setting's name
    (Lightning's own message for ``devices=0`` names neither the setting nor a value that works)."""
    if isinstance(devices, str) and devices.strip() == "auto":
        pass
    else:
        text = str(devices).strip()
        if isinstance(devices, str) and "," in text:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            good = bool(parts) and all(p.isdigit() for p in parts)
        elif OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
            good = len(devices) > 0 and all(_count(d) and d >= 0 for d in devices)
        else:
            number = int(text) if re.fullmatch(r"-?\d+", text) and not isinstance(devices, bool) else None
            good = number is not None and (number >= 1 or number == -1)
        if not good:
            raise SettingError(
                f"trainer.devices must be auto, a number of devices >= 1, -1 (all of them) or a list of device "
                f"indices such as [0,1], got {devices!r}. For the CPU, use trainer.accelerator=cpu trainer.devices=1."
            )
    if not (_count(num_nodes) and num_nodes >= 1):
        raise SettingError(f"trainer.num_nodes must be an integer >= 1 (machines to train on), got {num_nodes!r}.")


CLIP_ALGORITHMS = ("norm", "value")


def check_gradient_clipping(value: Any, algorithm: Any) -> None:
    """``trainer.gradient_clip_val`` (null or 0: no clipping) and ``trainer.gradient_clip_algorithm``. Lightning skips
    clipping for a negative limit without a word, and fails on ``nan`` with a message about a conflict."""
    if value is not None:
        check_number(
            "trainer.gradient_clip_val",
            value,
            "a number >= 0 (null or 0: no clipping)",
            lambda x: x >= 0,
            "It is the largest gradient norm a step may take (gradient_clip_algorithm=norm); 1.0 is a usual limit.",
        )
    if algorithm is not None and algorithm not in CLIP_ALGORITHMS:
        raise SettingError(
            f"trainer.gradient_clip_algorithm must be one of {', '.join(CLIP_ALGORITHMS)}, got {algorithm!r}. norm "
            "(Lightning's default) scales the whole gradient down to trainer.gradient_clip_val; value clips each entry."
        )


def check_accelerator(accelerator: Any) -> None:
    """``trainer.accelerator=gpu``, ``cuda`` or ``mps`` on a machine where PyTorch sees no such device, refused by
    name (Lightning's own message, "No supported gpu backend found!", names neither the setting nor the fix)."""
    name = str(accelerator).strip().lower()
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    missing = {"gpu": not (cuda or mps), "cuda": not cuda, "mps": not mps}.get(name, False)
    if missing:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SettingError(
            f"trainer.accelerator={accelerator}, but PyTorch sees no {_DEVICE_KINDS[name]} on this machine "
            f"(torch {torch.__version__}, {build}). Use trainer.accelerator=cpu, or trainer.accelerator=auto to "
            "take a GPU where there is one."
        )


_DEVICE_KINDS = {"gpu": "GPU (CUDA or Apple MPS)", "cuda": "CUDA GPU", "mps": "Apple MPS device"}
SEED_RANGE = (0, 2**32 - 1)  # Lightning's: outside it, seed_everything only warns and draws a random seed


def check_seed(seed: Any) -> int:
    """``seed`` as the integer every entry point seeds with; refused by name unless an integer in ``SEED_RANGE``
    (Lightning would fail on ``seed=abc`` with a bare ``int()`` error and replace ``seed=-1`` by a random seed)."""
    low, high = SEED_RANGE
    if not (_count(seed) and low <= seed <= high):
        raise SettingError(
            f"seed must be an integer from {low} to {high}, got {seed!r}. Pass e.g. seed=0; several seeds run as a "
            "multirun: -m seed=0,1,2."
        )
    return int(seed)


# --- schedules --------------------------------------------------------------------------------------------------
def check_unfreeze_epoch(epoch: int, max_epochs: int | None) -> None:
    """``model.unfreeze_at_epoch`` must leave the backbone at least one epoch to train."""
    if max_epochs is not None and max_epochs >= 0 and epoch >= max_epochs:
        raise SettingError(
            f"model.unfreeze_at_epoch={epoch} is not below trainer.max_epochs={max_epochs}: the backbone would "
            f"never train. Use model.unfreeze_at_epoch < {max_epochs}, raise trainer.max_epochs, or "
            "experiment=frozen to train the head only."
        )


def check_ema_decay(decay: Any) -> None:
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 < decay < 1.0:
        raise SettingError(
            f"model.ema_decay must be a number strictly between 0 and 1 (the weight of the average at each step, "
            f"e.g. 0.999), or null for no average; got {decay!r}."
        )


# --- finetune.soup -----------------------------------------------------------------------------------------------
def check_alpha(alpha: Any) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise SettingError(
            f"alpha must be a number in [0, 1] (0: the first checkpoint, 1: the second) or null to choose it on "
            f"validation, got {alpha!r}."
        )
    return float(alpha)


def check_alphas(alphas: Any) -> list[float]:
    if not isinstance(alphas, Sequence) or isinstance(alphas, str) or not alphas:
        raise SettingError(f"alphas must be a list of numbers in [0, 1], e.g. [0, 0.5, 1], got {alphas!r}.")
    return [check_alpha(a) for a in alphas]
