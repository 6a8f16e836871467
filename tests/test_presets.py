"""Callback presets (+callbacks=...), debug=... presets and the application's --help: each composes and runs."""

import csv

import pytest
from pytorch_lightning.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichModelSummary,
    RichProgressBar,
)

from finetune.run import build_trainer
from finetune.train import train

from .conftest import REPO, compose_config, run_cli, tiny_overrides

# Every experiment config, as the help lists them (a new one must show up there).
EXPERIMENTS = ", ".join(sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
CALLBACKS = ", ".join(sorted(p.stem for p in (REPO / "conf" / "callbacks").glob("*.yaml")))


def _callbacks(overrides: list[str]) -> list[str]:
    return sorted(compose_config(overrides).get("callbacks") or {})


def test_callback_presets_add_to_or_replace_the_default():
    assert _callbacks([]) == ["epoch_summary", "model_checkpoint"]
    assert _callbacks(["+callbacks=early_stopping"]) == ["early_stopping", "epoch_summary", "model_checkpoint"]
    assert _callbacks(["+callbacks=[lr_monitor,rich]"]) == [
        "epoch_summary",
        "lr_monitor",
        "model_checkpoint",
        "rich_model_summary",
        "rich_progress_bar",
    ]
    assert _callbacks(["callbacks=[default,early_stopping,lr_monitor]"]) == [
        "early_stopping",
        "epoch_summary",
        "lr_monitor",
        "model_checkpoint",
    ]
    assert _callbacks(["callbacks=early_stopping"]) == ["early_stopping"]
    assert _callbacks(["callbacks=[]"]) == []


def test_early_stopping_stops_when_val_acc_stalls(tmp_path, tiny_folder):
    # No epoch can beat the first by 2 (accuracy is at most 1): patience 1 stops after the second epoch.
    cfg = compose_config(
        [
            "+callbacks=early_stopping",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=2.0",
            "trainer.max_epochs=5",
            "trainer.limit_train_batches=1",
        ]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    trainer = build_trainer(cfg)
    assert any(isinstance(c, EarlyStopping) and c.monitor == "val/acc" for c in trainer.callbacks)
    results = train(cfg)
    assert results["status"] == "completed" and results["epochs"] == 2


def test_lr_monitor_logs_both_parameter_groups(tmp_path, tiny_folder):
    cfg = compose_config(
        ["+callbacks=lr_monitor", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    assert any(isinstance(c, LearningRateMonitor) for c in build_trainer(cfg).callbacks)
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    backbone = [float(r["lr-SGD/backbone"]) for r in rows if r.get("lr-SGD/backbone")]
    head = [float(r["lr-SGD/head"]) for r in rows if r.get("lr-SGD/head")]
    assert backbone == [pytest.approx(6.4e-3)] and head == [pytest.approx(6.4e-2)]  # the book's 10x head


def test_rich_preset_replaces_the_progress_bar_and_summary(tmp_path, tiny_folder):
    cfg = compose_config(
        ["+callbacks=rich", "trainer.fast_dev_run=true"]
        + tiny_overrides(tiny_folder, tmp_path)
        + ["trainer.enable_progress_bar=true", "trainer.enable_model_summary=true"]
    )
    trainer = build_trainer(cfg)
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
    assert any(isinstance(c, RichModelSummary) for c in trainer.callbacks)
    assert train(cfg)["status"] == "completed"


@pytest.mark.parametrize("preset", ["fdr", "overfit", "limit", "profiler"])
def test_debug_presets_compose_like_lightning_hydra_template(preset):
    cfg = compose_config([f"debug={preset}"])
    assert cfg.logger is None and cfg.callbacks is None
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.detect_anomaly) == ("cpu", 1, True)
    assert cfg.data.num_workers == 0
    expected = {
        "fdr": {"fast_dev_run": True},
        "overfit": {"overfit_batches": 3, "max_epochs": 20},
        "limit": {"limit_train_batches": 3, "limit_val_batches": 2, "limit_test_batches": 2, "max_epochs": 3},
        "profiler": {"max_epochs": 1},
    }[preset]
    assert {key: cfg.trainer[key] for key in expected} == expected
    assert cfg.name == "finetune", "a debug preset leaves the experiment alone"
    # Command-line overrides still win over the preset.
    assert compose_config([f"debug={preset}", "trainer.accelerator=gpu"]).trainer.accelerator == "gpu"


@pytest.mark.parametrize("preset", ["fdr", "overfit", "limit", "profiler"])
def test_debug_presets_run(tmp_path, tiny_folder, preset):
    overrides = [f"debug={preset}"] + tiny_overrides(tiny_folder, tmp_path)
    if preset == "overfit":
        overrides.append("trainer.max_epochs=2")
    results = train(compose_config(overrides))
    assert results["status"] == "completed"
    assert results["best_checkpoint"] is None, "debug runs keep no checkpoints"
    assert results["epochs"] == {"fdr": 1, "overfit": 2, "limit": 3, "profiler": 1}[preset]
    assert not (tmp_path / "csv").exists(), "debug runs have no logger"
    if preset == "profiler":
        report = (tmp_path / "fit-profile.txt").read_text()
        assert "run_training_epoch" in report


@pytest.mark.slow
def test_help_lists_groups_experiments_and_overrides():
    out = run_cli(["--help"], timeout=300)
    text = out.stdout
    assert "Usage: python -m finetune.train" in text
    assert f"experiment: {EXPERIMENTS}" in text
    assert "logger: csv, mlflow, tensorboard, wandb" in text
    assert f"callbacks: {CALLBACKS}" in text and "early_stopping" in CALLBACKS and "ema" in CALLBACKS
    assert "debug: default, fdr, limit, overfit, profiler" in text
    for override in ("model.backbone=timm/NAME", "+logger=", "+callbacks=[ema,mixup]", "debug=fdr", "resume=RUN_DIR"):
        assert override in text, override


def test_model_checkpoint_is_still_the_default_callback(tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    checkpoints = [c for c in build_trainer(cfg).callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].monitor == "val/acc"
