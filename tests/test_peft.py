"""Parameter-efficient fine-tuning: +callbacks=lora (peft's LoRA on timm ViTs and CNNs) and +callbacks=bitfit.

Small randomly initialised timm models, no download: ``test_vit`` (6 blocks of width 64 at its fixed 160 px) and
``test_resnet``. A LoRA checkpoint holds merged weights under the plain network's names, so it evaluates, predicts
and exports like any other; what a resume needs is beside them, and a resumed run equals a straight one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("peft")

from finetune.callbacks.bitfit import BitFit  # noqa: E402
from finetune.callbacks.lora import STATE, LoRA  # noqa: E402
from finetune.errors import MissingPackageError, SettingError  # noqa: E402
from finetune.evaluate import evaluate  # noqa: E402
from finetune.export import export  # noqa: E402
from finetune.harness.checkpoint_io import load_for_inference  # noqa: E402
from finetune.harness.results import ParameterCount  # noqa: E402
from finetune.lr_find import lr_find, range_test_config  # noqa: E402
from finetune.module import FineTuneModule  # noqa: E402
from finetune.predict import predict  # noqa: E402
from finetune.run import assemble, check_settings  # noqa: E402
from finetune.scoring import TEMPERATURE, Scorer  # noqa: E402
from finetune.train import train  # noqa: E402

from .conftest import compose_config, make_image_folder, tiny_overrides  # noqa: E402
from .inference import eval_config, predict_config  # noqa: E402

RANK = 4
VIT = ["model.backbone=timm/test_vit", "data.image_size=null", "data.resize_size=null"]
VIT_LINEARS = {f"blocks.{i}.{name}" for i in range(6) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
LORA = ["+callbacks=lora", f"callbacks.lora.rank={RANK}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=10, n_test=3)


def _module(backbone: str) -> FineTuneModule:
    torch.manual_seed(0)
    return FineTuneModule(num_classes=2, backbone=backbone, weights=None)


def _lora_modules(module: FineTuneModule) -> dict[str, nn.Module]:
    return {n: m for n, m in module.net.named_modules() if hasattr(m, "lora_A")}


def test_lora_adapts_a_vits_attention_and_mlp_and_the_checkpoint_holds_the_merged_weights():
    module = _module("timm/test_vit")
    plain_keys = list(module.state_dict())
    lora = LoRA(rank=RANK, alpha=8)
    lora.setup(None, module, "fit")
    adapted = _lora_modules(module)
    assert set(adapted) == VIT_LINEARS  # timm's fused qkv Linear is one target; the patch embedding and head are not
    qkv = adapted["blocks.0.attn.qkv"]
    assert qkv.lora_A["default"].weight.shape == (RANK, 64) and qkv.lora_B["default"].weight.shape == (3 * 64, RANK)
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {"head.weight", "head.bias"}
    assert len(trainable) == 2 * len(VIT_LINEARS) + 2  # no norm, no bias, no embedding trains

    with torch.no_grad():
        for layer in adapted.values():
            layer.lora_B["default"].weight.normal_()  # adapters that changed something
    checkpoint = {"state_dict": module.state_dict()}
    lora.on_save_checkpoint(None, module, checkpoint)
    merged = checkpoint["state_dict"]
    assert list(merged) == plain_keys
    base = checkpoint[STATE]["net.blocks.0.attn.qkv.base_layer.weight"]
    a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
    assert torch.allclose(merged["net.blocks.0.attn.qkv.weight"], base + b @ a * (8 / RANK), atol=1e-6)
    images = torch.randn(2, 3, 160, 160)
    module.eval()
    with torch.no_grad():
        wrapped = module(images)
        plain = FineTuneModule(num_classes=2, backbone="timm/test_vit", weights=None).eval()
        plain.load_state_dict(merged)
        assert torch.allclose(plain(images), wrapped, atol=1e-5)
        lora.teardown(None, module, "fit")  # fitting ends: merged into the network for good
        assert not _lora_modules(module) and list(module.state_dict()) == plain_keys
        assert torch.allclose(module(images), wrapped, atol=1e-5)


def test_lora_targets_that_match_nothing_are_refused_by_name():
    with pytest.raises(SettingError, match=r"callbacks.lora.targets=\['nothere'\]: Target modules \{'nothere'\} not"):
        LoRA(targets=["nothere"]).setup(None, _module("timm/test_resnet"), "fit")


def test_lora_adapts_a_cnns_pointwise_convolutions_only():
    module = _module("timm/test_resnet")
    convs = {n: m for n, m in module.net.named_modules() if isinstance(m, nn.Conv2d)}
    pointwise = {n for n, m in convs.items() if m.kernel_size == (1, 1) and m.groups == 1}
    LoRA(rank=2).setup(None, module, "fit")
    assert set(_lora_modules(module)) == pointwise and len(pointwise) < len(convs)
    adapter = _lora_modules(module)["layer3.0.conv1"]
    assert adapter.lora_A["default"].weight.shape[:2] == (2, adapter.base_layer.in_channels)


def _vit_run(data: Path, out: Path, *extra: str) -> dict:
    overrides = [*VIT, *LORA, "trainer.max_epochs=2", "optimizer.lr=0.05", "optimizer.momentum=0.9",
                 "trainer.deterministic=true", "seed=1", *extra]  # fmt: skip
    return train(compose_config(overrides + tiny_overrides(data, out)))


def test_a_lora_run_reports_what_it_trains_and_its_checkpoint_evaluates_predicts_and_exports(tmp_path, data, capsys):
    results = _vit_run(data, tmp_path / "run")
    assert results["status"] == "completed", results.get("error")
    plain = _module("timm/test_vit")
    adapters = sum(RANK * (m.in_features + m.out_features) for n, m in plain.net.named_modules() if n in VIT_LINEARS)
    head = sum(p.numel() for p in plain.head_parameters())
    total = sum(p.numel() for p in plain.parameters())
    assert results["trainable_parameters"] == adapters + head
    assert results["total_parameters"] == total + adapters
    assert f"trains {adapters + head:,} of {total + adapters:,} parameters" in capsys.readouterr().out

    best = results["best_checkpoint"]
    checkpoint = torch.load(best, weights_only=True)
    assert list(checkpoint["state_dict"]) == list(plain.state_dict())
    trained = checkpoint[STATE]["net.blocks.5.mlp.fc2.lora_B.default.weight"]
    assert trained.abs().sum() > 0  # the adapters trained (B starts at 0), and the weights are merged with them
    frozen = checkpoint[STATE]["net.blocks.5.mlp.fc2.base_layer.weight"]
    assert not torch.equal(checkpoint["state_dict"]["net.blocks.5.mlp.fc2.weight"], frozen)

    evaluated = evaluate(eval_config(Path(best), data, tmp_path / "eval"))
    assert evaluated["test/acc"] == results["test/acc"]
    assert evaluated["test/loss"] == pytest.approx(results["test/loss"], rel=1e-5)
    rows = predict(predict_config(Path(best), data / "test", tmp_path / "predict"))
    assert len(rows) == 6
    exported = export(
        compose_config([f"ckpt_path={best}", f"paths.output_dir={tmp_path / 'export'}", "format=torchscript"],
                       config_name="export")
    )  # fmt: skip
    model, saved = load_for_inference(best)
    images = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(exported))(images), Scorer(model, saved.get(TEMPERATURE, 1.0))(images)
                              .softmax(dim=1), atol=1e-5)  # fmt: skip


def test_a_lora_run_stopped_and_resumed_equals_a_straight_run(tmp_path, data):
    straight = _vit_run(data, tmp_path / "straight", "test_after_fit=false", "calibrate=false")
    _vit_run(data, tmp_path / "first", "+trainer.max_steps=4", "test_after_fit=false", "calibrate=false")
    resumed = _vit_run(data, tmp_path / "resumed", f"resume={tmp_path / 'first'}", "test_after_fit=false",
                       "calibrate=false")  # fmt: skip
    assert [e["epoch"] for e in resumed["history"]] == [0, 1]
    assert resumed["history"] == straight["history"]
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 8
    for key in ("state_dict", STATE):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    first = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)[STATE]
    frozen = [k for k in first if ".base_layer." in k]
    assert len(frozen) == 2 * len(VIT_LINEARS) and all(torch.equal(first[k], a[STATE][k]) for k in frozen)


class _Snapshot(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


def test_bitfit_trains_the_backbones_biases_and_norms_only(tmp_path, data):
    snapshot, counted = _Snapshot(), ParameterCount()
    cfg = compose_config(["+callbacks=bitfit", "model.backbone=timm/test_resnet", "trainer.max_epochs=1",
                          "optimizer.lr=0.05"] + tiny_overrides(data, tmp_path))  # fmt: skip
    run = assemble(cfg, [snapshot, counted])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    net = run.model.net
    norms = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    kept = {n for n, _ in net.named_parameters() if n.endswith(".bias") or n.rsplit(".", 1)[0] in norms}
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, snapshot.start[n])}
    assert moved and moved <= kept | {"fc.weight", "fc.bias"} and "fc.weight" in moved
    assert any(n.startswith("layer") and n.endswith(".bias") for n in moved)  # a backbone norm trained
    params = dict(net.named_parameters())
    assert counted.record["trainable_parameters"] == sum(params[n].numel() for n in kept | {"fc.weight"})
    assert counted.record["total_parameters"] == sum(p.numel() for p in params.values())
    assert all(p.requires_grad for p in net.parameters())  # the fit's freezing is undone when it ends


def test_a_plain_run_trains_every_parameter(tmp_path, data):
    results = train(compose_config(["trainer.max_epochs=1", "calibrate=false"] + tiny_overrides(data, tmp_path)))
    assert results["trainable_parameters"] == results["total_parameters"] == 11_177_538  # resnet18, 2 classes


def test_lr_find_keeps_the_callbacks_that_decide_what_trains(tmp_path, data, caplog):
    cfg = compose_config([*VIT, *LORA, "lr_find.num_training=3", "lr_find.early_stop_threshold=null"]
                         + tiny_overrides(data, tmp_path), config_name="lr_find")  # fmt: skip
    assert list(range_test_config(cfg).callbacks) == ["lora"]
    bitfit = compose_config(["+callbacks=[bitfit,unfreeze]", "callbacks.unfreeze.epoch=1"]
                            + tiny_overrides(data, tmp_path), config_name="lr_find")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="finetune.lr_find"):
        assert list(range_test_config(bitfit).callbacks) == ["bitfit"]
    assert "callbacks unfreeze left out" in caplog.text
    result = lr_find(cfg)
    assert len(result["steps"]) == 3 and result["steps"][0]["groups"].keys() == {"backbone", "head"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([*LORA, "model.freeze=backbone"], r"callbacks.lora adapts the backbone, but model.freeze='backbone'"),
        (["+callbacks=bitfit", "model.freeze=backbone"], r"callbacks.bitfit trains the backbone's biases and norms"),
        (["+callbacks=[lora,ema]"], r"callbacks.lora cannot be combined with callbacks.ema"),
        ([*LORA[:1], "callbacks.lora.rank=0"], r"callbacks.lora.rank must be an integer >= 1"),
        ([*LORA[:1], "callbacks.lora.dropout=1"], r"callbacks.lora.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_peft_settings_are_refused_by_name(tmp_path, overrides, message):
    cfg = compose_config(overrides + tiny_overrides(tmp_path / "no data", tmp_path / "run"))
    with pytest.raises(SettingError, match=message):
        check_settings(cfg)
        assemble(cfg)


def test_lora_without_peft_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    cfg = compose_config(LORA + tiny_overrides(tmp_path / "no data", tmp_path / "run"))
    with pytest.raises(MissingPackageError, match=r"pip install 'finetune\[peft\]'"):
        check_settings(cfg)


def test_bitfit_keeps_no_state_a_resume_could_miss():
    module = _module("timm/test_resnet")
    bitfit = BitFit()
    bitfit.setup(None, module, "fit")
    assert bitfit.state_dict() == {} and "layer1.0.conv1.weight" not in {
        n for n, p in module.net.named_parameters() if p.requires_grad
    }
