"""Train, then test the best checkpoint: ``python -m finetune.train [hydra overrides]``.

Examples::

    python -m finetune.train                                   # the book: ResNet-18, d2l hot dogs
    python -m finetune.train experiment=scratch trainer.max_epochs=10
    python -m finetune.train -m experiment=finetune,scratch,frozen seed=0,1,2
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
    """Fit on train (selecting on val), test the best checkpoint once, and write ``results.json``."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()  # the head's size depends on the class folders, so fetch data first
    model = build_model(cfg, datamodule.num_classes)
    if cfg.model.get("cache_features"):
        datamodule = FeatureCacheDataModule(datamodule, model)  # the frozen backbone runs once per split
    history = EpochHistory()
    trainer = build_trainer(cfg, [history])

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.perf_counter() - start

    # Read everything from the fit now: testing a checkpoint restores the callbacks' state as of that epoch.
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    best_score = to_number(checkpoint.best_model_score) if checkpoint is not None and best_path else None
    last_path = (checkpoint.last_model_path or None) if checkpoint is not None else None
    epoch_history = list(history.history)
    test_metrics: dict[str, float] = {}
    if cfg.get("test_after_fit", True):
        # fast_dev_run and runs without checkpointing have no best checkpoint: test the weights in hand.
        test_metrics = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None)[0]

    results = {
        "experiment": cfg.get("name"),
        "backbone": cfg.model.backbone,
        "weights": None if cfg.model.weights is None else str(cfg.model.weights),
        "freeze": cfg.model.freeze,
        "seed": cfg.seed,
        "val/acc": best_score,
        "test/acc": to_number(test_metrics.get("test/acc")),
        "test/loss": to_number(test_metrics.get("test/loss")),
        "epochs": len(epoch_history),
        "fit_seconds": round(fit_seconds, 2),
        "best_checkpoint": best_path or None,
        "last_checkpoint": last_path,
        "output_dir": str(output_dir),
        "overrides": _overrides(),
        "history": epoch_history,
    }
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "results.json", results)
        print(summary(results))
    return results


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
def main(cfg: DictConfig) -> float | None:
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    results = train(cfg)
    return results["val/acc"]  # what a Hydra sweeper optimises: validation, never test


if __name__ == "__main__":
    main()
