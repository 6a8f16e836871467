"""Torchvision classifiers by name, with pretrained weights and a fresh output layer.

Weights come from torchvision's weights API (``"imagenet"``), from a local ``state_dict`` file (any path), or
not at all (``None``: random init). The output layer is always replaced by a new ``Linear`` whose weight is
Xavier-uniform initialised, as in the d2l "Fine-Tuning" chapter.
"""

from __future__ import annotations

import difflib
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

IMAGENET = "imagenet"
# Prefixes that wrappers add to state_dict keys: DDP/DataParallel, torch.compile, our own LightningModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")


@dataclass
class Backbone:
    """A torchvision model whose output layer (``head_name``) is a fresh ``Linear``."""

    model: nn.Module
    head_name: str

    @property
    def head(self) -> nn.Linear:
        return self.model.get_submodule(self.head_name)


def available_backbones() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_backbone(name: str, num_classes: int, weights: str | Path | None = IMAGENET) -> Backbone:
    """Build ``name`` with ``weights`` and a new ``num_classes``-way Xavier-initialised head."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    names = available_backbones()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown backbone {name!r}: not a torchvision classification model.{hint} "
            f"See finetune.backbones.available_backbones() for the {len(names)} known names."
        )

    use_imagenet = isinstance(weights, str) and weights.lower() == IMAGENET
    model = _torchvision_model(name, pretrained=use_imagenet)
    head_name = find_head(model)
    in_features = model.get_submodule(head_name).in_features
    _replace_module(model, head_name, new_head(in_features, num_classes))
    if weights is not None and not use_imagenet and str(weights).lower() not in ("none", "null", "random"):
        load_backbone_weights(model, head_name, Path(weights))
    return Backbone(model=model, head_name=head_name)


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    """The book's head: ``Linear`` with a Xavier-uniform weight (bias keeps PyTorch's default init)."""
    head = nn.Linear(in_features, num_classes)
    nn.init.xavier_uniform_(head.weight)
    return head


def find_head(model: nn.Module) -> str:
    """The name of the output layer: the last ``Linear`` registered in the model.

    Holds for torchvision's classifiers (``fc``, ``classifier.1``, ``classifier.3``, ``heads.head``, ...).
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear output layer (its classifier is convolutional), "
            "so its head cannot be replaced; choose another backbone."
        )
    return linears[-1]


def load_backbone_weights(model: nn.Module, head_name: str, path: Path) -> None:
    """Load a local ``state_dict`` (full or backbone-only) into every layer but the head.

    Head entries in the file are ignored (the head is always new). Anything else that does not fit
    (missing layers, unexpected keys, wrong shapes) is an error that lists the offending keys.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file {str(path)!r} does not exist. Pass model.weights=PATH to an existing state_dict "
            "file, model.weights=imagenet for torchvision's download, or model.weights=null for random init."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, truncated files
        raise ValueError(f"Could not read weights file {str(path)!r} as a PyTorch state_dict: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
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
        raise ValueError(
            f"Weights file {str(path)!r} does not fit backbone {type(model).__name__} "
            f"(head {head_name!r} excluded): "
            + "; ".join(
                f"{label} ({len(keys)}): {_preview(keys)}"
                for label, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", wrong_shape),
                )
                if keys
            )
            + ". Check that model.backbone names the architecture these weights were trained for."
        )
    model.load_state_dict(state, strict=False)


# --- network structure: what the head receives, and the random layers around it ---------------------------------
_RANDOM_LAYERS = (nn.modules.dropout._DropoutNd,)


def head_input(net: nn.Module, head_name: str, images: torch.Tensor) -> torch.Tensor:
    """What ``net``'s head layer receives for ``images`` (captured by a forward pre-hook on the head)."""
    captured: list[torch.Tensor] = []
    handle = net.get_submodule(head_name).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        net(images)
    finally:
        handle.remove()
    return captured[0]


def dropouts_before_head(net: nn.Module, head_name: str) -> list[str]:
    """Names of the Dropout layers directly in front of the head in its ``nn.Sequential`` (in order)."""
    parent_name, _, child = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    if not isinstance(parent, nn.Sequential):
        return []
    names = [name for name, _ in parent.named_children()]
    found: list[str] = []
    for name in reversed(names[: names.index(child)]):
        if not isinstance(parent.get_submodule(name), _RANDOM_LAYERS):
            break
        found.insert(0, f"{parent_name}.{name}" if parent_name else name)
    return found


def random_layers_inside_backbone(net: nn.Module, head_name: str) -> list[str]:
    """Dropout / stochastic-depth layers that cached features cannot reproduce (they sit inside the backbone)."""
    kept = set(dropouts_before_head(net, head_name))
    return [
        name
        for name, module in net.named_modules()
        if name not in kept
        and (isinstance(module, _RANDOM_LAYERS) or type(module).__name__ == "StochasticDepth")
        and getattr(module, "p", 0) > 0
    ]


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        return torchvision.models.get_model(name, weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"Could not download the ImageNet weights {weights} for {name!r} ({err}). "
            f"Offline, either copy {Path(weights.url).name} into {checkpoints} (set TORCH_HOME to use another "
            f"cache), or pass model.weights=PATH to a local state_dict, or model.weights=null for random init."
        ) from err


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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
