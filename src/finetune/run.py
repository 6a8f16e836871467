"""Config -> (datamodule, model, trainer): the one place that assembles a run from a composed config.

``finetune.train``, ``finetune.evaluate`` and ``scripts/benchmark.py`` all build their objects here. Objects come
from ``hydra.utils.instantiate``: a new component is a class with a ``_target_`` in a config file, and nothing here
changes. The optimizer and scheduler configs are ``_partial_`` factories that the module calls with its own
parameter groups.

Every setting is checked before anything is built or any data is read (:func:`check_settings`): the run's own rules,
then one check per configured component, which owns its settings (a ``check_settings(node, cfg)`` static method of
the component's class, beside its code).
"""

from __future__ import annotations

import importlib
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

from finetune.backbones import preprocessing
from finetune.backbones.head_init import in_class_order, uses_source
from finetune.backbones.input_size import check_input_size, check_pretrained_size
from finetune.errors import DataError, PathError, SettingError, UserError
from finetune.features import FeatureCacheDataModule, unfreeze_epoch
from finetune.harness.checkpointing import CheckpointRecord, use_atomic_checkpoints
from finetune.harness.config_keys import check_node_keys
from finetune.harness.distributed import check_launcher, set_timeout
from finetune.harness.out_of_memory import OutOfMemoryAdvice
from finetune.harness.quiet import quiet_known_warnings
from finetune.harness.run_settings import check_run_settings
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


