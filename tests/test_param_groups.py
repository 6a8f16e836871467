"""model.groups: layer-wise learning-rate decay and norms/biases without weight decay, composed with freezing,
unfreezing, every scheduler and resume; the depth of torchvision and timm backbones."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from torch import nn

from finetune.errors import ResumeError, SettingError
from finetune.module import FineTuneModule
from finetune.param_groups import Grouping, blocks, layer_ids, norm_and_bias_names, parameter_groups
from finetune.run import assemble, check_settings
from finetune.train import train

from .conftest import compose_config, make_image_folder, tiny_overrides

LR, MULT, DECAY = 0.01, 10, 0.75
RESNET18_BLOCKS = ["conv1", "bn1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=10)


class Rates(pl.Callback):
    """Every group's rate (and weight decay) as the optimizer uses it, at every step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.weight_decay: dict[str, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        self.weight_decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}


def _fit(data: Path, out: Path, *extra: str, recorder: pl.Callback | None = None) -> FineTuneModule:
    overrides = [f"optimizer.lr={LR}", f"model.head_lr_mult={MULT}", "trainer.max_epochs=2", *extra]
    cfg = compose_config(overrides + tiny_overrides(data, out))
    run = assemble(cfg, [recorder] if recorder else [])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return run.model


def _expected_powers(step: dict[str, float], depth: int) -> dict[str, float]:
    """Each group's rate from the head's: the schedule's rate x decay ** (distance from the head)."""
    base = step["head"] / MULT
    return {"head": step["head"], **{f"layer.{i}": base * DECAY ** (depth - i) for i in range(depth)}}


@pytest.mark.parametrize("scheduler", [None, "cosine", "onecycle", "warmup_cosine"])
def test_each_block_learns_at_the_decay_to_the_power_of_its_distance_from_the_head_at_every_step(
    tmp_path, data, scheduler
):
    rates = Rates()
    extra = [f"scheduler={scheduler}"] if scheduler else []
    _fit(data, tmp_path, f"model.groups.layer_decay={DECAY}", *extra, recorder=rates)
    names = [f"layer.{i}" for i in range(len(RESNET18_BLOCKS))] + ["head"]
    assert len(rates.steps) == 8 and all(list(step) == names for step in rates.steps)
    for step in rates.steps:
        assert step == pytest.approx(_expected_powers(step, len(RESNET18_BLOCKS)), rel=1e-12, abs=0)
    heads = [step["head"] for step in rates.steps]
    if scheduler is None:
        assert heads[0] == pytest.approx(LR * MULT)
        assert rates.steps[0]["layer.0"] == pytest.approx(LR * DECAY**10) and rates.steps[0]["layer.9"] == LR * DECAY
    else:
        assert len(set(heads)) > 1  # the schedule moved the rates, and every ratio held


