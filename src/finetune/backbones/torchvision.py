"""torchvision's classifiers (``resnet18``, ``mobilenet_v2``, ...): the book's family, with its ImageNet input."""

from __future__ import annotations

import difflib
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from finetune.backbones import new_head
from finetune.backbones.timm import knows as timm_knows
from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, book_resize_size
from finetune.errors import DownloadError, SettingError

IMAGE_SIZE = 224
# A local weights file is one architecture's: model.backbone (resnet18 by default) must name it.
LOCAL_FILE_MATCHES = (
    "with model.backbone set to the architecture that file was trained for (model.backbone=mobilenet_v2 for a "
    "MobileNetV2 file)"
)  # the crop torchvision's ImageNet weights were trained and evaluated on (resized from 256)


def names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
    """``name`` with ImageNet weights (torchvision's weights API) or random ones, and a new head."""
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        if timm_knows(name):
            close = [f"timm/{name}", *close]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SettingError(
            f"Unknown backbone {name!r}: not a torchvision classification model.{hint} "
            f"See torchvision.models.list_models() for the {len(known)} known names, or use a timm model as "
            "model.backbone=timm/<name>."
        )
    model = _download(name) if pretrained else torchvision.models.get_model(name, weights=None)
    head_name = find_head(model)
    parent, _, child = head_name.rpartition(".")
    head = new_head(model.get_submodule(head_name).in_features, num_classes)
    setattr(model.get_submodule(parent) if parent else model, child, head)
    return model, head_name


def source_head(name: str) -> dict[str, torch.Tensor]:
    """The pretrained classifier of ``name``'s ImageNet weights (``model.head_init.from=source``), read from the
    model those weights build before its head is replaced."""
    model = _download(name)
    head = model.get_submodule(find_head(model))
    return {key: value.detach().clone() for key, value in head.state_dict().items()}


def preprocessing(name: str, image_size: int | None = None) -> dict:
    """The book's ImageNet input: a 224 crop of a 256 resize (the same ratio for other crops), bilinear."""
    size = IMAGE_SIZE if image_size is None else image_size
    return {
        "image_size": size,
        "resize_size": book_resize_size(size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
    }


def find_head(model: nn.Module) -> str:
    """The output layer: the last ``Linear`` registered (``fc``, ``classifier.1``, ``heads.head``, ...)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise SettingError(
            f"{type(model).__name__} has no nn.Linear output layer (its classifier is convolutional), so its head "
            "cannot be replaced; choose another backbone."
        )
    return linears[-1]


def _download(name: str) -> nn.Module:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        raise DownloadError(
            f"Could not download the ImageNet weights {weights} for {name!r} ({err}). Offline, either copy "
            f"{Path(weights.url).name} into {checkpoints} (set TORCH_HOME to use another cache), or pass "
            f"model.weights=PATH to a local state_dict {LOCAL_FILE_MATCHES}, or model.weights=null for random init."
        ) from err
