"""A local weights file (``model.weights=PATH``): read safely, loaded into every layer but the head, or refused
saying what does not fit and, where it can tell, which ``model.backbone`` it was trained for."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torchvision
from torch import nn

from finetune.errors import MissingPackageError, PathError, SettingError, describe_path

# Prefixes that wrappers add to state_dict keys: DDP/DataParallel, torch.compile, our own LightningModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def load_backbone_weights(
    model: nn.Module, head_name: str, path: Path, backbone: str | None = None
) -> dict[str, torch.Tensor] | None:
    """Load a local ``state_dict`` (full or backbone-only) into every layer but the head; return the file's head
    (``{"weight", "bias"}``, the pretrained classifier that ``model.head_init.from=source`` starts from) or ``None``.

    Head entries in the file are not loaded (the head is always new). Anything else that does not fit
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
        fits = torchvision_architecture_that_fits(state)
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
    head = {key[len(head_name) + 1 :]: value for key, value in state.items() if key.startswith(head_name + ".")}
    return head or None


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


def torchvision_architecture_that_fits(state: dict[str, torch.Tensor]) -> str | None:
    """The first torchvision backbone that ``state`` loads into, or ``None``. Models are built without memory (on
    the meta device), and only in the families (torchvision modules) whose first member's layer names resemble the
    file's: a second or two. (RegNets cannot be built on the meta device, so they are never suggested.)"""

    def built(name: str) -> tuple[dict[str, torch.Tensor], str] | None:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. GoogLeNet's notice about its future default init
                net = torchvision.models.get_model(name, weights=None)
            return net.state_dict(), [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
        except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is not suggested
            return None

    def pattern(keys: Iterable[str]) -> set[str]:
        return {re.sub(r"\.\d+(?=\.)", ".#", key) for key in keys}

    def size(name: str) -> int:  # parameters of its pretrained weights: the smaller, the quicker to build
        try:
            return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
        except Exception:  # noqa: BLE001 - no weights recorded: last
            return 1 << 62

    families: dict[str, list[str]] = {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models), key=size):
        families.setdefault(torchvision.models.get_model_builder(name).__module__, []).append(name)
    ours = pattern(state)
    for members in families.values():
        first = built(members[0])
        if first is None or len(ours & pattern(first[0])) < 0.5 * len(ours):
            continue
        for name in members:
            candidate = first if name == members[0] else built(name)
            if candidate is not None and not any(misfit(state, *candidate).values()):
                return name
    return None