def test_layer_groups_compose_with_unfreezing_and_weight_decay_exclusions(tmp_path, data):
    rates = Rates()
    module = _fit(
        data, tmp_path,
        f"model.groups.layer_decay={DECAY}", "model.groups.norm_bias_weight_decay=0", "optimizer.weight_decay=1e-3",
        "+callbacks=unfreeze", "callbacks.unfreeze.epoch=1", "scheduler=cosine", "optimizer.momentum=0.9",
        recorder=rates,
    )  # fmt: skip
    depth = len(RESNET18_BLOCKS)
    frozen, unfrozen = rates.steps[:4], rates.steps[4:]
    for step in frozen:  # the first epoch: every backbone group at 0, the head at its rate
        assert {name for name, lr in step.items() if lr != 0} == {"head", "head.no_decay"}
    for step in unfrozen:
        for name, lr in step.items():
            base = name.removesuffix(".no_decay")
            assert lr == pytest.approx(_expected_powers(step, depth)[base], rel=1e-12, abs=0), name
    assert unfrozen[0]["head"] == pytest.approx(LR * MULT / 2)  # cosine over 2 epochs, at epoch 1
    decays = rates.weight_decay
    assert {decays[n] for n in decays if n.endswith(".no_decay")} == {0.0}
    assert {decays[n] for n in decays if not n.endswith(".no_decay")} == {1e-3}
    groups = {g["name"]: {id(p) for p in g["params"]} for g in module.parameter_groups()}
    excluded = set().union(*(ids for name, ids in groups.items() if name.endswith(".no_decay")))
    named = dict(module.net.named_parameters())
    norms = {n for n, m in module.net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {n for n in named if n.endswith(".bias") or n.rsplit(".", 1)[0] in norms}
    assert {n for n, p in named.items() if id(p) in excluded} == expected
    assert set().union(*groups.values()) == {id(p) for p in module.net.parameters()}
    assert set(groups["layer.0"]) == {id(module.net.conv1.weight)}  # the stem convolution alone, decayed


def test_a_frozen_backbone_keeps_only_the_heads_groups():
    module = FineTuneModule(
        num_classes=2, weights=None, freeze="backbone", groups={"layer_decay": 0.5, "norm_bias_weight_decay": 0.0}
    )
    groups = module.parameter_groups()
    assert [(g["name"], g["lr_scale"], g.get("weight_decay")) for g in groups] == [
        ("head", 10.0, None),
        ("head.no_decay", 10.0, 0.0),
    ]
    assert [g["params"] for g in groups] == [[module.net.fc.weight], [module.net.fc.bias]]


def test_the_book_keeps_its_two_groups_by_default():
    module = FineTuneModule(num_classes=2, weights=None, groups={"layer_decay": None, "norm_bias_weight_decay": None})
    groups = module.parameter_groups()
    assert [(g["name"], g["lr_scale"], "weight_decay" in g) for g in groups] == [
        ("backbone", 1.0, False),
        ("head", 10.0, False),
    ]
    assert groups[0]["params"] == [p for n, p in module.net.named_parameters() if not n.startswith("fc.")]


# --- depth ---------------------------------------------------------------------------------------------------------
def _blocks_by_prefix(net: nn.Module, head: str) -> list[str]:
    """The module that holds each depth's parameters (their common name prefix)."""
    by_depth: dict[int, list[list[str]]] = {}
    for name, depth in layer_ids(net, head).items():
        by_depth.setdefault(depth, []).append(name.split(".")[:-1])
    return [".".join(os.path.commonprefix(by_depth[d])) for d in sorted(by_depth)]


def test_torchvision_depth_is_the_top_level_blocks_with_sequential_containers_opened():
    assert _blocks_by_prefix(torchvision.models.resnet18(), "fc") == RESNET18_BLOCKS
    mobilenet = layer_ids(torchvision.models.mobilenet_v2(), "classifier.1")
    assert max(mobilenet.values()) == 18  # features.0 .. features.18, each whole
    assert {name.split(".")[1] for name, depth in mobilenet.items() if depth == 5} == {"5"}
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    depths = layer_ids(vit, "heads.head")
    stem = sorted(n for n, d in depths.items() if d == 0)
    assert stem == ["class_token", "conv_proj.bias", "conv_proj.weight", "encoder.pos_embedding"]
    assert {d for n, d in depths.items() if ".encoder_layer_2." in n} == {3}
    assert {depths["encoder.ln.weight"], depths["encoder.ln.bias"]} == {4}  # the final norm, next to the head
    assert sum(map(len, blocks(vit))) == len(list(vit.parameters()))


def test_timm_depth_is_timms_group_matcher():
    timm = pytest.importorskip("timm")
    net = timm.create_model("test_vit", pretrained=False, num_classes=2)
    depths = layer_ids(net, "head")
    assert {depths[n] for n in ("cls_token", "pos_embed", "patch_embed.proj.weight")} == {0}
    assert all(depths[n] == int(n.split(".")[1]) + 1 for n in depths if n.startswith("blocks."))
    last = max(depths.values())
    assert last == len(net.blocks) and depths["norm.weight"] == last  # timm's final norm joins the last block
    assert not any(n.startswith("head.") for n in depths)
    groups = parameter_groups(net, "head", 10, Grouping(layer_decay=0.5))
    assert [(g["name"], g["lr_scale"]) for g in groups] == [
        *((f"layer.{i}", 0.5 ** (last + 1 - i)) for i in range(last + 1)),
        ("head", 10.0),
    ]
    excluded = {p for g in parameter_groups(net, "head", 10, Grouping(norm_bias_weight_decay=0)) for p in g["params"]
                if g["name"].endswith(".no_decay")}  # fmt: skip
    named = dict(net.named_parameters())
    assert named["cls_token"] in excluded and named["pos_embed"] in excluded  # timm's no_weight_decay()
    assert named["blocks.0.norm1.weight"] in excluded and named["blocks.0.attn.qkv.weight"] not in excluded


def test_norms_and_biases_are_named_for_any_norm_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False), nn.GroupNorm(2, 4))
    assert norm_and_bias_names(net) == {"0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}


# --- settings and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.groups.layer_decay=0", r"model.groups.layer_decay must be in \(0, 1\] or null, got 0"),
        ("model.groups.layer_decay=1.5", r"model.groups.layer_decay must be in \(0, 1\] or null, got 1.5"),
        ("model.groups.norm_bias_weight_decay=-1", r"model.groups.norm_bias_weight_decay must be >= 0 or null"),
        ("+model.groups.layer_decy=0.7", r"model.groups.layer_decy: not a setting of model.groups"),
    ],
)
def test_bad_group_settings_are_refused_by_name_before_anything_is_built(tmp_path, override, message):
    cfg = compose_config([override] + tiny_overrides(tmp_path / "no data", tmp_path / "run"))
    with pytest.raises(SettingError, match=message):
        check_settings(cfg)


