"""Train, then test the best checkpoint: ``python -m finetune.train [hydra overrides]``.

Examples::

    python -m finetune.train                                   # the book: ResNet-18, d2l hot dogs
    python -m finetune.train experiment=scratch trainer.max_epochs=10
    python -m finetune.train -m experiment=finetune,scratch,frozen seed=0,1,2
    python -m finetune.train resume=logs/runs/<run>             # continue a stopped run, in a new folder
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from finetune.checkpoints import (
    InterruptCheckpoint,
    RngState,
    check_resumable,
    find_checkpoint,
    with_run_overrides,
)
from finetune.distributed import job_scope
from finetune.features import FeatureCacheDataModule
from finetune.results import EpochHistory, to_number, write_json_atomic

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate(cfg.data, _convert_="all")


def build_model(cfg: DictConfig, num_classes: int) -> pl.LightningModule:
    scheduler = cfg.get("scheduler")
    return instantiate(
        cfg.model,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        _convert_="all",
    )


def build_trainer(cfg: DictConfig, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + extra_callbacks
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train (selecting on val), test the best checkpoint once, and write ``results.json``.

    ``results.json`` says ``"status"``: ``completed``; ``interrupted`` (Ctrl+C or SIGTERM: the process then exits
    with 130 or 143, after saving ``checkpoints/interrupted.ckpt``); or ``failed``, with the error.
    """
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ensure_new_run_folder(output_dir)
    ckpt_path = resume_checkpoint(cfg)
    history = EpochHistory()
    trainer: pl.Trainer | None = None
    fitted: dict[str, Any] | None = None
    start = time.perf_counter()
    test_metrics: dict[str, float] = {}
    try:
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()  # the head's size depends on the class folders, so fetch data first
        model = build_model(cfg, datamodule.num_classes)
        if ckpt_path is not None:
            check_resumable(ckpt_path, model, datamodule)
            log.info("Resuming from %s", ckpt_path)
        if cfg.model.get("cache_features"):
            datamodule = FeatureCacheDataModule(datamodule, model)  # the frozen backbone runs once per split
        trainer = build_trainer(cfg, [history, RngState(), InterruptCheckpoint(output_dir / "checkpoints")])
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - start
        # Read everything from the fit now: testing a checkpoint restores the callbacks' state as of that epoch.
        fitted = _fit_record(trainer, history)
        if cfg.get("test_after_fit", True):
            # fast_dev_run and runs without checkpointing have no best checkpoint: test the weights in hand.
            best = fitted["best_checkpoint"]
            test_metrics = trainer.test(model, datamodule=datamodule, ckpt_path=best)[0]
    except BaseException as err:
        fitted = fitted or _fit_record(trainer, history)
        exit_code = _record_stop(err, trainer, cfg, output_dir, fitted, time.perf_counter() - start, ckpt_path)
        if exit_code:
            raise SystemExit(exit_code) from err
        raise

    results = _results(cfg, output_dir, "completed", fitted, test_metrics, fit_seconds, ckpt_path)
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "results.json", results)
        print(summary(results))
    return results


def _record_stop(
    err: BaseException,
    trainer: pl.Trainer | None,
    cfg: DictConfig,
    output_dir: Path,
    fitted: dict[str, Any],
    seconds: float,
    ckpt_path: Path | None,
) -> int:
    """Write ``results.json`` for a run that did not complete; the exit code for an interruption, else 0."""
    signum = _interrupting_signal(err, trainer)
    results = _results(cfg, output_dir, "interrupted" if signum else "failed", fitted, {}, seconds, ckpt_path)
    interrupted = output_dir / "checkpoints" / "interrupted.ckpt"
    results["interrupted_checkpoint"] = str(interrupted) if signum and interrupted.is_file() else None
    results["error"] = None if signum else f"{type(err).__name__}: {err}"[:4000]
    if rank_zero_only.rank == 0:
        write_json_atomic(output_dir / "results.json", results)
    if not signum:
        log.error("Run failed: %s (output folder %s)", results["error"], output_dir)
        return 0
    name = signal.Signals(signum).name
    log.warning("Interrupted by %s. Continue with: python -m finetune.train resume=%s", name, output_dir)
    return 128 + signum  # the shell's convention: 130 for Ctrl+C, 143 for SIGTERM


