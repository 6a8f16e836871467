"""The first changes a researcher makes, each done as the "Where to change what" table of README.md and CONTRIBUTING.md
says (at most two files), and shown to take effect: a new loss, a new augmentation setting, a new backbone family, a
new experiment, a per-step schedule, a recipe extra over the fit.

Files a researcher would add to ``conf/`` are written into a folder on Hydra's search path (``hydra.searchpath``),
so the repository's own configs stay as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from finetune import backbones
from finetune.errors import SettingError
from finetune.losses import FocalLoss
from finetune.run import assemble, compose_config
from finetune.train import train

from .conftest import make_image_folder, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=8, n_test=2)


def searchpath(folder: Path) -> str:
    return f"hydra.searchpath=[file://{folder}]"


# --- 1. a new loss: src/finetune/losses.py + conf/model/criterion/<name>.yaml --------------------------------------
def test_focal_loss_is_cross_entropy_at_gamma_0_and_down_weights_easy_examples():
    logits, targets = torch.tensor([[3.0, -1.0], [0.2, 0.1], [-2.0, 2.0]]), torch.tensor([0, 1, 0])
    weight = [1.0, 3.0]
    assert FocalLoss(gamma=0)(logits, targets) == pytest.approx(F.cross_entropy(logits, targets).item())
    weighted = F.cross_entropy(logits, targets, weight=torch.tensor(weight)).item()
    assert FocalLoss(gamma=0, weight=weight)(logits, targets) == pytest.approx(weighted)
    soft = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.0, 1.0]])
    assert FocalLoss(gamma=0)(logits, soft) == pytest.approx(F.cross_entropy(logits, soft).item())  # mixup's
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    p_true = torch.exp(-per_sample)
    assert FocalLoss(gamma=2)(logits, targets) == pytest.approx(((1 - p_true) ** 2 * per_sample).mean().item())


def test_a_loss_is_swapped_by_config_alone_and_trains(tmp_path, data):
    cfg = compose_config(["model/criterion=focal", "model.criterion.gamma=1.5", "trainer.max_epochs=1"]
                         + tiny_overrides(data, tmp_path))  # fmt: skip
    run = assemble(cfg)
    assert isinstance(run.model.criterion, FocalLoss) and run.model.criterion.gamma == 1.5
    results = train(cfg)
    assert results["status"] == "completed" and math.isfinite(results["history"][0]["train/loss"])
    assert torch.load(results["last_checkpoint"], weights_only=True)["recipe"]["model.criterion"]["gamma"] == 1.5


# --- 2. an augmentation setting: src/finetune/data/transforms.py (argument, check, branch) + conf/data/folder.yaml ---
def test_an_augmentation_setting_is_one_argument_and_its_default_and_it_takes_effect(tmp_path, data):
    extended = ["data.augmentation._target_=tests.extended_transforms.train_transform"]
    cfg = compose_config(tiny_overrides(data, tmp_path) + [*extended, "+data.augmentation.color_jitter=0.4"])
    run = assemble(cfg)
    run.images.setup("fit")
    steps = [type(t).__name__ for t in run.images.train_transform().transforms]
    assert steps[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]
    assert run.images.hparams.augmentation["color_jitter"] == 0.4  # recorded in the checkpoints' data settings
    torch.manual_seed(0)
    image = run.images.train_set.dataset.loader(run.images.train_set.dataset.samples[0][0])
    outputs = {tuple(run.images.train_transform()(image).flatten()[:64].tolist()) for _ in range(4)}
    assert len(outputs) == 4  # the jitter draws new colours each time
    bad = compose_config(tiny_overrides(data, tmp_path / "bad") + [*extended, "+data.augmentation.color_jitter=2"])
    with pytest.raises(SettingError, match=r"data.augmentation.color_jitter must be in \[0, 1\], got 2"):
        assemble(bad)


# --- 3. a backbone family: src/finetune/backbones/<family>.py + one line in FAMILIES -----------------------------
def test_a_backbone_family_registered_in_one_place_builds_trains_and_scores(tmp_path, data, monkeypatch):
    monkeypatch.setattr(backbones, "FAMILIES", {"tiny/": "tests.tiny_family", **backbones.FAMILIES})  # before ""
    overrides = ["model.backbone=tiny/cnn", "trainer.max_epochs=2", "data.image_size=null", "data.resize_size=null"]
    results = train(compose_config(tiny_overrides(data, tmp_path) + overrides))
    assert results["status"] == "completed", results.get("error")
    checkpoint = torch.load(results["best_checkpoint"], weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone"] == "tiny/cnn"
    assert checkpoint["preprocessing"]["image_size"] == 48 and checkpoint["preprocessing"]["interpolation"] == "nearest"
    assert "net.3.weight" in checkpoint["state_dict"]  # the family's head, replaced as its build() said


# --- 4. an experiment: conf/experiment/<name>.yaml (+ its row in docs/configuration.md) ---------------------------
def test_a_new_experiment_is_one_yaml_and_sets_only_what_defines_it(tmp_path, data):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "slow_head.yaml").write_text(
        "# @package _global_\n# Fine-tuning with the head at only 3x the backbone's rate.\n"
        "defaults:\n  - finetune\n  - _self_\n\nmodel:\n  head_lr_mult: 3\n"
    )
    cfg = compose_config([searchpath(tmp_path / "conf"), "experiment=slow_head", "optimizer=adamw"]
                         + tiny_overrides(data, tmp_path / "run"))  # fmt: skip
    assert cfg.name == "slow_head" and cfg.model.head_lr_mult == 3 and cfg.model.freeze == "none"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"  # a swap still composes with it
    groups = {g["name"]: g["lr"] for g in assemble(cfg).model.configure_optimizers().param_groups}
    assert groups["head"] == pytest.approx(3 * groups["backbone"])


# --- 5. a per-step schedule: conf/scheduler/<name>.yaml (+ a function in schedules.py if torch has none) ----------
class Rates(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def test_a_per_step_schedule_is_one_yaml_and_keeps_the_head_ratio_at_every_step(tmp_path, data):
    (tmp_path / "conf" / "scheduler").mkdir(parents=True)
    (tmp_path / "conf" / "scheduler" / "halving.yaml").write_text(
        "# The rate halves after every optimizer step.\nscheduler:\n  _target_: torch.optim.lr_scheduler.StepLR\n"
        "  _partial_: true\n  step_size: 1\n  gamma: 0.5\ninterval: step\nfrequency: 1\n"
    )
    cfg = compose_config([searchpath(tmp_path / "conf"), "scheduler=halving", "optimizer.lr=0.01",
                          "trainer.max_epochs=2"] + tiny_overrides(data, tmp_path / "run"))  # fmt: skip
    rates = Rates()
    run = assemble(cfg, [rates])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    backbone = [step["backbone"] for step in rates.steps]
    assert len(backbone) == 6 and backbone == pytest.approx([0.01 * 0.5**i for i in range(6)])  # 3 steps an epoch
    assert all(step["head"] == pytest.approx(10 * step["backbone"]) for step in rates.steps)


# --- the scheduler shipped for it ---------------------------------------------------------------------------------
def test_scheduler_warmup_cosine_ships_as_a_config(tmp_path, data):
    cfg = compose_config(["scheduler=warmup_cosine", "scheduler.scheduler.warmup_fraction=0.25", "trainer.max_epochs=2"]
                         + tiny_overrides(data, tmp_path))  # fmt: skip
    rates = Rates()
    run = assemble(cfg, [rates])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    backbone = [step["backbone"] / cfg.optimizer.lr for step in rates.steps]
    assert backbone[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 2 warm-up steps of 8, then the full rate
    assert backbone[-1] == pytest.approx(0.0, abs=1e-12) and all(
        a >= b for a, b in zip(backbone[2:], backbone[3:], strict=False)
    )
    assert all(step["head"] == pytest.approx(10 * step["backbone"]) for step in rates.steps)


# --- 6. a recipe extra over the fit: src/finetune/callbacks/<name>.py + conf/callbacks/<name>.yaml ----------------
def test_a_recipe_extra_is_one_callback_and_its_yaml_checked_before_any_data_is_read(tmp_path, data):
    (tmp_path / "conf" / "callbacks").mkdir(parents=True)
    (tmp_path / "conf" / "callbacks" / "shrink_head.yaml").write_text(
        "# The head's weight scaled after every optimizer step: +callbacks=shrink_head\n"
        "shrink_head:\n  _target_: tests.extended_callbacks.ShrinkHead\n  factor: 0.5\n"
    )
    extra = [searchpath(tmp_path / "conf"), "+callbacks=shrink_head", "trainer.max_epochs=1", "calibrate=false"]
    results = train(compose_config([*extra, "callbacks.shrink_head.factor=0"] + tiny_overrides(data, tmp_path / "run")))
    assert results["status"] == "completed", results.get("error")
    head = torch.load(results["last_checkpoint"], weights_only=True)["state_dict"]["net.fc.weight"]
    assert head.abs().sum() == 0  # scaled to 0 after the last step: the callback ran in the fit
    nowhere = tiny_overrides(tmp_path / "no such folder", tmp_path / "bad")  # the data would fail, were it read
    with pytest.raises(SettingError, match=r"callbacks.shrink_head.factor must be in \[0, 1\], got 2"):
        assemble(compose_config([*extra, "callbacks.shrink_head.factor=2"] + nowhere))