def test_a_resume_with_other_groups_is_refused_and_with_the_same_equals_a_straight_run(tmp_path, data):
    recipe = [f"model.groups.layer_decay={DECAY}", "scheduler=cosine", "optimizer.momentum=0.9", "optimizer.lr=0.001",
              "trainer.max_epochs=2", "trainer.deterministic=true", "seed=3"]  # fmt: skip

    def run(out: str, *extra: str) -> dict:
        return train(compose_config([*recipe, *extra] + tiny_overrides(data, tmp_path / out)))

    straight = run("straight")
    run("first", "+trainer.max_steps=4", "test_after_fit=false")  # stops after epoch 0 of the same schedule
    resumed = run("resumed", f"resume={tmp_path / 'first'}")
    assert len(resumed["history"]) == len(straight["history"]) == 2
    for got, want in zip(resumed["history"], straight["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("straight", "resumed"))
    groups = [[(g["name"], g["lr"]) for g in c["optimizer_states"][0]["param_groups"]] for c in (a, b)]
    assert [n for n, _ in groups[0]] == [n for n, _ in groups[1]] == [f"layer.{i}" for i in range(10)] + ["head"]
    assert [lr for _, lr in groups[0]] == pytest.approx([lr for _, lr in groups[1]], rel=1e-12)

    with pytest.raises(ResumeError) as refused:
        run("other", "model.groups.layer_decay=null", f"resume={tmp_path / 'first'}")
    message = str(refused.value)
    assert "model.groups: {'layer_decay': 0.75, 'norm_bias_weight_decay': None} in the checkpoint" in message
    assert "optimizer parameter groups: ['layer.0', 'layer.1'," in message and "['backbone', 'head'] now" in message


def test_schedules_see_the_unscaled_rate_so_every_group_keeps_its_power():
    """The module's lr_scheduler_step, driven as Lightning drives it, with a schedule that sets absolute rates."""
    torch.manual_seed(0)
    module = FineTuneModule(
        num_classes=2, weights=None, head_lr_mult=MULT, groups={"layer_decay": DECAY},
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        scheduler={"scheduler": functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05, total_steps=9),
                   "interval": "step"},
    )  # fmt: skip
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(8):
        step = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert step == pytest.approx(_expected_powers(step, len(RESNET18_BLOCKS)), rel=1e-12, abs=0)
        optimizer.step()
        module.lr_scheduler_step(scheduler, None)
