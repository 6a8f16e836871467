"""Configs compose, experiments run end to end, every run writes its own results.json."""

import csv
import json
import math
from pathlib import Path

import pytest
from hydra.utils import instantiate

from finetune.evaluate import evaluate
from finetune.run import backbone_preprocessing
from finetune.train import train

from .conftest import assert_counted_accuracy, compose_config, count_correct, run_cli, tiny_overrides, without


@pytest.mark.parametrize(
    "experiment, weights, freeze, head_lr_mult, lr",
    [
        ("finetune", "imagenet", "none", 10, 6.4e-3),
        ("scratch", None, "none", 1, 6.4e-2),
        ("frozen", "imagenet", "backbone", 10, 6.4e-3),
    ],
)
def test_experiment_configs_compose_to_the_book_recipe(tmp_path, experiment, weights, freeze, head_lr_mult, lr):
    cfg = compose_config([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert cfg.name == experiment
    assert (cfg.model.backbone, cfg.model.weights, cfg.model.freeze) == ("resnet18", weights, freeze)
    assert cfg.model.head_lr_mult == head_lr_mult
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.momentum) == (lr, 7.8e-6, 0.0)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (128, 5)
    assert cfg.data.download.sha1 == "fba480ffa8aa7e0febbb511d181409f899b9baa5"


def test_pretrained_weights_reach_finetune_and_frozen_but_not_scratch(tmp_path):
    weights = {
        experiment: compose_config([f"experiment={experiment}", "pretrained_weights=/w.pth"]).model.weights
        for experiment in ("finetune", "frozen", "scratch")
    }
    assert weights == {"finetune": "/w.pth", "frozen": "/w.pth", "scratch": None}
    assert compose_config(["experiment=scratch", "model.weights=/w.pth"]).model.weights == "/w.pth"


def test_default_config_is_finetune_on_hotdog_with_resnet18(tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    assert (cfg.name, cfg.model.backbone, cfg.model.weights) == ("finetune", "resnet18", "imagenet")
    assert cfg.data.root.endswith("hotdog") and cfg.data.image_size is None  # null: the backbone's
    images = instantiate(cfg.data, **backbone_preprocessing(cfg))
    assert (images.hparams.image_size, images.resize_size) == (224, 256)  # resnet18's: the book's 224 of 256


@pytest.mark.parametrize("experiment", ["finetune", "scratch", "frozen"])
def test_each_experiment_completes_a_fast_dev_run(tmp_path, tiny_folder, experiment):
    cfg = compose_config(
        [f"experiment={experiment}", "trainer.fast_dev_run=true", *count_correct(tmp_path / "counts.json")]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    results = train(cfg)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["experiment"] == experiment and written["freeze"] == cfg.model.freeze
    counted = json.loads((tmp_path / "counts.json").read_text())
    assert_counted_accuracy(written["test/acc"], counted["test"], total=4)  # fast_dev_run: one test batch of 4
    assert_counted_accuracy(written["history"][0]["val/acc"], counted["val"][0], total=4)  # 2 of 10 per class
    assert math.isfinite(written["test/loss"]) and written["test/loss"] >= 0  # float32 cross-entropy can reach 0
    assert [entry["epoch"] for entry in written["history"]] == [0]
    assert set(written["history"][0]) == {"epoch", "train/loss", "train/acc", "val/loss", "val/acc"}


def test_full_run_checkpoints_best_and_last_and_tests_the_best(tmp_path, tiny_folder):
    overrides = ["experiment=finetune", "trainer.max_epochs=2", "optimizer.lr=0.01"] + tiny_overrides(
        tiny_folder, tmp_path
    )
    results = train(compose_config(overrides))
    assert results["epochs"] == 2 and [e["epoch"] for e in results["history"]] == [0, 1]
    assert Path(results["best_checkpoint"]).is_file() and Path(results["last_checkpoint"]).name == "last.ckpt"
    assert results["val/acc"] == max(e["val/acc"] for e in results["history"])
    with open(tmp_path / "csv" / "metrics.csv") as f:  # what the logger wrote agrees with results.json
        logged = [row for row in csv.DictReader(f) if row.get("test/acc")]
    assert [float(row["test/acc"]) for row in logged] == [pytest.approx(results["test/acc"])]
    assert results["fit_seconds"] > 0

    eval_dir = tmp_path / "eval"
    evaluated = evaluate(
        compose_config(
            [
                "data=folder",
                f"data.root={tiny_folder}",
                "data.image_size=32",
                "data.resize_size=36",
                "data.num_workers=0",
                "trainer.accelerator=cpu",
                f"ckpt_path={results['best_checkpoint']}",
                f"paths.output_dir={eval_dir}",
            ],
            config_name="eval",
        )
    )
    assert evaluated["test/acc"] == pytest.approx(results["test/acc"])
    assert json.loads((eval_dir / "eval_results.json").read_text())["test/acc"] == pytest.approx(results["test/acc"])


def test_tensorboard_logger_is_selectable(tmp_path, tiny_folder):
    overrides = ["logger=tensorboard", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    cfg = compose_config(overrides + tiny_overrides(tiny_folder, tmp_path))
    train(cfg)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_multirun_over_the_three_experiments_writes_three_separate_results(tmp_path, tiny_folder):
    done = run_cli(
        [
            "-m",
            "experiment=finetune,scratch,frozen",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            *without(tiny_overrides(tiny_folder, tmp_path), "paths.output_dir"),
        ]
    )
    results = sorted((tmp_path / "logs" / "multiruns").glob("*/*/results.json"))
    assert len(results) == 3 and len({r.parent for r in results}) == 3
    assert sorted(json.loads(r.read_text())["experiment"] for r in results) == [
        "finetune",
        "frozen",
        "scratch",
    ]
    assert "[frozen]" in done.stdout and "test/acc" in done.stdout


def test_a_run_without_model_checkpoint_tests_its_final_weights(tmp_path, tiny_folder):
    overrides = ["~callbacks.model_checkpoint", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    overrides += count_correct(tmp_path / "counts.json")
    results = train(compose_config(overrides + tiny_overrides(tiny_folder, tmp_path)))
    assert results["status"] == "completed" and results["best_checkpoint"] is None and results["val/acc"] is None
    counted = json.loads((tmp_path / "counts.json").read_text())["test"]
    assert_counted_accuracy(results["test/acc"], counted, total=8)  # all 8 test images, on the final weights
    assert not (tmp_path / "checkpoints").exists()
