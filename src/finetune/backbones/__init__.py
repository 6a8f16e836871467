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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from finetune.errors import MissingPackageError, PathError, SettingError

IMAGENET = "imagenet"
# Name prefix -> the module of that family. The first prefix that a name starts with wins ("" matches every name).
FAMILIES = {
    "timm/": "finetune.backbones.timm",
    "": "finetune.backbones.torchvision",
}
# Prefixes that wrappers add to state_dict keys: DDP/DataParallel, torch.compile, our own LightningModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")


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
        load_backbone_weights(model, head_name, Path(weights))
    return Backbone(model=model, head_name=head_name)


def preprocessing(name: str, image_size: int | None = None) -> dict:
    """What ``name``'s pretrained weights expect: ``image_size`` (the square crop; the family's own when None),
    ``resize_size`` (the eval resize before the centre crop, for that crop), ``mean``, ``std``, ``interpolation``."""
    return family(name).preprocessing(name, image_size)


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    """The book's head: ``Linear`` with a Xavier-uniform weight (bias keeps PyTorch's default init)."""
    head = nn.Linear(in_features, num_classes)
    nn.init.xavier_uniform_(head.weight)
    return head


def load_backbone_weights(model: nn.Module, head_name: str, path: Path) -> None:
    """Load a local ``state_dict`` (full or backbone-only) into every layer but the head.

    Head entries in the file are ignored (the head is always new). Anything else that does not fit (missing layers,
    unexpected keys, wrong shapes) is an error that lists the offending keys.
    """
    if not path.is_file():
        raise PathError(
            f"Weights file {str(path)!r} does not exist. Pass model.weights=PATH to an existing state_dict "
            "file, model.weights=imagenet for the library's pretrained download, or model.weights=null for random "
            "init."
        )
    try:
        state = _read_state_dict(path)
    except MissingPackageError:
        raise
    except Exception as err:  # pickle errors, zip errors, truncated files
        raise SettingError(f"Could not read weights file {str(path)!r} as a PyTorch state_dict: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SettingError(
            f"Weights file {str(path)!r} does not hold a state_dict (a dict of tensors); "
            f"it holds a {type(state).__name__}. Save weights with torch.save(model.state_dict(), path)."
        )
    state = {_strip_wrapper_prefixes(key): value for key, value in state.items()}
    expected = model.state_dict()
    is_head = lambda key: key.startswith(head_name + ".")  # noqa: E731
    state = {key: value for key, value in state.items() if not is_head(key)}
    unexpected = sorted(key for key in state if key not in expected)
    missing = sorted(key for key in expected if key not in state and not is_head(key))
    wrong_shape = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in state
        if key in expected and state[key].shape != expected[key].shape
    )
    if unexpected or missing or wrong_shape:
        found = [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)]
        raise SettingError(
            f"Weights file {str(path)!r} does not fit backbone {type(model).__name__} (head {head_name!r} excluded): "
            + "; ".join(f"{label} ({len(keys)}): {_preview(keys)}" for label, keys in found if keys)
            + ". Check that model.backbone names the architecture these weights were trained for."
        )
    model.load_state_dict(state, strict=False)


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
