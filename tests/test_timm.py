"""timm backbones (model.backbone=timm/<name>): head, groups, freezing, fast paths, checkpoints, preprocessing.

Random init throughout (no downloads); timm's own pretrained loading is exercised up to the download itself.
"""

import builtins
import functools
import json
import math
import sys

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

timm = pytest.importorskip("timm")

from finetune import backbones  # noqa: E402
from finetune.backbones import build_backbone, preprocessing  # noqa: E402
from finetune.errors import DownloadError  # noqa: E402
from finetune.features import head_input  # noqa: E402
from finetune.module import FineTuneModule  # noqa: E402
from finetune.train import train  # noqa: E402

from .conftest import compose_config, tiny_overrides  # noqa: E402

# timm name -> (the head's module name, its input features): three CNN families and a transformer.
FAMILIES = {
    "timm/resnet18": ("fc", 512),
    "timm/convnext_nano": ("head.fc", 640),
    "timm/efficientnet_b0": ("classifier", 1280),
    "timm/vit_tiny_patch16_224": ("head", 192),
}
CNNS = ["timm/resnet18", "timm/convnext_nano", "timm/efficientnet_b0"]  # these run at the tiny folder's 32 px


def _module(backbone: str, **kwargs) -> FineTuneModule:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.01))
    return FineTuneModule(num_classes=3, backbone=backbone, weights=None, **kwargs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_backbones_get_a_fresh_xavier_head_through_timms_classifier_api(name):
    head_name, in_features = FAMILIES[name]
    built = build_backbone(name, num_classes=3, weights=None)
    assert built.head_name == head_name
    assert built.head is built.model.get_classifier()  # timm's own view of its classifier is the new head
    assert isinstance(built.head, nn.Linear) and (built.head.in_features, built.head.out_features) == (in_features, 3)
    assert built.model.num_classes == 3
    bound = math.sqrt(6 / (in_features + 3))  # Xavier-uniform; timm's own inits stay far below this limit
    assert built.head.weight.abs().max() <= bound and built.head.weight.abs().max() > 0.9 * bound
    size = 224 if "vit" in name else 64
    built.model.eval()
    with torch.no_grad():
        images = torch.randn(2, 3, size, size)
        assert built.model(images).shape == (2, 3)
        assert head_input(built.model, built.head_name, images).shape == (2, in_features)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_parameter_groups_split_head_and_backbone(name):
    module = _module(name, head_lr_mult=10)
    optimizer = module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    head_ids = {id(p) for p in module.net.get_classifier().parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in module.net.parameters()} - head_ids
    assert groups["head"]["lr"] == pytest.approx(0.1) and groups["backbone"]["lr"] == pytest.approx(0.01)


def test_vit_trains_a_step_at_its_fixed_input_size():
    """ViT's patch grid fixes its input size (224 here), so it trains outside the 32 px tiny folder."""
    module = _module("timm/vit_tiny_patch16_224")
    optimizer = module.configure_optimizers()
    before = {name: p.detach().clone() for name, p in module.net.named_parameters()}
    images, targets = torch.randn(2, 3, 224, 224), torch.tensor([0, 2])
    loss = module.criterion(module(images), targets)
    loss.backward()
    optimizer.step()
    changed = {name for name, p in module.net.named_parameters() if not torch.equal(p, before[name])}
    assert {"head.weight", "head.bias", "patch_embed.proj.weight"} <= changed


@pytest.mark.parametrize("name", ["timm/resnet18", "timm/efficientnet_b0"])
def test_frozen_timm_backbone_keeps_batchnorm_statistics(tmp_path, tiny_folder, name):
    """experiment=frozen on timm's BatchNorm (efficientnet's is BatchNormAct2d): only the head moves."""
    cfg = compose_config(
        ["experiment=frozen", f"model.backbone={name}", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    module = _module(name, freeze="backbone")
    batchnorms = module.frozen_batchnorms()
    assert batchnorms and all(isinstance(m, _BatchNorm) for m in batchnorms)
    module.train()
    assert not any(m.training for m in batchnorms)

    results = train(cfg)
    assert results["status"] == "completed" and results["backbone"] == name
    trained = FineTuneModule.load_from_checkpoint(results["last_checkpoint"], weights=None)
    # Random init starts every BatchNorm at mean 0, var 1, 0 batches: a BN left in train mode would have moved.
    for name_, bn in trained.net.named_modules():
        if isinstance(bn, _BatchNorm):
            assert int(bn.num_batches_tracked) == 0, name_
            assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)), name_
            assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)), name_


