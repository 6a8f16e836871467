"""Experiment loggers for ``logger=...``, and what a run sends them besides Lightning's per-epoch metrics.

The factories (``_target_`` of ``conf/logger/*.yaml``) build Lightning's loggers, but first say which optional
dependency to install when the tracker's package is missing, and pick sensible local defaults: W&B runs offline
unless an API key is set, MLflow writes a local file store. :func:`log_config` logs the run's composed config as
hyperparameters; :func:`log_results` logs the ``results.json`` numbers once the run is over.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from finetune.errors import MissingPackageError

# results.json entries that are not per-run numbers worth a metric (lists, paths, the config itself).
_NOT_METRICS = {"history", "overrides", "seed"}


def _require(package: str, extra: str, logger: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise MissingPackageError(
            f"logger={logger} needs the {package} package: pip install 'finetune[{extra}]' (or pip install {package})."
        ) from err


def wandb_offline(environ: Mapping[str, str] = os.environ) -> bool:
    """W&B stays offline unless the environment says otherwise: ``WANDB_API_KEY`` set, or any ``WANDB_MODE``."""
    return "WANDB_API_KEY" not in environ and "WANDB_MODE" not in environ


def wandb(save_dir: str | Path, offline: bool | None = None, **kwargs: Any) -> Logger:
    """Lightning's ``WandbLogger``; ``offline=None`` means :func:`wandb_offline`.

    A run left open by an earlier job of the same process (a multirun) is finished first, so every job gets its
    own W&B run instead of Lightning reusing the open one.
    """
    _require("wandb", "trackers", "wandb")
    import wandb as wandb_module
    from pytorch_lightning.loggers import WandbLogger

    if wandb_module.run is not None:
        wandb_module.finish()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=str(save_dir), offline=wandb_offline() if offline is None else offline, **kwargs)


def mlflow(save_dir: str | Path = "logs/mlflow", tracking_uri: str | None = None, **kwargs: Any) -> Logger:
    """Lightning's ``MLFlowLogger`` writing to the local file store ``save_dir``, or to ``tracking_uri`` when given
    (a server ``http://host:5000``, a database ``sqlite:///mlflow.db``).

    The file store needs no server or database, and several jobs (a parallel sweep, SLURM jobs on a shared file
    system) can write to it at once. MLflow 3 keeps it in "maintenance mode" and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; that is set here when you have not set it yourself.
    """
    _require("mlflow", "trackers", "mlflow")
    from pytorch_lightning.loggers import MLFlowLogger

    if tracking_uri is None:
        tracking_uri = Path(save_dir).resolve().as_uri()  # absolute: found from any working folder
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=tracking_uri, save_dir=str(save_dir), **kwargs)


def tensorboard(save_dir: str | Path, **kwargs: Any) -> Logger:
    """Lightning's ``TensorBoardLogger``, once the ``tensorboard`` package is known to be there."""
    _require("tensorboard", "tensorboard", "tensorboard")
    from pytorch_lightning.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(save_dir), **kwargs)


def config_hyperparameters(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The run's config as a plain nested dict (interpolations resolved where they can be), minus ``hydra``."""
    if isinstance(cfg, DictConfig):
        try:
            container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except Exception:  # an interpolation that only resolves inside a Hydra job: keep it as written
            container = OmegaConf.to_container(cfg, resolve=False)
    else:
        container = dict(cfg)
    container.pop("hydra", None)
    return container


def log_config(loggers: Iterable[Logger], cfg: DictConfig | Mapping[str, Any]) -> None:
    """Log the run's composed config as hyperparameters to every logger (nested keys become ``data/batch_size``)."""
    params = config_hyperparameters(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)
        logger.save()


def results_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a ``results.json`` record, as ``results/<key>`` (``results/test/acc``, ``results/epochs``)."""
    return {
        f"results/{key}": float(value)
        for key, value in results.items()
        if key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def log_results(loggers: Iterable[Logger], results: Mapping[str, Any]) -> None:
    """Log a finished run's ``results.json`` numbers (and its status) to every logger, then close them.

    Called once, after ``results.json`` is written: the best validation accuracy, the test metrics of the
    best-on-validation checkpoint, epochs and fit seconds land next to the per-epoch curves, as
    ``results/val/acc``, ``results/test/acc``, ... (MLflow and W&B show them as the run's final numbers).
    """
    metrics = results_metrics(results)
    status = str(results.get("status", "completed"))
    for logger in loggers:
        if metrics:
            logger.log_metrics(metrics)
        logger.log_hyperparams({"results/status": status})
        summary = getattr(getattr(logger, "experiment", None), "summary", None)  # W&B: the run's summary table
        if summary is not None and hasattr(summary, "update"):
            summary.update({**metrics, "results/status": status})
        logger.save()
        logger.finalize("success" if status == "completed" else "failed")
        _finish_wandb(logger)


def _finish_wandb(logger: Logger) -> None:
    """End a W&B run now (its files complete on disk), not at interpreter exit: the next job gets its own run."""
    if type(logger).__name__ != "WandbLogger":
        return
    experiment = logger.experiment
    finish = getattr(experiment, "finish", None)
    if callable(finish):
        finish()
