"""Config -> (datamodule, model, trainer): the one place that assembles a run from a composed config.

``finetune.train``, ``finetune.evaluate`` and ``scripts/benchmark.py`` all build their objects here, so a new
setting is wired once. Objects come from ``hydra.utils.instantiate``; the optimizer and scheduler configs are
``_partial_`` factories that the module calls with its own parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Checkpoint

from finetune.backbones import is_timm, preprocessing
from finetune.distributed import set_timeout
from finetune.features import FeatureCacheDataModule
from finetune.module import check_number
from finetune.quiet import quiet_known_warnings
from finetune.schedules import check_unfreeze_epoch


def _config_dir() -> str:
    """The Hydra configs: the package's own ``finetune/conf`` (in a wheel: a copy; in a checkout: a link to the
    top-level ``conf/``), else the checkout's ``conf/`` (e.g. where the link could not be created)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"finetune's Hydra configs are missing: neither {here / 'conf'} nor {here.parents[1] / 'conf'} holds "
        "train.yaml. Reinstall the package (pip install finetune, or pip install -e . in a checkout)."
    )


CONFIG_DIR = _config_dir()


@dataclass
class Run:
    """What a run trains and tests: ``datamodule`` is what the trainer sees (cached features or ``images``)."""

    images: pl.LightningDataModule
    datamodule: pl.LightningDataModule
    model: pl.LightningModule
    trainer: pl.Trainer


def build_datamodule(cfg: DictConfig, backbone: str | None = None) -> pl.LightningDataModule:
    """The image DataModule, with its data fetched (the head's size depends on the class folders).

    With a ``model`` (or a ``backbone``, e.g. a checkpoint's), the null ``data.image_size``, ``resize_size``,
    ``mean``, ``std``, ``interpolation`` are the backbone's pretrained preprocessing
    (:func:`finetune.backbones.preprocessing`).
    """
    datamodule = instantiate(cfg.data, **backbone_preprocessing(cfg, backbone), _convert_="all")
    datamodule.prepare_data()
    return datamodule


def backbone_preprocessing(cfg: DictConfig, backbone: str | None = None) -> dict[str, Any]:
    """The ``data.*`` settings left null that the backbone's pretrained config fills; explicit values win.

    A given ``data.image_size`` with a null ``data.resize_size`` keeps the backbone's crop fraction: the book's
    256/224 ratio for torchvision backbones (the datamodule's null), ``floor(image_size / crop_pct)`` for timm.
    """
    backbone = backbone or OmegaConf.select(cfg, "model.backbone", default=None)
    if not backbone:
        return {}
    expected = preprocessing(str(backbone))
    data = cfg.data
    filled = {k: list(expected[k]) for k in ("mean", "std") if data.get(k) is None}
    if data.get("interpolation") is None:
        filled["interpolation"] = expected["interpolation"]
    if data.get("image_size") is None:
        filled["image_size"] = expected["image_size"]
    if data.get("resize_size") is None and is_timm(str(backbone)):
        image_size = filled.get("image_size", data.get("image_size"))
        filled["resize_size"] = math.floor(image_size / expected["crop_pct"]) if isinstance(image_size, int) else None
    return filled


def build_model(cfg: DictConfig, num_classes: int) -> pl.LightningModule:
    check_optimizer_settings(OmegaConf.to_container(cfg.optimizer, resolve=True))
    scheduler = cfg.get("scheduler")
    return instantiate(
        cfg.model,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        _convert_="all",
    )


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
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}. AdamW's own are [0.9, 0.999].")


def check_trainer_settings(trainer: DictConfig) -> None:
    """Stopping rules Lightning accepts but that train nothing: a run would report "completed" on untrained weights.

    ``max_epochs=-1`` (Lightning's "no epoch limit") is allowed with a step limit, ``+trainer.max_steps=N``.
    """
    steps = trainer.get("max_steps", -1)
    if not (_count(steps) and (steps == -1 or steps >= 1)):
        raise ValueError(
            f"trainer.max_steps must be -1 (no step limit) or an integer >= 1, got {steps!r}. Leave it out to train "
            "for trainer.max_epochs, or set the number of optimizer steps to stop after."
        )
    epochs = trainer.get("max_epochs")
    if not (_count(epochs) and (epochs >= 1 or (epochs == -1 and steps >= 1))):
        raise ValueError(
            f"trainer.max_epochs must be an integer >= 1 (the epochs to train), got {epochs!r}. Set e.g. "
            "trainer.max_epochs=5 (the book's): with 0 a run reports 'completed' on untrained weights. -1 (no epoch "
            "limit) needs a step limit, +trainer.max_steps=N."
        )


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The Trainer of ``cfg.trainer``, with the configured callbacks and loggers plus ``extra_callbacks``."""
    check_trainer_settings(cfg.trainer)
    quiet_known_warnings()  # every entry point builds its Trainer here: the filters are in place before Lightning talks
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # Without a configured checkpoint callback (~callbacks.model_checkpoint) Lightning would add its own.
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_checkpointing=checkpointing)
    set_timeout(trainer, cfg.get("ddp_timeout_s"))  # a dead or stuck DDP rank fails the run instead of hanging it
    return trainer


def assemble(
    cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = (), model: pl.LightningModule | None = None
) -> Run:
    """Build a run's objects; ``model`` (e.g. one loaded from a checkpoint) replaces the configured one.

    With ``model.cache_features=true`` the frozen backbone runs once per split and the trainer sees the features
    (while it is frozen: see ``model.unfreeze_at_epoch``).
    """
    check_trainer_settings(cfg.trainer)  # before the data is fetched or checked: a wrong setting fails at once
    unfreeze = OmegaConf.select(cfg, "model.unfreeze_at_epoch", default=None)
    if isinstance(unfreeze, int) and unfreeze and not cfg.trainer.get("fast_dev_run"):
        check_unfreeze_epoch(unfreeze, cfg.trainer.get("max_epochs"))  # checked again when fitting, for any trainer
    images = build_datamodule(cfg, model.hparams.get("backbone") if model is not None else None)
    if model is None:
        model = build_model(cfg, images.num_classes)
    datamodule = FeatureCacheDataModule(images, model) if model.hparams.get("cache_features") else images
    return Run(images=images, datamodule=datamodule, model=model, trainer=build_trainer(cfg, extra_callbacks))


def compose_config(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The config ``python -m finetune.<config_name> OVERRIDES`` runs with, for scripts and tests that build runs.

    Hydra's own node is set for interpolations such as ``${hydra:runtime.choices.experiment}`` and then removed, as
    under ``@hydra.main``; no run folder is made.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
