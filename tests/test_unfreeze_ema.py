"""+callbacks=unfreeze and +callbacks=ema: what trains in which epoch, at which rate; resume; bad settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.callbacks.ema import EMA, ema_multi_avg_fn
from finetune.callbacks.unfreeze import BackboneUnfreeze
from finetune.errors import SettingError
from finetune.harness.private import averaged_model
from finetune.module import FineTuneModule
from finetune.run import assemble, check_settings
from finetune.train import train

from .conftest import compose_config, make_image_folder, tiny_overrides

# 16 training images, batch 4: 4 optimizer steps an epoch. Momentum and a cosine schedule: optimizer state and
# per-epoch rates matter. MobileNetV3-small: BatchNorm everywhere, small enough for the CPU.
BASE_LR, MULT, EPOCHS, UNFREEZE = 0.01, 10, 3, 2
RECIPE = [
    "model.backbone=mobilenet_v3_small",
    f"model.head_lr_mult={MULT}",
    f"optimizer.lr={BASE_LR}",
    "optimizer.momentum=0.9",
    "scheduler=cosine",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
    "seed=5",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=10)


def _copy(tensors) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors}


class Recorder(pl.Callback):
    """Per step: the rate of each group and the BatchNorm modes; per epoch end: weights, statistics, optimizer state."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.epochs: list[dict] = []
        self.start: dict | None = None

    def snapshot(self, module: FineTuneModule) -> dict:
        head = {id(p) for p in module.head_parameters()}
        named = list(module.net.named_parameters())
        return {
            "backbone": _copy((n, p) for n, p in named if id(p) not in head),
            "head": _copy((n, p) for n, p in named if id(p) in head),
            "bn_stats": _copy(
                (f"{n}.{b}", getattr(m, b))
                for n, m in module.net.named_modules()
                if isinstance(m, _BatchNorm)
                for b in ("running_mean", "running_var")
            ),
        }

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.snapshot(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bns = [m for m in pl_module.frozen_batchnorms()]
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "lrs": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "bn_training": {m.training for m in bns},
            }
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        backbone = next(g for g in optimizer.param_groups if g["name"] == "backbone")
        state = self.snapshot(pl_module)
        state["backbone_has_optimizer_state"] = any(optimizer.state.get(p) for p in backbone["params"])
        self.epochs.append(state)


def _recipe(*extra: str, callbacks: tuple[str, ...] = ("unfreeze",)) -> list[str]:
    """RECIPE with these callbacks (one ``+callbacks=[...]``: Hydra takes one such override per command line)."""
    added = [f"+callbacks=[{','.join(callbacks)}]"] if callbacks else []
    unfreeze = [f"callbacks.unfreeze.epoch={UNFREEZE}"] if "unfreeze" in callbacks else []
    return [*added, *RECIPE, *unfreeze, *extra]


def _run(data: Path, out: Path, *extra: str, recorder: pl.Callback | None = None) -> tuple[dict, FineTuneModule]:
    callbacks = ("unfreeze", *[e.split("=", 1)[1] for e in extra if e.startswith("+callbacks=")])
    overrides = _recipe(*[e for e in extra if not e.startswith("+callbacks=")], callbacks=callbacks)
    cfg = compose_config(overrides + tiny_overrides(data, out))
    pl.seed_everything(cfg.seed, workers=True)
    run = assemble(cfg, [recorder] if recorder else [])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return cfg, run.model


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="images"),
        pytest.param(["features=cached"], id="cached-features"),
        pytest.param(
            ["trainer.precision=bf16-mixed", "+callbacks=channels_last", "+callbacks=ema", "callbacks.ema.decay=0.9"],
            id="bf16-cl-ema",
        ),
    ],
)
def test_the_backbone_is_frozen_until_its_epoch_then_trains_at_its_rate(tmp_path, data, extra):
    recorder = Recorder()
    _run(data, tmp_path / "run", *extra, recorder=recorder)
    start, epochs = recorder.start, recorder.epochs
    assert len(epochs) == EPOCHS
    before = [start] + epochs
    for epoch in range(EPOCHS):
        frozen = epoch < UNFREEZE
        prev, now = before[epoch], before[epoch + 1]
        assert _same(prev["backbone"], now["backbone"]) is frozen, epoch  # weights move only once unfrozen
        assert _same(prev["bn_stats"], now["bn_stats"]) is frozen, epoch  # and so do the BatchNorm statistics
        assert not _same(prev["head"], now["head"]), epoch  # the head trains all along
        assert now["backbone_has_optimizer_state"] is not frozen, epoch  # momentum starts at the unfreeze

    assert len(recorder.steps) == 4 * EPOCHS
    for step in recorder.steps:
        epoch, lrs = step["epoch"], step["lrs"]
        head = BASE_LR * MULT * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2  # cosine over max_epochs
        assert lrs["head"] == pytest.approx(head, rel=1e-9)
        assert lrs["backbone"] == (0.0 if epoch < UNFREEZE else pytest.approx(head / MULT, rel=1e-9))
        assert step["bn_training"] == {epoch >= UNFREEZE}  # frozen BatchNorm in eval mode, then training


