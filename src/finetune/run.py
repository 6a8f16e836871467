"""Config -> (datamodule, model, trainer): the one place that assembles a run from a composed config.

``finetune.train``, ``finetune.evaluate`` and ``scripts/benchmark.py`` all build their objects here, so a new
setting is wired once. Objects come from ``hydra.utils.instantiate``; the optimizer and scheduler configs are
``_partial_`` factories that the module calls with its own parameter groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Checkpoint

from finetune.features import FeatureCacheDataModule

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@dataclass
class Run:
    """What a run trains and tests: ``datamodule`` is what the trainer sees (cached features or ``images``)."""

    images: pl.LightningDataModule
    datamodule: pl.LightningDataModule
    model: pl.LightningModule
    trainer: pl.Trainer


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The image DataModule, with its data fetched (the head's size depends on the class folders)."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    return datamodule


def build_model(cfg: DictConfig, num_classes: int) -> pl.LightningModule:
    scheduler = cfg.get("scheduler")
    return instantiate(
        cfg.model,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        _convert_="all",
    )


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The Trainer of ``cfg.trainer``, with the configured callbacks and loggers plus ``extra_callbacks``."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # Without a configured checkpoint callback (~callbacks.model_checkpoint) Lightning would add its own.
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_checkpointing=checkpointing)


def assemble(
    cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = (), model: pl.LightningModule | None = None
) -> Run:
    """Build a run's objects; ``model`` (e.g. one loaded from a checkpoint) replaces the configured one.

    With ``model.cache_features=true`` the frozen backbone runs once per split and the trainer sees the features
    (while it is frozen: see ``model.unfreeze_at_epoch``).
    """
    images = build_datamodule(cfg)
    if model is None:
        model = build_model(cfg, images.num_classes)
    datamodule = FeatureCacheDataModule(images, model) if model.hparams.get("cache_features") else images
    return Run(images=images, datamodule=datamodule, model=model, trainer=build_trainer(cfg, extra_callbacks))
