"""The book's module: parameter groups and their rates under every schedule, frozen BatchNorm, the injected loss."""

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from finetune.data import ImageFolderDataModule
from finetune.errors import SettingError
from finetune.module import FineTuneModule
from finetune.run import build_model, check_settings
from finetune.schedules import warmup_cosine

from .conftest import compose_config, tiny_overrides

LR = 0.01


def _module(**kwargs) -> FineTuneModule:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=LR, weight_decay=1e-4))
    return FineTuneModule(num_classes=2, backbone="resnet18", weights=None, **kwargs)


def _groups(module: FineTuneModule) -> dict[str, tuple[float, set[int]]]:
    optimizer = module.configure_optimizers()
    return {g["name"]: (g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups}


def test_finetune_gives_the_head_ten_times_the_backbone_lr():
    module = _module(head_lr_mult=10)
    groups = _groups(module)
    head_ids = {id(p) for p in module.net.fc.parameters()}
    assert groups["head"] == (pytest.approx(0.1), head_ids)
    assert groups["backbone"][0] == pytest.approx(LR)
    assert groups["backbone"][1] == {id(p) for p in module.net.parameters()} - head_ids
    assert module.configure_optimizers().param_groups[0]["weight_decay"] == 1e-4


def test_scratch_trains_every_parameter_at_one_rate():
    groups = _groups(_module(head_lr_mult=1))
    assert groups["backbone"][0] == groups["head"][0] == pytest.approx(LR)
    assert len(groups["backbone"][1] | groups["head"][1]) == len(list(_module().net.parameters()))


def test_frozen_backbone_optimises_only_the_head():
    module = _module(freeze="backbone", head_lr_mult=10)
    groups = _groups(module)
    assert list(groups) == ["head"] and groups["head"] == (
        pytest.approx(0.1),
        {id(p) for p in module.net.fc.parameters()},
    )
    assert all(not p.requires_grad for p in module.backbone_parameters())


def _rates_over_steps(scheduler: dict, steps: int = 12) -> list[dict[str, float]]:
    """Each group's rate at every step of an optimizer driven as Lightning drives it (``lr_scheduler_step``)."""
    module = _module(head_lr_mult=10, scheduler=scheduler)
    config = module.configure_optimizers()
    optimizer, scheduling = config["optimizer"], config["lr_scheduler"]
    rates = []
    for _ in range(steps):
        rates.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        module.lr_scheduler_step(scheduling["scheduler"], None)
    return rates


SCHEDULES = {
    "cosine": functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=12),
    "onecycle": functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05, total_steps=13),
    "cyclic": functools.partial(torch.optim.lr_scheduler.CyclicLR, base_lr=0.001, max_lr=0.05, step_size_up=3),
    "warmup_cosine": functools.partial(warmup_cosine, total_steps=12, warmup_fraction=0.25),
    "linear": functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.1, total_iters=4),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_head_keeps_ten_times_the_backbone_rate_at_every_step_of_every_schedule(name):
    rates = _rates_over_steps({"scheduler": SCHEDULES[name], "interval": "step", "frequency": 1})
    assert len({round(r["backbone"], 12) for r in rates}) > 2  # the schedule really moves the rate
    for step in rates:
        assert step["head"] == pytest.approx(10 * step["backbone"], rel=1e-9)


def test_absolute_schedules_set_the_backbone_rate_they_name():
    # OneCycleLR(max_lr=0.05) peaks the backbone at 0.05 and the head at 0.5 (not both at 0.05).
    onecycle = _rates_over_steps({"scheduler": SCHEDULES["onecycle"], "interval": "step", "frequency": 1}, 13)
    assert max(r["backbone"] for r in onecycle) == pytest.approx(0.05, rel=1e-3)  # the peak falls between steps
    assert max(r["head"] for r in onecycle) == pytest.approx(0.5, rel=1e-3)
    warmup = _rates_over_steps({"scheduler": SCHEDULES["warmup_cosine"], "interval": "step", "frequency": 1})
    assert [round(r["backbone"] / LR, 6) for r in warmup[:4]] == [0.25, 0.5, 0.75, 1.0]  # 3 warm-up steps, then LR
    assert warmup[-1]["backbone"] < 0.01 * LR


