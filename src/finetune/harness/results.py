"""What a run leaves behind: the ``results.json`` record, written atomically."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from finetune import atomic
from finetune.harness.figures import write_figures
from finetune.harness.run_folder import RunFolder
from finetune.metrics import TEST_REPORT_KEYS, report_record
from finetune.temperature import temperature_line


def to_number(value: Any) -> float | None:
    """A plain float for JSON (tensors included); ``None`` for missing or non-finite values."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write whole or not at all (:func:`finetune.atomic.write_json`): a crash or a full disk never leaves a
    half-written results file."""
    atomic.write_json(path, payload)


class ParameterCount(pl.Callback):
    """The parameters the optimizer trains (``trainable_parameters``, the backbone's included when it unfreezes
    later) and all of the network's (``total_parameters``, adapters included), counted when fitting starts: after
    the callbacks that choose what trains (``lora``, ``bitfit``) and before any of them undoes it."""

    def __init__(self) -> None:
        self.record: dict[str, int | None] = {"trainable_parameters": None, "total_parameters": None}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trained = {id(p): p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        self.record = {
            "trainable_parameters": sum(p.numel() for p in trained.values()),
            "total_parameters": sum(p.numel() for p in pl_module.parameters()),
        }


def fit_record(trainer: pl.Trainer | None, history: list[dict[str, float]]) -> dict[str, Any]:
    """What the fit left: the best validation score and checkpoint, ``last.ckpt``, the per-epoch history.

    Read right after fitting: testing a checkpoint restores the callbacks' state as of that epoch.
    """
    # Not trainer.checkpoint_callback: that is the first Checkpoint of any kind.
    checkpoints = [
        c for c in (trainer.checkpoint_callbacks if trainer is not None else []) if isinstance(c, ModelCheckpoint)
    ]
    checkpoint = checkpoints[0] if checkpoints else None
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    return {
        "val/acc": to_number(checkpoint.best_model_score) if checkpoint is not None and best_path else None,
        "best_checkpoint": best_path or None,
        "last_checkpoint": (checkpoint.last_model_path or None) if checkpoint is not None else None,
        "history": list(history),
    }


def run_results(
    cfg: DictConfig,
    output_dir: Path,
    status: str,
    fitted: dict[str, Any],
    test_metrics: dict[str, float],
    fit_seconds: float,
    resumed_from: Path | None,
    test_report: dict[str, Any] | None = None,
    parameters: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """The ``results.json`` record of a training run (its keys are part of the public interface).

    ``parameters``: :class:`ParameterCount`'s ``trainable_parameters`` and ``total_parameters``.

    ``test_report``: the final test's report keys (:func:`finetune.metrics.report_record`): ``test/balanced_acc``
    and ``test/macro_f1`` (means over the classes in test, each counting once), ``test/per_class``
    ``{class: {precision, recall, f1, support}}``, ``test/confusion_matrix`` (rows = true class), ``test/auroc``
    (one-vs-rest, averaged over the classes present), ``test/ece`` and ``test/top_losses``; ``None`` without a test.
    """
    report = test_report or {}
    return {
        "status": status,
        "experiment": cfg.get("name"),
        "backbone": cfg.model.backbone,
        "weights": None if cfg.model.weights is None else str(cfg.model.weights),
        "freeze": cfg.model.freeze,
        "seed": cfg.seed,
        "folds": cfg.data.get("folds"),
        "fold": cfg.data.get("fold"),
        "shots": cfg.data.get("shots"),  # few-shot: training images per class, and the seed of their draw
        "shot_seed": cfg.data.get("shot_seed") if cfg.data.get("shots") is not None else None,
        "val/acc": fitted["val/acc"],
        "test_after_fit": bool(cfg.get("test_after_fit", True)),  # false: validation only (k-fold, searches)
        "test/acc": to_number(test_metrics.get("test/acc")),
        "test/loss": to_number(test_metrics.get("test/loss")),
        **{key: report.get(key) for key in TEST_REPORT_KEYS},
        "trainable_parameters": (parameters or {}).get("trainable_parameters"),
        "total_parameters": (parameters or {}).get("total_parameters"),
        "epochs": len(fitted["history"]),
        "fit_seconds": round(fit_seconds, 2),
        "best_checkpoint": fitted["best_checkpoint"],
        "last_checkpoint": fitted["last_checkpoint"],
        "output_dir": str(output_dir),
        "overrides": command_line_overrides(),
        "history": fitted["history"],
        "resumed_from": None if resumed_from is None else os.path.abspath(resumed_from),
        "environment": environment(),
    }


def summary(results: dict[str, Any]) -> str:
    """The few lines a finished training run prints."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"[{results['experiment']}] {results['backbone']} weights={results['weights']} seed={results['seed']}",
        f"  best val/acc {fmt(results['val/acc'])}   test/acc {fmt(results['test/acc'])}{balanced(results)}   "
        f"test/loss {fmt(results['test/loss'])}   epochs {results['epochs']}   fit {results['fit_seconds']:.1f}s",
    ]
    trainable, total = results.get("trainable_parameters"), results.get("total_parameters")
    if trainable is not None and total:
        lines.append(f"  trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if "val/temperature" in results:  # calibrate=true: the temperature applied, or why none was
        lines.append(f"  {temperature_line(results)}")
    lines += [f"  best checkpoint: {results['best_checkpoint']}", f"  output folder:   {results['output_dir']}"]
    return "\n".join(lines)


def balanced(results: dict[str, Any]) -> str:
    """`` (balanced 0.8123)`` after the test accuracy when the classes' recalls differ enough to matter, else ''."""
    value, accuracy = results.get("test/balanced_acc"), results.get("test/acc")
    if value is None or accuracy is None or abs(value - accuracy) < 0.005:
        return ""
    return f" (balanced {value:.4f})"


def command_line_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def environment() -> dict[str, Any]:
    """What produced a result: Python and the main packages' versions, and the code's git commit if any."""
    versions = {"python": platform.python_version()}
    for name in ("finetune", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "hydra-core", "omegaconf"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git": git_state(Path(__file__).resolve().parents[3])}  # src/finetune/harness/


def git_state(folder: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` when ``folder`` is a git checkout (dirty: tracked files changed), else ``None``."""
    if not (folder / ".git").exists():
        return None  # an installed package, not a checkout
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # no git program, or not readable as a repository
    return {"commit": commit, "dirty": bool(changes.strip())}


def write_test_report(scorer: Any, images: Any, output_dir: Path, is_global_zero: bool) -> dict[str, Any]:
    """The report keys of the scorer's last test of ``images``; on rank 0 also its two figures in ``output_dir``."""
    report = scorer.report
    classes = list(images.classes)
    dataset = getattr(images, "test_set", None)
    record = report_record(report, classes, dataset)
    if report is not None and is_global_zero:
        preprocessing = images.preprocessing.to_dict()
        write_figures(report, record, classes, dataset, preprocessing, RunFolder(output_dir))
    return record