def test_a_run_stopped_before_the_unfreeze_and_resumed_after_it_equals_a_straight_run(tmp_path, data):
    def run(out: str, *more: str) -> dict:
        recipe = _recipe("callbacks.ema.decay=0.9", *more, callbacks=("unfreeze", "ema"))
        return train(compose_config(recipe + tiny_overrides(data, tmp_path / out)))

    straight = run("straight")
    run("first", "+trainer.max_steps=4", "test_after_fit=false")  # stops after epoch 0, before the unfreeze at 2
    resumed = run("resumed", f"resume={tmp_path / 'first'}")
    assert [e["epoch"] for e in resumed["history"]] == [0, 1, 2]
    assert resumed["history"] == straight["history"]
    assert (resumed["val/acc"], resumed["test/acc"], resumed["test/loss"]) == (
        straight["val/acc"],
        straight["test/acc"],
        straight["test/loss"],
    )
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=False) for r in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 12
    for key in ("state_dict", "current_model_state"):
        assert _same(a[key], b[key])
    assert not _same(a["state_dict"], a["current_model_state"])  # the checkpoint holds the average
    groups = [[(g["name"], g["lr"]) for g in c["optimizer_states"][0]["param_groups"]] for c in (a, b)]
    assert groups[0] == groups[1]
    states = [c["optimizer_states"][0]["state"] for c in (a, b)]
    assert states[0].keys() == states[1].keys()
    for index in states[0]:
        assert torch.equal(states[0][index]["momentum_buffer"], states[1][index]["momentum_buffer"])


def test_the_cached_probe_epochs_are_the_frozen_experiment_on_cached_features(tmp_path, data):
    """experiment=lpft's first epochs: the frozen experiment with cached features, step for step."""
    common = ["model.backbone=mobilenet_v3_small", "optimizer.momentum=0.9", "trainer.deterministic=true", "seed=5"]
    frozen = train(
        compose_config(
            ["experiment=frozen", "features=cached", "data.augmentation=null", "trainer.max_epochs=2", *common]
            + tiny_overrides(data, tmp_path / "frozen")
        )
    )
    staged = train(
        compose_config(
            ["features=cached", "+callbacks=[unfreeze]", "callbacks.unfreeze.epoch=2", "trainer.max_epochs=3", *common]
            + tiny_overrides(data, tmp_path / "staged")
        )
    )
    assert staged["history"][:2] == frozen["history"]
    assert staged["history"][2]["train/loss"] != frozen["history"][1]["train/loss"]


def test_ema_warms_up_then_averages_with_its_decay():
    update = ema_multi_avg_fn(0.99)
    average, current = [torch.zeros(3)], [torch.ones(3)]
    update(average, current, torch.tensor(0))  # (1 + 0) / (10 + 0) = 0.1: mostly the current weights
    assert torch.allclose(average[0], torch.full((3,), 0.9))
    average = [torch.zeros(3)]
    update(average, current, torch.tensor(10_000))  # warmed up: the decay itself
    assert torch.allclose(average[0], torch.full((3,), 0.01))
    counts = [torch.tensor(3)]
    update(counts, [torch.tensor(7)], torch.tensor(5))
    assert counts[0].item() == 7  # integer buffers take the latest value


