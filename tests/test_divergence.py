"""A run whose loss stops being finite fails at once, naming the learning rate, and nothing takes its weights after:
no test, no temperature, no checkpoint of broken weights, and no later command scores such a checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from finetune.calibrate import calibrate
from finetune.errors import DivergedError
from finetune.evaluate import evaluate
from finetune.harness.checkpoint_io import check_finite_weights
from finetune.module import FineTuneModule
from finetune.run import compose_config
from finetune.scoring import Scorer
from finetune.soup import soup
from finetune.train import train

from .conftest import run_cli, tiny_overrides, without
from .inference import eval_config

TOO_HIGH = ["optimizer.lr=1e9", "trainer.max_epochs=2"]  # SGD at 1e9 (the head at 1e10): nan within an epoch
NAMES_THE_RATE = r"optimizer\.lr=1e\+09 \(the head's: 1e\+10, optimizer\.lr x model\.head_lr_mult=10\)"


class PoisonRunningStats(pl.Callback):
    """Test-only: every BatchNorm's running mean becomes nan when the second epoch starts. Training normalises with
    batch statistics, so its loss stays finite; validation uses the running ones, so ``val/loss`` is nan."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            for module in pl_module.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.fill_(float("nan"))


def no_nan(constant: str) -> None:
    raise AssertionError(f"results.json holds {constant}, which is not JSON")


def assert_failed_untested(out: Path) -> dict:
    """The run's results.json: failed with the divergence, no test, no temperature; every checkpoint it left (from
    before it diverged) holds finite weights, and none was saved when it stopped."""
    results = json.loads((out / "results.json").read_text(), parse_constant=no_nan)  # plain JSON: no NaN in it
    assert results["status"] == "failed" and results["error"].startswith("DivergedError: Training diverged: ")
    assert results["test/acc"] is None and results["test/loss"] is None and results["test/confusion_matrix"] is None
    assert not any(key.startswith("val/temperature") for key in results)
    checkpoints = sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    assert "interrupted.ckpt" not in [c.name for c in checkpoints]
    for path in checkpoints:
        check_finite_weights(torch.load(path, weights_only=True)["state_dict"], path)
    return results


