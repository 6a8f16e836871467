"""What a trained checkpoint brings to the commands that score it (evaluate, calibrate, soup, the shift benchmark):
the data it was trained on, its eval preprocessing, and the classes a folder must have to be scored by it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from finetune.data.transforms import CLASSES, Preprocessing
from finetune.errors import DataError, PathError, describe_path
from finetune.harness.checkpoint_io import preprocessing as checkpoint_preprocessing
from finetune.harness.overrides import override_keys
from finetune.harness.results import command_line_overrides

log = logging.getLogger(__name__)


# The data settings a checkpoint's run was trained with that say which images it saw and how they were split; used
# when no data setting is given on the command line (sizes and normalisation: use_checkpoint_geometry).
RECORDED_DATA = ("root", "download", "skip_corrupt", "verify_images", "val_fraction", "split_seed", "folds", "fold")


def use_checkpoint_data(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: Path) -> None:
    """Without ``data=`` or ``data.root=`` on the command line, use the data the checkpoint was trained on (its
    recorded ``data.root``, download and split settings) instead of the config's default data set, saying so; other
    ``data.*`` given on the command line still apply.

    """
    given = {key.lstrip("+~") for key in override_keys(command_line_overrides())}
    if given & {"data", "data.root"}:
        return
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    if not saved.get("root"):
        log.warning("%s records no data.root: using the config's data (data.root=%s).", ckpt_path, cfg.data.get("root"))
        return
    root = Path(str(saved["root"])).expanduser()
    if not root.is_absolute():
        root = Path.cwd() / root  # runs record an absolute data.root; a hand-edited relative one is read from here
    if not root.is_dir() and not saved.get("download"):
        raise PathError(
            f"No data.root given, and the data {str(ckpt_path)!r} was trained on, data.root={root}, is "
            f"{describe_path(root)} now. Pass data=folder data.root=PATH (a folder of test/<class>/ or <class>/)."
        )
    for key in RECORDED_DATA:
        if key in saved and key in cfg.data and f"data.{key}" not in given:
            cfg.data[key] = saved[key]
    cfg.data.root = str(root)
    log.info(
        "No data settings given: using the data %s was trained on (data.root=%s). Pass data=folder data.root=PATH "
        "for other images.",
        ckpt_path,
        root,
    )


def use_checkpoint_geometry(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: Path) -> None:
    """Set ``cfg.data``'s eval preprocessing (sizes, mean, std, interpolation) to the checkpoint's, except those given
    on the command line.

    A new ``data.image_size`` without ``data.resize_size`` keeps the config's resize (null: the backbone's crop
    fraction of the new crop, see ``finetune.run.backbone_preprocessing``), not the checkpoint's, which may be smaller
    than the new crop.
    """
    preprocessing = checkpoint_preprocessing(checkpoint, ckpt_path)
    given = override_keys(command_line_overrides())
    for key in Preprocessing.keys():
        stored = getattr(preprocessing, key)
        stored = list(stored) if isinstance(stored, tuple) else stored
        if f"data.{key}" in given or (key == "resize_size" and "data.image_size" in given):
            if cfg.data.get(key) != stored:
                log.warning("data.%s=%s, not the checkpoint's %s.", key, cfg.data[key], stored)
            continue
        cfg.data[key] = stored


def check_classes(checkpoint: dict[str, Any], model: pl.LightningModule, images: Any, ckpt_path: Path) -> None:
    """Refuse a dataset whose classes (names, in order) are not the ones the checkpoint predicts."""
    found = images.classes if images.num_classes else []  # num_classes reads the class folders
    stored = checkpoint.get(CLASSES)
    if stored and list(stored) != list(found):
        raise DataError(
            f"Checkpoint {str(ckpt_path)!r} predicts the classes {list(stored)}, but the dataset at "
            f"{str(images.root)!r} has {list(found)}. Evaluate on the data it was trained for."
        )
    if model.hparams.num_classes != len(found):
        raise DataError(
            f"Checkpoint {str(ckpt_path)!r} predicts {model.hparams.num_classes} classes but the dataset at "
            f"{str(images.root)!r} has {len(found)}. Evaluate on the data it was trained for."
        )