def _fit_record(trainer: pl.Trainer | None, history: EpochHistory) -> dict[str, Any]:
    # Not trainer.checkpoint_callback: that is the first Checkpoint of any kind, possibly the interrupt one.
    checkpoints = [
        c for c in (trainer.checkpoint_callbacks if trainer is not None else []) if isinstance(c, ModelCheckpoint)
    ]
    checkpoint = checkpoints[0] if checkpoints else None
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    return {
        "val/acc": to_number(checkpoint.best_model_score) if checkpoint is not None and best_path else None,
        "best_checkpoint": best_path or None,
        "last_checkpoint": (checkpoint.last_model_path or None) if checkpoint is not None else None,
        "history": list(history.history),
    }


def _results(
    cfg: DictConfig,
    output_dir: Path,
    status: str,
    fitted: dict[str, Any],
    test_metrics: dict[str, float],
    fit_seconds: float,
    resumed_from: Path | None,
) -> dict[str, Any]:
    return {
        "status": status,
        "experiment": cfg.get("name"),
        "backbone": cfg.model.backbone,
        "weights": None if cfg.model.weights is None else str(cfg.model.weights),
        "freeze": cfg.model.freeze,
        "seed": cfg.seed,
        "val/acc": fitted["val/acc"],
        "test/acc": to_number(test_metrics.get("test/acc")),
        "test/loss": to_number(test_metrics.get("test/loss")),
        "epochs": len(fitted["history"]),
        "fit_seconds": round(fit_seconds, 2),
        "best_checkpoint": fitted["best_checkpoint"],
        "last_checkpoint": fitted["last_checkpoint"],
        "output_dir": str(output_dir),
        "overrides": _overrides(),
        "history": fitted["history"],
        "resumed_from": None if resumed_from is None else os.path.abspath(resumed_from),
    }


def ensure_new_run_folder(output_dir: Path) -> None:
    """Refuse to start in a folder that already holds a run's results or checkpoints: never overwrite a run."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # a DDP worker process that Lightning launched into rank 0's folder
    found = [p.name for p in (output_dir / "results.json", output_dir / "eval_results.json") if p.exists()]
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    if found:
        raise FileExistsError(
            f"Output folder {str(output_dir)!r} already holds a run ({', '.join(found)}); a new run never writes "
            f"into an earlier run's folder. To continue that run, pass resume={output_dir} (it writes to a new "
            "folder); otherwise leave hydra.run.dir and paths.output_dir unset so that every run gets a new folder."
        )


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint to continue from: ``resume=RUN_DIR_OR_CKPT`` or Lightning's own ``ckpt_path=CKPT``."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume and ckpt_path:
        raise ValueError(f"Pass resume= or ckpt_path=, not both (got resume={resume}, ckpt_path={ckpt_path}).")
    if resume:
        return find_checkpoint(resume)
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no such checkpoint file. Pass a run's checkpoints/last.ckpt, or resume=RUN_DIR."
        )
    return Path(ckpt_path) if ckpt_path else None


def _interrupting_signal(err: BaseException, trainer: pl.Trainer | None) -> int:
    """SIGINT or SIGTERM if ``err`` is how the run was stopped by one (Lightning turns them into SystemExit), else 0."""
    if trainer is not None and trainer.received_sigterm:
        return signal.SIGTERM
    if isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt):
        return signal.SIGINT
    return signal.SIGTERM if isinstance(err, SystemExit) else 0


def summary(results: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join(
        [
            f"[{results['experiment']}] {results['backbone']} weights={results['weights']} seed={results['seed']}",
            f"  best val/acc {fmt(results['val/acc'])}   test/acc {fmt(results['test/acc'])}   "
            f"test/loss {fmt(results['test/loss'])}   epochs {results['epochs']}   fit {results['fit_seconds']:.1f}s",
            f"  best checkpoint: {results['best_checkpoint']}",
            f"  output folder:   {results['output_dir']}",
        ]
    )


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    with job_scope():  # DDP ranks start from this job (multiruns included), and leave nothing behind
        results = train(cfg)
    return results["val/acc"]  # what a Hydra sweeper optimises: validation, never test


def main() -> None:
    """The command line: ``resume=RUN_DIR`` first brings back that run's own overrides, then Hydra runs."""
    sys.argv = with_run_overrides(sys.argv)
    hydra_main()


if __name__ == "__main__":
    main()