class RecordRates(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def test_a_schedule_that_takes_total_steps_gets_the_runs_own(tmp_path, tiny_folder):
    """``scheduler=warmup_cosine`` and ``scheduler=onecycle`` leave total_steps to the module: the run's steps."""
    for name in ("warmup_cosine", "onecycle"):
        cfg = compose_config(
            [*tiny_overrides(tiny_folder, tmp_path / name), f"scheduler={name}", "trainer.max_epochs=2"]
        )
        model = build_model(cfg, 2)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        record = RecordRates()
        trainer.callbacks.append(record)
        datamodule = ImageFolderDataModule(tiny_folder, batch_size=4, num_workers=0, val_fraction=0.2, image_size=32)
        trainer.fit(model, datamodule=datamodule)
        rates = record.rates
        assert trainer.global_step == 8 and len(rates) == 8  # 16 training images, batch 4, 2 epochs
        if name == "onecycle":
            assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 8
        else:  # the cosine reaches its end (0) exactly at the run's last step
            assert rates[-1]["backbone"] == pytest.approx(0.0, abs=1e-12) and rates[-2]["backbone"] > 0
        assert all(r["head"] == pytest.approx(10 * r["backbone"]) for r in rates)


def test_a_bad_scheduler_interval_is_refused_by_name(tmp_path, tiny_folder):
    cfg = compose_config([*tiny_overrides(tiny_folder, tmp_path), "scheduler=cosine", "scheduler.interval=batch"])
    with pytest.raises(SettingError, match=r"scheduler.interval must be one of step, epoch"):
        check_settings(cfg)


def test_invalid_settings_are_refused_by_name(tmp_path, tiny_folder):
    base = tiny_overrides(tiny_folder, tmp_path)
    with pytest.raises(SettingError, match="Unknown model.freeze='layers'.*none.*backbone"):
        check_settings(compose_config([*base, "model.freeze=layers"]))
    with pytest.raises(SettingError, match="model.head_lr_mult must be > 0"):
        check_settings(compose_config([*base, "model.head_lr_mult=0"]))
    with pytest.raises(SettingError, match="optimizer.lr must be > 0"):
        check_settings(compose_config([*base, "optimizer.lr=0"]))
    with pytest.raises(SettingError, match="model.batchnorm must be one of train, frozen.*got 'eval'"):
        check_settings(compose_config([*base, "model.batchnorm=eval"]))
    with pytest.raises(SettingError, match="model.batchnorm=frozen .* model.weights is null.*model.batchnorm=train"):
        check_settings(compose_config([*base, "experiment=scratch", "model.batchnorm=frozen"]))


def _fit_two_epochs(module: FineTuneModule, tiny_folder) -> None:
    """train -> validate -> train: every mode switch Lightning makes."""
    datamodule = ImageFolderDataModule(tiny_folder, batch_size=4, num_workers=0, val_fraction=0.2, image_size=32)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)


def test_frozen_training_changes_only_the_head_and_no_batchnorm_statistic(tiny_folder):
    module = _module(freeze="backbone", head_lr_mult=10)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _fit_two_epochs(module, tiny_folder)

    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}
    batchnorms = module.frozen_batchnorms()
    assert len(batchnorms) == 20 and all(not bn.training for bn in batchnorms)
    assert module.net.layer1.training  # the rest of the network is in train mode as usual


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_keeps_its_statistics_while_every_layer_trains(tiny_folder, batchnorm):
    module = _module(batchnorm=batchnorm)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _fit_two_epochs(module, tiny_folder)

    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    statistics = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert len(statistics) == 60
    assert {"net.conv1.weight", "net.bn1.weight", "net.bn1.bias", "net.fc.weight"} <= changed  # every layer learns
    if batchnorm == "frozen":
        assert not changed & statistics and all(not bn.training for bn in module.frozen_batchnorms())
    else:
        assert statistics <= changed and all(bn.training for bn in module.frozen_batchnorms())


def test_groups_carry_an_lr_scale_that_the_optimizer_applies():
    module = _module(head_lr_mult=10)
    assert [(g["name"], g["lr_scale"]) for g in module.parameter_groups()] == [("backbone", 1.0), ("head", 10)]
    optimizer = module.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(LR), pytest.approx(0.1)]
    assert "lr" not in module.parameter_groups()[0]  # the groups never read the factory's lr


def test_features_go_through_the_head_alone_and_images_through_the_network():
    module = _module().eval()
    features = torch.randn(2, 512)
    assert torch.equal(module(features), module.net.fc(features))
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_the_injected_criterion_is_the_training_loss_and_validation_stays_the_nll():
    class Doubled(nn.Module):
        def forward(self, logits, targets):
            return 2 * nn.functional.cross_entropy(logits, targets)

    module = _module(criterion=Doubled())
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        plain = nn.functional.cross_entropy(module(batch[0]), batch[1])
    assert float(loss.detach()) == pytest.approx(2 * float(plain), rel=1e-5)