@pytest.mark.slow
def test_a_diverging_run_ends_in_one_error_line_that_names_the_learning_rate(tmp_path, tiny_folder):
    out = tmp_path / "run"
    args = [*without(tiny_overrides(tiny_folder, out), "paths.output_dir"), f"hydra.run.dir={out}", *TOO_HIGH]
    done = run_cli(args, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.match(r"Error: Training diverged: the training loss is (nan|inf|-inf) in epoch 1 \(batch \d\)", errors[0])
    assert re.search(NAMES_THE_RATE, errors[0]) and "trainer.gradient_clip_val=1.0" in errors[0]
    assert errors[0] in (out / "train.log").read_text()
    results = assert_failed_untested(out)
    assert results["error"] == f"DivergedError: {errors[0].removeprefix('Error: ')}"
    assert "test/acc" not in done.stdout and "temperature" not in done.stdout  # no test table, no summary


@pytest.mark.parametrize(
    "recipe",
    [
        [],
        [
            "+callbacks=ema",
            "callbacks.ema.decay=0.9",
        ],  # the average of nan weights is nan: validation and checkpoints would use it
        ["+callbacks=mixup", "callbacks.mixup.mixup_alpha=0.4"],  # the loss of soft targets
        [
            "+callbacks=[mixup,ema]",
            "callbacks.mixup.mixup_alpha=0",
            "callbacks.mixup.cutmix_alpha=1.0",
            "callbacks.ema.decay=0.9",
            "calibrate=false",
        ],  # fmt: skip
        ["experiment=frozen"],  # diverges on the last batch of epoch 2: found before that epoch is validated
        ["experiment=frozen", "trainer.limit_val_batches=0"],  # ... and without validation, at the epoch's end
    ],
    ids=["plain", "ema", "mixup", "cutmix-ema", "frozen", "frozen-unvalidated"],
)
def test_divergence_fails_the_run_whatever_the_recipe(tmp_path, tiny_folder, recipe):
    with pytest.raises(DivergedError, match=f"^Training diverged: the training loss is .*{NAMES_THE_RATE}"):
        train(compose_config(tiny_overrides(tiny_folder, tmp_path) + TOO_HIGH + recipe))
    assert_failed_untested(tmp_path)


def test_a_nan_validation_loss_fails_the_run_before_its_checkpoint_is_saved(tmp_path, tiny_folder):
    poison = f"+callbacks.poison._target_={__name__}.PoisonRunningStats"
    overrides = tiny_overrides(tiny_folder, tmp_path) + ["trainer.max_epochs=3", "optimizer.lr=0.01", poison]
    with pytest.raises(DivergedError, match=r"^Training diverged: val/loss is nan after epoch 2 \(its largest"):
        train(compose_config(overrides))
    results = assert_failed_untested(tmp_path)
    assert [e["epoch"] for e in results["history"]] == [0]  # the first epoch, finite, is all the run recorded
    assert not list((tmp_path / "checkpoints").glob("epoch01*"))  # epoch 2's weights were never saved


@pytest.fixture(scope="module")
def broken_checkpoint(tmp_path_factory, tiny_folder) -> Path:
    """A checkpoint such as a diverged run wrote before runs stopped on it: a real one with nan in its head."""
    out = tmp_path_factory.mktemp("run")
    overrides = ["trainer.max_epochs=1", "calibrate=false", "test_after_fit=false"]
    results = train(compose_config(overrides + tiny_overrides(tiny_folder, out)))
    checkpoint = torch.load(results["last_checkpoint"], weights_only=True)
    checkpoint["state_dict"]["net.fc.weight"].fill_(float("nan"))
    path = out / "diverged.ckpt"
    torch.save(checkpoint, path)
    return path


REFUSED = r"ckpt_path=.*diverged\.ckpt: 1 of its weight tensors hold nan or inf \(e\.g\. net\.fc\.weight\)"


def test_evaluate_refuses_a_checkpoint_with_nan_weights(broken_checkpoint, tiny_folder, tmp_path):
    with pytest.raises(DivergedError, match=REFUSED):
        evaluate(eval_config(broken_checkpoint, tiny_folder, tmp_path / "eval"))


def test_calibrate_and_soup_refuse_a_checkpoint_with_nan_weights(broken_checkpoint, tiny_folder, tmp_path):
    data = ["data=folder", f"data.root={tiny_folder}", "data.num_workers=0", "data.batch_size=4"]
    cfg = compose_config(
        [f"ckpt_path={broken_checkpoint}", *data, f"paths.output_dir={tmp_path / 'cal'}"], config_name="calibrate"
    )
    with pytest.raises(DivergedError, match=REFUSED):
        calibrate(cfg)
    finite = broken_checkpoint.parent / "checkpoints" / "last.ckpt"
    ckpts = f"ckpts=[{finite},{broken_checkpoint}]"
    cfg = compose_config(["method=uniform", ckpts, *data, f"paths.output_dir={tmp_path / 'soup'}"], config_name="soup")
    with pytest.raises(DivergedError, match=REFUSED.replace("ckpt_path", "ckpts")):
        soup(cfg)


def test_a_nan_batch_makes_the_epoch_loss_nan_instead_of_vanishing_from_it():
    model = FineTuneModule(num_classes=2, weights=None)
    for metric in (model.train_loss, model.val_loss, Scorer(model).test_loss):
        metric.update(torch.tensor(1.0), weight=3)
        metric.update(torch.tensor(3.0), weight=1)
        assert float(metric.compute()) == pytest.approx(1.5)  # weighted by the images of each batch
        metric.update(torch.tensor(float("nan")), weight=4)
        assert math.isnan(float(metric.compute()))
