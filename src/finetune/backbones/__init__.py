"""Image classifiers by name, pretrained weights and a fresh output layer.

A name picks a *family* by its prefix (:data:`FAMILIES`): ``timm/convnext_nano`` is timm's, a bare name such as
``resnet18`` is torchvision's. A family is one module with two functions, ``build(name, num_classes, pretrained)``
(the model with a new ``num_classes``-way ``Linear`` head, and that head's name) and ``preprocessing(name,
image_size)`` (what its pretrained weights expect as input). A new family is one such file and one line here.

Weights come from the family's own pretrained download (``"imagenet"``), from a local ``state_dict`` file (any other
string: a path), or not at all (``None``: random init). The head is always new, its weight Xavier-uniform
initialised, as in the d2l "Fine-Tuning" chapter.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from finetune.errors import MissingPackageError, PathError, SettingError, describe_path

IMAGENET = "imagenet"
log = logging.getLogger(__name__)
# Name prefix -> the module of that family. The first prefix that a name starts with wins ("" matches every name).
FAMILIES = {
    "timm/": "finetune.backbones.timm",
    "": "finetune.backbones.torchvision",
}
# Prefixes that wrappers add to state_dict keys: DDP/DataParallel, torch.compile, our own LightningModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass
class Backbone:
    """A classifier whose output layer (``head_name``) is a fresh ``Linear``."""

    model: nn.Module
    head_name: str

    @property
    def head(self) -> nn.Linear:
        return self.model.get_submodule(self.head_name)


def family(name: str) -> ModuleType:
    """The family module that builds ``name`` (see :data:`FAMILIES`)."""
    prefix = next(p for p in FAMILIES if name.startswith(p))
    return importlib.import_module(FAMILIES[prefix])


def build_backbone(name: str, num_classes: int, weights: str | Path | None = IMAGENET) -> Backbone:
    """Build ``name`` with ``weights`` and a new ``num_classes``-way Xavier-initialised head."""
    if num_classes < 2:
        raise SettingError(f"A classifier needs at least 2 classes, got num_classes={num_classes}.")
    if isinstance(weights, str) and weights.lower() in ("none", "null", "random"):
        weights = None
    pretrained = isinstance(weights, str) and weights.lower() == IMAGENET
    model, head_name = family(name).build(name, num_classes, pretrained)
    if weights is not None and not pretrained:
        load_backbone_weights(model, head_name, Path(weights), backbone=name)
    return Backbone(model=model, head_name=head_name)


def preprocessing(name: str, image_size: int | None = None) -> dict:
    """What ``name``'s pretrained weights expect: ``image_size`` (the square crop; the family's own when None),
    ``resize_size`` (the eval resize before the centre crop, for that crop), ``mean``, ``std``, ``interpolation``."""
    return family(name).preprocessing(name, image_size)


def check_input_size(net: nn.Module, backbone: str, image_size: int) -> None:
    """Refuse ``data.image_size`` when ``net`` cannot take ``image_size`` x ``image_size`` images: a ViT built for one
    size, or layers without padding that shrink a small image to nothing (AlexNet below 63 pixels, Inception v3
    below 75). One blank image goes through the network in eval mode before any data is read; otherwise the first
    batch would fail with torch's message, which names no setting. Every module's mode is put back as it was.
    Call it before compiling ``net``.
    """
    parameter = next(net.parameters(), None)
    blank = torch.zeros(1, 3, image_size, image_size, device=parameter.device if parameter is not None else None)
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            net(blank if parameter is None else blank.to(parameter.dtype))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError) as err:
        pretrained = preprocessing(backbone)["image_size"]
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError(
            f"data.image_size={image_size}: {backbone} cannot take {image_size}x{image_size} images ({reason}). Use "
            f"its pretrained size, data.image_size={pretrained} (or null), or another size it takes."
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training


def check_pretrained_size(image_size: int, backbone: str, weights: Any, pretrained_size: int) -> None:
    """Warn when pretrained weights will see crops under half the size they were pretrained at.

    A fine-tuned network adapts to a moderately different resolution, but under half of it every object appears at
    under half the scale the pretrained filters learnt, and a stride-32 network's last map shrinks from 7x7 (224)
    to 4x4 or less, and the transfer from pretraining weakens: a linear probe of frozen ImageNet MobileNetV2 features
    on the Kaggle hot dog photos (500 test images) scored 0.884 at 224, 0.882 at 160, 0.846 at 112, 0.790 at 64 and
    0.708 at 32. Small crops can be the point of an experiment (speed), hence a warning, not an error. Random
    weights (``model.weights=null``) have no size of their own.
    """
    if weights is not None and image_size * 2 < pretrained_size:
        log.warning(
            "data.image_size=%d is under half the size %s's pretrained weights were trained at (%d): they see every "
            "object at under half the scale they learnt, and transfer less. Use data.image_size=null (%d), or at "
            "least %d, unless small crops are the point.",
            image_size,
            backbone,
            pretrained_size,
            pretrained_size,
            (pretrained_size + 1) // 2,
        )


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    """The book's head: ``Linear`` with a Xavier-uniform weight (bias keeps PyTorch's default init)."""
    head = nn.Linear(in_features, num_classes)
    nn.init.xavier_uniform_(head.weight)
    return head


def load_backbone_weights(model: nn.Module, head_name: str, path: Path, backbone: str | None = None) -> None:
    """Load a local ``state_dict`` (full or backbone-only) into every layer but the head.

    Head entries in the file are ignored (the head is always new). Anything else that does not fit
    (missing layers, unexpected keys, wrong shapes) is an error that lists the offending keys and names the
    torchvision architectures the file does fit, if any (``backbone``: the ``model.backbone`` name, for the message).
    """
    if not path.is_file():
        raise PathError(_not_a_weights_file(path))
    try:
        state = _read_state_dict(path)
    except MissingPackageError:
        raise
    except Exception as err:  # pickle errors, zip errors, truncated files
        raise SettingError(
            f"Could not read weights file {str(path)!r} (model.weights) as a PyTorch state_dict: {err}. Pass a "
            "file saved with torch.save(model.state_dict(), path) (or a .safetensors file)."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SettingError(
            f"Weights file {str(path)!r} (model.weights) does not hold a state_dict (a dict of tensors); "
            f"it holds a {type(state).__name__}. Save weights with torch.save(model.state_dict(), path)."
        )
    state = {_strip_wrapper_prefixes(key): value for key, value in state.items()}

    problems = misfit(state, model.state_dict(), head_name)
    if any(problems.values()):
        named = f"model.backbone={backbone}" if backbone else "the backbone"
        fits = family("").architecture_that_fits(state)  # torchvision's: the families other libraries name
        advice = (
            f" These weights fit model.backbone={fits}: pass that (model.backbone must name the architecture the "
            "weights were trained for)."
            if fits
            else " model.backbone must name the architecture these weights were trained for (a timm model's "
            "weights need model.backbone=timm/<name>)."
        )
        raise SettingError(
            f"Weights file {str(path)!r} (model.weights) does not fit {named} ({type(model).__name__}, "
            f"head {head_name!r} excluded): "
            + "; ".join(f"{label} ({len(keys)}): {_preview(keys)}" for label, keys in problems.items() if keys)
            + "."
            + advice
        )
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head_name + ".")}, strict=False)


def _not_a_weights_file(path: Path) -> str:
    """Why ``path`` is not a weights file, with what to pass instead (the weights files inside a folder)."""
    options = (
        "Pass model.weights=PATH to an existing state_dict file, model.weights=imagenet for the library's "
        "pretrained download, or model.weights=null for random init."
    )
    found = describe_path(path)
    if found == "nothing":
        return f"Weights file {str(path)!r} (model.weights) does not exist. {options}"
    inside = ""
    if found == "a folder":
        files = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHTS_SUFFIXES and p.is_file())
        inside = f" It holds {_preview(files, limit=5)}: pass one of them." if files else " It holds no weights file."
    return f"model.weights={str(path)!r} is {found}, not a weights file.{inside} {options}"


def misfit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], head_name: str) -> dict[str, list]:
    """What keeps ``state`` from loading into a model with ``expected`` keys, its head aside."""
    is_head = lambda key: key.startswith(head_name + ".")  # noqa: E731
    state = {key: value for key, value in state.items() if not is_head(key)}
    return {
        "missing": sorted(key for key in expected if key not in state and not is_head(key)),
        "unexpected": sorted(key for key in state if key not in expected),
        "wrong shape": sorted(
            f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
            for key in state
            if key in expected and state[key].shape != expected[key].shape
        ),
    }


def _read_state_dict(path: Path) -> object:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise MissingPackageError(
                f"{path.name} is a safetensors file: pip install safetensors (it comes with 'finetune[timm]')."
            ) from err
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