def build(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, except that a user's mistake found inside (a :class:`UserError`, e.g. a
    component's own check) is raised as itself, not wrapped in Hydra's ``InstantiationException``."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def check_settings(cfg: DictConfig, model_configured: bool = True) -> None:
    """The run's own rules (:mod:`finetune.harness.run_settings`), then each configured component's
    ``check_settings(node, cfg)``: the model (with its optimizer and scheduler), the feature cache, the callbacks.
    ``model_configured=False``: the model comes from a checkpoint. The data is checked in :func:`build_datamodule`,
    once the backbone's preprocessing has filled its nulls, before any image is read."""
    check_run_settings(cfg)
    nodes = {"model": cfg.model} if model_configured else {}
    nodes |= {"features": cfg.features} if cfg.get("features") else {}
    nodes |= {f"callbacks.{name}": node for name, node in (cfg.get("callbacks") or {}).items() if node}
    for key, node in unused_keys_checked(cfg, model_configured).items():
        check_node_keys(key, OmegaConf.to_container(node, resolve=False))
    for key, node in nodes.items():
        check = getattr(component(key, node), "check_settings", None)
        if check is not None:
            check(node, cfg)


def unused_keys_checked(cfg: DictConfig, model_configured: bool) -> dict[str, DictConfig]:
    """Every config node the assembly builds an object from (:func:`finetune.harness.config_keys.check_node_keys`)."""
    nodes = {"trainer": cfg.trainer}
    for group in ("callbacks", "logger"):
        nodes |= {f"{group}.{name}": node for name, node in (cfg.get(group) or {}).items() if node}
    if cfg.get("features"):
        nodes["features"] = cfg.features
    if model_configured:
        nodes |= {"model": cfg.model, "optimizer": cfg.optimizer}
        nodes |= {"model.criterion": cfg.model.criterion} if cfg.model.get("criterion") else {}
        nodes |= {"scheduler.scheduler": cfg.scheduler.scheduler} if cfg.get("scheduler") else {}
    return {key: node for key, node in nodes.items() if OmegaConf.is_dict(node)}


def component(key: str, node: DictConfig) -> Any:
    """The class (or function) a config node builds, named by its ``_target_``; refused by name when it is missing."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise SettingError(f"{key} has no _target_: it must name the class that it configures.")
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SettingError(f"{key}._target_={target} cannot be imported ({err}). Check the spelling.") from None


def build_datamodule(cfg: DictConfig, backbone: str | None = None, test_only: bool = False) -> pl.LightningDataModule:
    """The image DataModule, checked and with its data fetched (the head's size depends on the class folders).

    ``test_only`` (evaluation): only the images scored are needed (``test/<class>/`` or ``<class>/``), and the
    train/val settings are ignored, not checked. A training run with ``test_after_fit=false`` needs no ``test/``.
    The null ``data.image_size``, ``resize_size``, ``mean``, ``std``, ``interpolation`` are the backbone's pretrained
    preprocessing (:func:`finetune.backbones.preprocessing`; the configured model's, or ``backbone``'s).
    """
    settings = {**OmegaConf.to_container(cfg.data, resolve=True), **backbone_preprocessing(cfg, backbone)}
    check_node_keys("data", settings)
    component("data", cfg.data).check_settings(settings, test_only=test_only)
    how = {"test_only": True} if test_only else {}
    if not test_only and cfg.get("test_after_fit", True) is False:
        how["require_test"] = False  # a run that never tests needs no test/ folder
    datamodule = build({**settings, **how}, _convert_="all")
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
    """The ``data.*`` settings left null that the backbone's pretrained config fills; explicit values win. A given
    ``data.image_size`` keeps the backbone's crop fraction for a null ``data.resize_size``."""
    backbone = backbone or OmegaConf.select(cfg, "model.backbone", default=None)
    if not backbone:
        return {}
    data = cfg.data
    image_size = data.get("image_size")
    expected = preprocessing(str(backbone), image_size if isinstance(image_size, int) else None)
    return {key: value for key, value in expected.items() if data.get(key) is None}


def build_model(
    cfg: DictConfig, num_classes: int, image_size: int | None = None, classes: Sequence[str] | None = None
) -> pl.LightningModule:
    """The configured model (its criterion built from ``model.criterion``), its optimizer and scheduler factories
    attached. With the ``image_size`` it will see, that size is checked against the network (:func:`check_image_size`).
    ``classes``: the class folders in output order, which a head started from the source classifier
    (``model.head_init.from=source``) must map, each to its source classes.
    """
    scheduler = cfg.get("scheduler")
    node: Any = cfg.model
    if uses_source(OmegaConf.select(cfg, "model.head_init")):
        if classes is None:
            raise ValueError("model.head_init.from=source needs the class names to order its mapping")
        # The mapping in output order; replaced in the node, as instantiate's keyword merge would keep the config's.
        node = OmegaConf.to_container(cfg.model, resolve=True)
        node["head_init"] = in_class_order(node["head_init"], classes)
    model = build(
        node,
        num_classes=num_classes,
        optimizer=build(cfg.optimizer),
        scheduler=build(scheduler, _convert_="all") if scheduler else None,
        _convert_="all",
    )
    if image_size is not None:
        check_image_size(image_size, model, configured=True)
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
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks)
    callbacks += [CheckpointRecord(cfg), OutOfMemoryAdvice()]
    loggers = [build(c) for c in (cfg.get("logger") or {}).values()]
    # Without a configured checkpoint callback (~callbacks.model_checkpoint) Lightning would add its own.
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    try:
        trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_checkpointing=checkpointing)
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

    Every setting is checked first (:func:`check_settings`), before the data is fetched. With ``features=cached``
    the frozen backbone runs once per split and the trainer sees the features (while it is frozen: see
    ``callbacks.unfreeze``).
    """
    check_settings(cfg, model_configured=model is None)
    backbone = model.hparams.get("backbone") if model is not None else None
    images = build_datamodule(cfg, backbone, test_only=test_only)
    if model is None:
        check_class_count(cfg, images)
        model = build_model(cfg, images.num_classes, images.preprocessing.image_size, images.classes)
    else:
        check_image_size(images.preprocessing.image_size, model, configured=False)
    datamodule = images
    if cfg.get("features") and not test_only:
        datamodule = build(cfg.features, images=images, model=model, unfreeze_epoch=unfreeze_epoch(cfg))
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
