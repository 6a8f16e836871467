"""+callbacks=swa: the rates under SWALR keep every group's ratio, frozen BatchNorm stays frozen (cached features
too), the average is what the last checkpoint holds, resume mid-SWA equals a straight run, lr_find leaves it out."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import SettingError
from finetune.lr_find import lr_find
from finetune.run import assemble, check_settings
from finetune.train import train

from .conftest import compose_config, make_image_folder, tiny_overrides

LR, SWA_LR, MULT, EPOCHS, STEPS = 0.01, 0.05, 10, 3, 4  # 16 training images, batch 4: 4 steps an epoch
# SWA from the 2nd epoch (index 1): the rate anneals to SWA_LR over that epoch, the weights are averaged at its
# start and at the end of every later epoch; epoch index 3 is the BatchNorm pass of the average.
RECIPE = [
    "+callbacks=swa", f"callbacks.swa.swa_lrs={SWA_LR}", "callbacks.swa.swa_epoch_start=2",
    "model.backbone=mobilenet_v3_small", f"optimizer.lr={LR}", "optimizer.momentum=0.9", f"model.head_lr_mult={MULT}",
    f"trainer.max_epochs={EPOCHS}", "trainer.deterministic=true", "seed=3",
]  # fmt: skip


TEST_VIT = ["data.image_size=null", "data.resize_size=null"]  # its own 160 px


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=10)


class Recorder(pl.Callback):
    """The rates of every optimizer step; the weights at the end of each epoch; the BatchNorm state at the start."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.gradients: list[tuple[int, bool]] = []  # per optimizer step: whether any parameter had a gradient
        self.epoch_ends: list[dict[str, torch.Tensor]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append((trainer.current_epoch, {g["name"]: g["lr"] for g in optimizer.param_groups}))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.gradients.append((trainer.current_epoch, any(p.grad is not None for p in params)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _fit(data: Path, out: Path, *extra: str) -> tuple[Recorder, pl.LightningModule, dict]:
    recorder = Recorder()
    cfg = compose_config([*RECIPE, *tiny_overrides(data, out), *extra])  # extra wins
    run = assemble(cfg, [recorder])
    with torch.no_grad():  # statistics as pretrained weights bring them, unlike a reset's (mean 0, variance 1)
        for module in run.model.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    return recorder, run.model, last


@pytest.mark.parametrize(
    ("extra", "bases"),
    [
        pytest.param([], [LR, LR, SWA_LR], id="constant"),
        pytest.param(["scheduler=cosine"], [LR, LR * (1 + math.cos(math.pi / 3)) / 2, SWA_LR], id="cosine"),
        pytest.param(["model.groups.layer_decay=0.5"], [LR, LR, SWA_LR], id="layer-decay"),
    ],
)
def test_swalr_anneals_every_group_to_its_own_multiple_of_swa_lrs(tmp_path, data, extra, bases):
    recorder, _, _ = _fit(data, tmp_path, *extra)
    trained = [epoch for epoch, gradients in recorder.gradients if gradients]
    assert trained == [e for e in range(EPOCHS) for _ in range(STEPS)]  # the pass of the average (3) changes nothing
    for epoch, rates in recorder.steps[: len(trained)]:
        base = bases[epoch]
        assert rates["head"] == pytest.approx(MULT * base, rel=1e-12), epoch
        layers = {name: lr for name, lr in rates.items() if name.startswith("layer.")}
        if layers:
            depth = len(layers)
            expected = {f"layer.{i}": base * 0.5 ** (depth - i) for i in range(depth)}
            assert layers == pytest.approx(expected, rel=1e-12), epoch
        else:
            assert rates["backbone"] == pytest.approx(base, rel=1e-12), epoch


def _average(points: list[dict[str, torch.Tensor]], names) -> dict[str, torch.Tensor]:
    return {n: sum(p[n] for p in points) / len(points) for n in names}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["model.freeze=backbone"], id="frozen"),
        pytest.param(["model.batchnorm=frozen"], id="batchnorm-frozen"),  # every layer trains, no statistic moves
        pytest.param(["experiment=frozen", "features=cached", "data.augmentation=null"], id="cached-features"),
        pytest.param(  # no BatchNorm at all: Lightning would skip its last epoch and never checkpoint the average
            ["experiment=frozen", "features=cached", "model.backbone=timm/test_vit", *TEST_VIT],
            id="no-batchnorm",
            marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed"),
        ),
    ],
)
def test_frozen_batchnorm_stays_exactly_as_it_was_and_the_last_checkpoint_holds_the_average(tmp_path, data, extra):
    if "model.batchnorm=frozen" in extra:  # refused with random weights: give it a file of weights
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "weights.pth")
        extra = [*extra, f"model.weights={tmp_path / 'weights.pth'}"]
    recorder, model, last = _fit(data, tmp_path, *extra)
    buffers = {k for k in recorder.start if "running_" in k or "num_batches" in k}
    assert all(torch.equal(last["state_dict"][k], recorder.start[k]) for k in buffers)
    head = [n for n, _ in model.named_parameters() if n.startswith(f"net.{model.head_name}.")]
    expected = _average(recorder.epoch_ends[:EPOCHS], head)  # the ends of epochs 0 (= the start of 1), 1 and 2
    for name in head:
        assert torch.allclose(last["state_dict"][name], expected[name], atol=1e-7), name
        assert not torch.equal(last["state_dict"][name], recorder.epoch_ends[EPOCHS - 1][name])
    assert last["epoch"] == EPOCHS and len(recorder.epoch_ends) == EPOCHS + 1  # the pass of the average