@pytest.mark.parametrize("name", CNNS)
def test_timm_backbones_fine_tune_end_to_end(tmp_path, tiny_folder, name):
    cfg = compose_config(
        [f"model.backbone={name}", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    results = train(cfg)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["status"] == "completed" and written["backbone"] == name and written["epochs"] == 1
    assert 0.0 <= written["test/acc"] <= 1.0

    # The checkpoint rebuilds the same network from its hyperparameters and loads every tensor into it.
    checkpoint = torch.load(results["last_checkpoint"], map_location="cpu", weights_only=False)
    trained = FineTuneModule.load_from_checkpoint(results["last_checkpoint"], weights=None)
    assert trained.hparams.backbone == name and trained.head_name == FAMILIES[name][0]
    state = trained.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(state[key], value) for key, value in checkpoint["state_dict"].items())


def test_timm_channels_last_and_cached_features(tmp_path, tiny_folder):
    cfg = compose_config(
        [
            "experiment=frozen",
            "model.backbone=timm/convnext_nano",
            "+callbacks=channels_last",
            "features=cached",
            "data.augmentation=null",
            "trainer.fast_dev_run=true",
        ]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    results = train(cfg)
    assert results["status"] == "completed" and 0.0 <= results["test/acc"] <= 1.0
    module = _module("timm/convnext_nano", freeze="backbone").to(memory_format=torch.channels_last).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # What the cache trains on, fed to the head, gives the network's own logits.
        assert torch.allclose(module(head_input(module.net, module.head_name, images)), module(images), atol=1e-5)


def test_timm_weights_from_a_local_file_load_everything_but_the_head(tmp_path):
    torch.manual_seed(7)
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    built = build_backbone("timm/resnet18", 3, weights=str(tmp_path / "resnet18.pth"))
    ours = built.model.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], value), key
    assert built.head.out_features == 3

    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(reference.state_dict(), str(tmp_path / "resnet18.safetensors"))
    from_safetensors = build_backbone("timm/resnet18", 3, weights=str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(from_safetensors.model.conv1.weight, reference.conv1.weight)


def test_imagenet_weights_go_through_timms_own_pretrained_loading(monkeypatch):
    calls = []
    real = timm.create_model

    def recording(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return real(name, pretrained=False, **kwargs)  # stands in for the download (offline here)

    monkeypatch.setattr(timm, "create_model", recording)
    built = build_backbone("timm/resnet18.a1_in1k", 2, weights="imagenet")
    assert calls == [("resnet18.a1_in1k", True)] and built.head.out_features == 2


def test_pretrained_download_failure_explains_the_offline_options(monkeypatch):
    def unreachable(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(DownloadError, match=r"timm/convnext_nano.*HF_HUB_OFFLINE=1.*model.weights=PATH.*=null"):
        build_backbone("timm/convnext_nano", 2, weights="imagenet")


def test_preprocessing_follows_the_pretrained_config():
    resnet = preprocessing("timm/resnet18.a1_in1k")
    assert resnet == {
        "image_size": 224,
        "resize_size": 235,  # floor(224 / 0.95), as timm's eval transform
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic",
    }
    vit = preprocessing("timm/vit_tiny_patch16_224")
    assert vit["mean"] == (0.5, 0.5, 0.5) and vit["std"] == (0.5, 0.5, 0.5) and vit["resize_size"] == 248  # 224 / 0.9
    assert preprocessing("timm/resnet18.a1_in1k", 160)["resize_size"] == 168  # floor(160 / 0.95): its crop fraction
    # The same numbers timm resolves from a built model's pretrained config.
    for name in ("efficientnet_b0", "vit_tiny_patch16_224"):
        resolved = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
        ours = preprocessing("timm/" + name)
        size = resolved["input_size"][-1]
        assert ours["image_size"] == size and ours["resize_size"] == math.floor(size / resolved["crop_pct"])
        assert ours["interpolation"] == resolved["interpolation"] and ours["mean"] == tuple(resolved["mean"])
    # torchvision backbones keep the book's ImageNet preprocessing.
    assert preprocessing("resnet18") == {
        "image_size": 224,
        "resize_size": 256,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
    }
    assert preprocessing("resnet18", 384)["resize_size"] == 439  # the book's 256/224 ratio


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown backbone 'timm/convnext_nanoo'.*Did you mean: timm/convnext_nano"):
        build_backbone("timm/convnext_nanoo", 2, weights=None)
    with pytest.raises(ValueError, match=r"'resnet18.bogus' is not a timm model or weight tag"):
        preprocessing("timm/resnet18.bogus")
    with pytest.raises(ValueError, match=r"Did you mean: timm/convnext_nano"):
        build_backbone("convnext_nano", 2, weights=None)  # a timm name without timm/


def test_timm_models_without_one_linear_classifier_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'timm/dla46_c' has no nn.Linear classifier.*Conv2d"):
        build_backbone("timm/dla46_c", 2, weights=None)
    with pytest.raises(ValueError, match=r"'timm/deit_tiny_distilled_patch16_224' has 2 classifier heads"):
        build_backbone("timm/deit_tiny_distilled_patch16_224", 2, weights=None)


def test_missing_timm_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'finetune\[timm\]'"):
        backbones.build_backbone("timm/resnet18", 2, weights=None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'finetune\[timm\]'"):
        backbones.preprocessing("timm/resnet18")