def test_ema_validates_and_checkpoints_the_average(tmp_path, data):
    cfg = compose_config(
        _recipe("callbacks.ema.decay=0.5", callbacks=("unfreeze", "ema")) + tiny_overrides(data, tmp_path)
    )
    results = train(cfg)
    best = torch.load(results["best_checkpoint"], weights_only=False)
    average, trained = best["state_dict"], best["current_model_state"]
    assert int(best["averaging_state"]["n_averaged"]) == 4 * (best["epoch"] + 1)
    assert not _same(average, trained)
    model = FineTuneModule.load_from_checkpoint(results["best_checkpoint"], weights=None)
    assert _same(model.state_dict(), average)  # evaluate/predict load the average


@pytest.mark.parametrize(
    ("callbacks", "overrides", "message"),
    [
        (
            ("unfreeze",),
            ["callbacks.unfreeze.epoch=3"],
            r"callbacks.unfreeze.epoch=3 is not below trainer.max_epochs=3",
        ),
        (("unfreeze",), ["model.freeze=backbone"], r"callbacks.unfreeze needs model.freeze=none \(got 'backbone'\)"),
        (("unfreeze",), ["callbacks.unfreeze.epoch=0"], r"callbacks.unfreeze.epoch must be an integer >= 1"),
        (("ema",), ["callbacks.ema.decay=1.0"], r"callbacks.ema.decay must be strictly between 0 and 1"),
        (("ema",), ["callbacks.ema.decay=0"], r"callbacks.ema.decay must be strictly between 0 and 1"),
        ((), ["features=cached"], r"features=cached needs model.freeze=backbone or \+callbacks=unfreeze"),
        (("unfreeze", "mixup"), ["features=cached"], r"callbacks.mixup mixes training images, but features=cached"),
    ],
)
def test_bad_settings_are_refused_by_name_before_anything_is_built(tmp_path, data, callbacks, overrides, message):
    cfg = compose_config(_recipe(*overrides, callbacks=callbacks) + tiny_overrides(data, tmp_path))
    with pytest.raises(SettingError, match=message):
        check_settings(cfg)
        assemble(cfg)  # constructors check their own arguments


def test_with_unfreezing_the_model_keeps_two_groups_even_at_head_lr_mult_1(tmp_path, data):
    cfg = compose_config(_recipe("model.head_lr_mult=1") + tiny_overrides(data, tmp_path))
    run = assemble(cfg)
    assert [g["name"] for g in run.model.parameter_groups()] == ["backbone", "head"]
    assert [type(c) for c in run.trainer.callbacks if isinstance(c, BackboneUnfreeze)] == [BackboneUnfreeze]


def test_a_checkpoint_written_during_validation_still_keeps_the_trained_weights_apart(tmp_path, data):
    """A stop signal can save a checkpoint mid-validation, while the average is swapped into the model."""
    overrides = _recipe("callbacks.ema.decay=0.5", "trainer.max_epochs=1", callbacks=("ema",))
    cfg = compose_config(overrides + tiny_overrides(data, tmp_path))
    run = assemble(cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    ema = next(c for c in run.trainer.callbacks if isinstance(c, EMA))
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}  # after fit: the average (on_train_end)
    averaged_model(ema).update_parameters(run.model)  # make the average differ from the weights in the model
    with torch.no_grad():
        for p in run.model.net.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    averaged = {k.removeprefix("module."): v.clone() for k, v in averaged_model(ema).state_dict().items()
                if k.startswith("module.")}  # fmt: skip
    assert not _same(trained, averaged)
    for swapped in (False, True):  # at an epoch end, and mid-validation (the average swapped in)
        if swapped:
            ema.on_validation_epoch_start(run.trainer, run.model)
        checkpoint = {"state_dict": {k: v.clone() for k, v in run.model.state_dict().items()}}
        ema.on_save_checkpoint(run.trainer, run.model, checkpoint)
        assert _same(checkpoint["state_dict"], averaged), swapped
        assert _same(checkpoint["current_model_state"], trained), swapped
    ema.on_validation_epoch_end(run.trainer, run.model)
    assert _same(run.model.state_dict(), trained)
