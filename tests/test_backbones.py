import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from finetune.backbones import build_backbone
from finetune.backbones.torchvision import find_head
from finetune.backbones.weights import load_backbone_weights
from finetune.errors import DownloadError, PathError, SettingError

from .conftest import MOBILENET_V2_WEIGHTS, needs_shared

LISTED = {
    "resnet18": ("fc", 512),
    "resnet34": ("fc", 512),
    "resnet50": ("fc", 2048),
    "mobilenet_v2": ("classifier.1", 1280),
    "mobilenet_v3_small": ("classifier.3", 1024),
    "mobilenet_v3_large": ("classifier.3", 1280),
    "efficientnet_b0": ("classifier.1", 1280),
    "convnext_tiny": ("classifier.2", 768),
}


@pytest.mark.parametrize("name", sorted(LISTED))
def test_listed_backbones_get_a_fresh_xavier_head(name):
    head_name, in_features = LISTED[name]
    built = build_backbone(name, num_classes=2, weights=None)
    assert built.head_name == head_name
    head = built.head
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (in_features, 2)
    bound = math.sqrt(6 / (in_features + 2))  # Xavier-uniform's limit for this fan-in/fan-out
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.9 * bound
    built.model.eval()
    with torch.no_grad():
        assert built.model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet19'.*Did you mean: .*resnet18"):
        build_backbone("resnet19", 2, weights=None)


def test_convolutional_classifier_is_refused_clearly():
    with pytest.raises(ValueError, match="no nn.Linear output layer"):
        find_head(torchvision.models.squeezenet1_0())


def _reference(name: str = "resnet18") -> nn.Module:
    torch.manual_seed(123)
    return torchvision.models.get_model(name, weights=None)


def _assert_backbone_equals(model: nn.Module, reference: nn.Module, head_name: str):
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith(head_name + "."):
            assert torch.equal(ours[key], value), key


def test_full_state_dict_loads_everything_but_the_head(tmp_path):
    reference = _reference()
    torch.save(reference.state_dict(), tmp_path / "full.pth")  # includes a 1000-class fc
    built = build_backbone("resnet18", 2, weights=str(tmp_path / "full.pth"))
    _assert_backbone_equals(built.model, reference, "fc")
    assert built.head.out_features == 2


def test_backbone_only_and_wrapped_state_dicts_load(tmp_path):
    reference = _reference()
    state = {f"module._orig_mod.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "backbone.pth")
    built = build_backbone("resnet18", 2, weights=tmp_path / "backbone.pth")
    _assert_backbone_equals(built.model, reference, "fc")


def test_weights_for_another_architecture_list_the_offending_keys_and_name_the_backbone_they_fit(tmp_path):
    torch.save(_reference("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(
        SettingError, match=r"does not fit model.backbone=resnet34 \(ResNet.*missing \(\d+\): layer1\.2\."
    ) as info:
        build_backbone("resnet34", 2, weights=tmp_path / "r18.pth")
    assert str(info.value).endswith(
        "These weights fit model.backbone=resnet18: pass that (model.backbone must name the architecture the weights "
        "were trained for)."
    )
    with pytest.raises(ValueError, match=r"wrong shape .*layer1.0.conv1.weight|unexpected"):
        build_backbone("resnet50", 2, weights=tmp_path / "r18.pth")


def test_a_features_only_mobilenet_v2_file_is_named_as_mobilenet_v2_and_loads_there(tmp_path):
    """The offline newcomer's file: MobileNetV2's ``features.*`` alone, tried with the default resnet18."""
    reference = torchvision.models.mobilenet_v2()
    weights = tmp_path / "mobilenet_v2-features.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("features.")}, weights)
    with pytest.raises(SettingError, match=r"does not fit model.backbone=resnet18 .*fit model.backbone=mobilenet_v2:"):
        build_backbone("resnet18", 2, weights=weights)
    built = build_backbone("mobilenet_v2", 2, weights=weights)
    _assert_backbone_equals(built.model, reference, "classifier.1")


def test_weights_that_fit_no_torchvision_backbone_say_what_model_backbone_must_name(tmp_path):
    torch.save({"blocks.0.weight": torch.zeros(3, 3)}, tmp_path / "odd.pth")
    with pytest.raises(SettingError, match=r"must name the architecture these weights were trained for \(a timm"):
        build_backbone("resnet18", 2, weights=tmp_path / "odd.pth")


def test_missing_or_unreadable_weights_file(tmp_path):
    model = _reference()
    with pytest.raises(FileNotFoundError, match="does not exist.*model.weights"):
        load_backbone_weights(model, "fc", tmp_path / "absent.pth")
    (tmp_path / "weights").mkdir()
    with pytest.raises(PathError, match=r"^model.weights='.*weights' is a folder, not a weights file. It holds no wei"):
        load_backbone_weights(model, "fc", tmp_path / "weights")
    for name in ("b.safetensors", "a.pth", "notes.txt"):
        (tmp_path / "weights" / name).write_bytes(b"")
    with pytest.raises(PathError, match=r"is a folder, not a weights file. It holds a.pth, b.safetensors: pass one"):
        load_backbone_weights(model, "fc", tmp_path / "weights")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read weights file"):
        load_backbone_weights(model, "fc", tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_backbone_weights(model, "fc", tmp_path / "list.pth")


def test_imagenet_weights_come_from_a_prefilled_torch_home(tmp_path, monkeypatch):
    """Offline, torchvision's weights API uses the file already in $TORCH_HOME/hub/checkpoints."""
    reference = _reference()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    torch.save(reference.state_dict(), checkpoints / url.rsplit("/", 1)[1])
    built = build_backbone("resnet18", 2, weights="imagenet")
    _assert_backbone_equals(built.model, reference, "fc")


def test_imagenet_download_failure_explains_the_offline_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable)
    with pytest.raises(
        DownloadError, match=r"resnet18-f37072fd.pth into .*hub/checkpoints.*model.weights=PATH"
    ) as info:
        build_backbone("resnet18", 2, weights="imagenet")
    assert "with model.backbone set to the architecture that file was trained for" in str(info.value)


@pytest.mark.slow
@needs_shared(MOBILENET_V2_WEIGHTS)
def test_real_mobilenet_v2_imagenet_features_load_strictly():
    state = torch.load(MOBILENET_V2_WEIGHTS, map_location="cpu", weights_only=True)
    built = build_backbone("mobilenet_v2", 2, weights=MOBILENET_V2_WEIGHTS)
    ours = built.model.state_dict()
    assert len(state) == 312
    assert all(torch.equal(ours[key], value) for key, value in state.items())
