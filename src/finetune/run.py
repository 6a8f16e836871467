"""Config -> (datamodule, model, trainer): the one place that assembles a run from a composed config.

``finetune.train``, ``finetune.evaluate`` and ``scripts/benchmark.py`` all build their objects here, so a new
setting is wired once. Objects come from ``hydra.utils.instantiate``; the optimizer and scheduler configs are
``_partial_`` factories that the module calls with its own parameter groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from finetune.backbones import check_input_size, is_timm, preprocessing
from finetune.errors import DataError, PathError, SettingError
from finetune.features import FeatureCacheDataModule
from finetune.harness.checkpoints import use_atomic_checkpoints
from finetune.harness.distributed import check_launcher, set_timeout
from finetune.harness.guards import OutOfMemoryAdvice, compile_network
from finetune.harness.quiet import quiet_known_warnings
from finetune.harness.settings import check_data_settings, check_pretrained_size, check_run_settings
from finetune.harness.writable import overlap


def _config_dir() -> str:
    """The Hydra configs: the package's own ``finetune/conf`` (in a wheel: a copy; in a checkout: a link to the
    top-level ``conf/``), else the checkout's ``conf/`` (e.g. where the link could not be created)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate.resolve())
    raise PathError(
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


def build_datamodule(cfg: DictConfig, backbone: str | None = None, test_only: bool = False) -> pl.LightningDataModule:
    """The image DataModule, with its data fetched (the head's size depends on the class folders).

    ``test_only`` (evaluation): only the images scored are needed (``test/<class>/`` or ``<class>/``), and the
    train/val settings are ignored, not checked. A training run with ``test_after_fit=false`` needs no ``test/``.

    With a ``model`` (or a ``backbone``, e.g. a checkpoint's), the null ``data.image_size``, ``resize_size``,
    ``mean``, ``std``, ``interpolation`` are the backbone's pretrained preprocessing
    (:func:`finetune.backbones.preprocessing`).
    """
    filled = backbone_preprocessing(cfg, backbone)
    check_data_settings({**OmegaConf.to_container(cfg.data, resolve=True), **filled}, test_only=test_only)
    how = {"test_only": True} if test_only else {}
    if not test_only and cfg.get("test_after_fit", True) is False:
        how["require_test"] = False  # a run that never tests needs no test/ folder
    datamodule = instantiate(cfg.data, **filled, **how, _convert_="all")
    datamodule.prepare_data()
    check_output_outside_data(cfg, datamodule)
    return datamodule


def check_output_outside_data(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """Refuse a run folder inside the folders the data is read from (``hydra.run.dir=D/train/hot_dog/run1``): its
    ``confusion_matrix.png`` and the like would be images of a class to the next run."""
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    folders = getattr(datamodule, "data_folders", None)
    if not output_dir or folders is None:
        return
    root = str(OmegaConf.select(cfg, "data.root", default=""))
    for folder in folders():
        if overlap(str(output_dir), folder) in ("is", "inside"):
            raise SettingError(
                f"The run folder {str(output_dir)!r} (hydra.run.dir / paths.output_dir) is inside {str(folder)!r}, "
                f"which data.root={root!r} reads its class folders from: the run's figures, logs and checkpoints "
                "would be read as images by the next run. Put the run folder outside data.root's "
                "train/ and test/ (leave hydra.run.dir unset and runs go to paths.log_dir/runs/)."
            )
        cache_dir = OmegaConf.select(cfg, "data.cache_dir", default=None)
        if cache_dir and OmegaConf.select(cfg, "data.cache", default="none") == "disk":
            if overlap(str(cache_dir), folder) in ("is", "inside"):
                raise SettingError(
                    f"data.cache_dir={cache_dir} is inside {str(folder)!r}, which data.root={root!r} reads its class "
                    "folders from: the cache folder would be read as a class without images by the next run. Put "
                    "data.cache_dir outside data.root's train/ and test/."
                )


def check_class_count(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """Refuse to train a classifier on fewer than two classes (torchmetrics would fail deep inside the model with
    ``num_classes ... larger than 1``), naming ``data.root`` and the classes found."""
    if datamodule.num_classes >= 2:
        return
    root = OmegaConf.select(cfg, "data.root", default=None)
    classes = list(getattr(datamodule, "classes", None) or [])
    raise DataError(
        f"data.root={str(root)!r} holds {datamodule.num_classes} class {classes}: a classifier needs at least two. "
        "Add a folder of images for every other class (train/<class>/ and test/<class>/), e.g. train/hot_dog/ "
        "and train/not_hot_dog/."
    )


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


def build_model(cfg: DictConfig, num_classes: int, image_size: int | None = None) -> pl.LightningModule:
    """The configured model, its optimizer and scheduler factories attached; ``model.compile=true`` compiles its
    network (falling back to eager where torch.compile fails: :func:`finetune.harness.guards.compile_network`).
    With the ``image_size`` it will see, that size is checked against the network first (:func:`check_image_size`)."""
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    compile_net = settings.pop("compile", False)
    scheduler = cfg.get("scheduler")
    model = instantiate(
        settings,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        _convert_="all",
    )
    if image_size is not None:
        check_image_size(image_size, model, configured=True)  # eagerly, before compiling
    if compile_net:
        compile_network(model)
    return model


def check_image_size(image_size: Any, model: pl.LightningModule, configured: bool) -> None:
    """``data.image_size`` against the network: refused if it cannot take that size (tried only off its pretrained
    size, which it takes); with a ``configured`` model's pretrained weights, a warning far below their size."""
    backbone = model.hparams.get("backbone")
    if not isinstance(backbone, str) or not isinstance(image_size, int):
        return
    pretrained_size = preprocessing(backbone)["image_size"]
    if image_size != pretrained_size:
        check_input_size(model.net, backbone, image_size)
    if configured:
        check_pretrained_size(image_size, backbone, model.hparams.get("weights"), pretrained_size)


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The Trainer of ``cfg.trainer``, with the configured callbacks and loggers plus ``extra_callbacks``."""
    quiet_known_warnings()  # every entry point builds its Trainer here: the filters are in place before Lightning talks
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks)
    callbacks.append(OutOfMemoryAdvice())
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # Without a configured checkpoint callback (~callbacks.model_checkpoint) Lightning would add its own.
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    try:
        trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_checkpointing=checkpointing
        )
    except InstantiationException as err:
        refused = trainer_setting_error(cfg.trainer, err.__cause__)
        if refused is None:
            raise
        raise refused from err.__cause__
    use_atomic_checkpoints(trainer)  # last.ckpt and the others appear whole or not at all, also on a full disk
    check_launcher(trainer)  # ranks must be started by running the command again (trainer.strategy=ddp)
    set_timeout(trainer, cfg.get("ddp_timeout_s"))  # a dead or stuck DDP rank fails the run instead of hanging it
    return trainer


# What Lightning raises for trainer flags that cannot work (an unknown precision, a GPU that is not there, ...).
_TRAINER_SETTING_ERRORS = (MisconfigurationException, ValueError)


def trainer_setting_error(trainer: DictConfig, err: BaseException | None) -> SettingError | None:
    """Lightning's refusal of the ``trainer.*`` flags as a :class:`SettingError` naming the settings it is about
    (those whose name or value its message mentions), or ``None`` where ``err`` is not such a refusal."""
    if not isinstance(err, _TRAINER_SETTING_ERRORS):
        return None
    message = str(err)
    flags = {k: v for k, v in trainer.items() if k not in ("_target_", "default_root_dir")}

    def mentioned(word: object) -> bool:
        return re.search(rf"\b{re.escape(str(word))}\b", message, re.IGNORECASE) is not None

    named = [
        f"trainer.{key}={value}"
        for key, value in flags.items()
        if mentioned(key) or (isinstance(value, str) and value not in ("auto", "") and mentioned(value))
    ]
    named = named or [f"trainer.{k}={flags.get(k)}" for k in ("accelerator", "devices", "strategy", "precision")]
    return SettingError(
        f"{', '.join(named)}: Lightning cannot build its Trainer with these settings: {message} "
        "(trainer.accelerator=cpu trainer.devices=1 trainer.precision=32-true runs anywhere)."
    )


def assemble(
    cfg: DictConfig,
    extra_callbacks: Sequence[pl.Callback] = (),
    model: pl.LightningModule | None = None,
    test_only: bool = False,
) -> Run:
    """Build a run's objects; ``model`` (e.g. one loaded from a checkpoint) replaces the configured one;
    ``test_only``: a run that only tests (``finetune.evaluate``), see :func:`build_datamodule`.

    Every setting is checked first (:mod:`finetune.harness.settings`), before the data is fetched. With
    ``model.cache_features=true`` the frozen backbone runs once per split and the trainer sees the features (while
    it is frozen: see ``model.unfreeze_at_epoch``).
    """
    check_run_settings(cfg, model_configured=model is None)
    backbone = model.hparams.get("backbone") if model is not None else None
    images = build_datamodule(cfg, backbone, test_only=test_only)
    if model is None:
        check_class_count(cfg, images)
        model = build_model(cfg, images.num_classes, images.hparams.get("image_size"))
    else:
        check_image_size(images.hparams.get("image_size"), model, configured=False)
    datamodule = FeatureCacheDataModule(images, model) if model.hparams.get("cache_features") else images
    trainer = build_trainer(cfg, extra_callbacks)
    if isinstance(datamodule, FeatureCacheDataModule) and datamodule.reload_every:
        every = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = math.gcd(every, datamodule.reload_every)
    return Run(images=images, datamodule=datamodule, model=model, trainer=trainer)


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