def test_trained_batchnorm_is_recomputed_in_one_pass_over_the_average(tmp_path, data):
    recorder, model, last = _fit(data, tmp_path)
    names = [n for n, _ in model.named_parameters()]
    expected = _average(recorder.epoch_ends[:EPOCHS], names)
    assert all(torch.allclose(last["state_dict"][n], expected[n], atol=1e-7) for n in names)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert norms and {int(last["state_dict"][f"{n}.num_batches_tracked"]) for n, _ in norms} == {STEPS}
    assert {m.momentum for _, m in norms} == {0.01}  # mobilenet_v3's own, back after the pass


def test_results_count_the_pass_of_the_average_and_test_the_best_checkpoint(tmp_path, data):
    results = train(compose_config([*RECIPE, "calibrate=false"] + tiny_overrides(data, tmp_path)))
    assert results["status"] == "completed" and results["epochs"] == EPOCHS + 1
    assert results["last_checkpoint"].endswith("last.ckpt") and results["history"][-1]["epoch"] == EPOCHS


@pytest.mark.parametrize("stop", [8, 12], ids=["mid-swa", "before-the-average-pass"])
def test_a_run_stopped_during_swa_and_resumed_equals_a_straight_run(tmp_path, data, stop):
    def run(out: str, *extra: str) -> dict:
        return train(compose_config([*RECIPE, "scheduler=cosine", "calibrate=false", "test_after_fit=false", *extra]
                                    + tiny_overrides(data, tmp_path / out)))  # fmt: skip

    straight = run("straight")
    run("first", f"+trainer.max_steps={stop}")
    resumed = run("resumed", f"resume={tmp_path / 'first'}")
    assert resumed["history"] == straight["history"] and len(resumed["history"]) == EPOCHS + 1
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("straight", "resumed"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    with pytest.raises(ValueError, match="nothing left to train"):  # the pass of the average is done too
        run("again", f"resume={tmp_path / 'resumed'}")


def test_lr_find_leaves_swa_out_and_says_so(tmp_path, data, caplog):
    cfg = compose_config([*RECIPE, "lr_find.num_training=4", "lr_find.early_stop_threshold=null"]
                         + tiny_overrides(data, tmp_path), config_name="lr_find")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="finetune.lr_find"):
        result = lr_find(cfg)
    assert "callbacks swa left out" in caplog.text
    assert len(result["steps"]) == 4
    assert all(s["groups"]["head"] == pytest.approx(MULT * s["groups"]["backbone"]) for s in result["steps"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+callbacks=[swa,ema]"], r"callbacks.swa cannot be combined with callbacks.ema"),
        (["+callbacks=[lora,swa]"], r"callbacks.lora cannot be combined with callbacks.swa"),
        (["+callbacks=swa", "callbacks.swa.swa_lrs=0"], r"callbacks.swa.swa_lrs must be > 0, got 0"),
        (["+callbacks=swa", "callbacks.swa.swa_epoch_start=6"], r"swa_epoch_start=6 is after trainer.max_epochs=5"),
        (["+callbacks=swa", "callbacks.swa.swa_epoch_start=1.5"], r"callbacks.swa.swa_epoch_start must be in \(0, 1\]"),
        (["+callbacks=swa", "callbacks.swa.annealing_strategy=step"], r"callbacks.swa.annealing_strategy must be one"),
    ],
)
def test_bad_swa_settings_are_refused_by_name_before_anything_is_built(tmp_path, overrides, message):
    cfg = compose_config([*overrides, "trainer.max_epochs=5"] + tiny_overrides(tmp_path / "no data", tmp_path / "r"))
    with pytest.raises(SettingError, match=message):
        check_settings(cfg)
