"""Image classifiers by name (torchvision, or timm as ``timm/<name>``), pretrained weights and a fresh output layer.

Weights come from the library's own pretrained weights (``"imagenet"``: torchvision's weights API, or timm's
``create_model(name, pretrained=True)``), from a local ``state_dict`` file (any path), or not at all (``None``:
random init). The output layer is always replaced by a new ``Linear`` whose weight is Xavier-uniform initialised, as
in the d2l "Fine-Tuning" chapter. :func:`preprocessing` says which image size, resize, interpolation and
normalisation a backbone's pretrained weights expect.
"""

from __future__ import annotations

import difflib
import math
import re
import urllib.error
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from finetune.errors import DownloadError, MissingPackageError, PathError, SettingError, describe_path

IMAGENET = "imagenet"
TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def available_backbones() -> list[str]:
    """The torchvision names; timm's are ``timm/`` + any name of :func:`available_timm_backbones`."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_timm_backbones(pretrained: bool = False) -> list[str]:
    """timm's architectures (``resnet18``) or, with ``pretrained``, its weight tags (``resnet18.a1_in1k``)."""
    timm = _import_timm()
    return timm.list_pretrained() if pretrained else timm.list_models()


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def build_backbone(name: str, num_classes: int, weights: str | Path | None = IMAGENET) -> Backbone:
    """Build ``name`` with ``weights`` and a new ``num_classes``-way Xavier-initialised head.

    ``name`` is a torchvision classifier (``resnet18``) or ``timm/`` + a timm model, with or without its weight tag
    (``timm/convnext_nano``, ``timm/resnet18.a1_in1k``).
    """
    if num_classes < 1:
        raise SettingError(f"num_classes must be at least 1, got {num_classes}.")
    use_imagenet = isinstance(weights, str) and weights.lower() == IMAGENET
    if is_timm(name):
        model, head_name = _timm_model(name, num_classes, pretrained=use_imagenet)
    else:
        model, head_name = _torchvision_with_new_head(name, num_classes, pretrained=use_imagenet)
    if weights is not None and not use_imagenet and str(weights).lower() not in ("none", "null", "random"):
        load_backbone_weights(model, head_name, Path(weights), backbone=name)
    return Backbone(model=model, head_name=head_name)


def _torchvision_with_new_head(name: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
    names = available_backbones()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        if _timm_knows(name):
            close = [TIMM_PREFIX + name, *close]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SettingError(
            f"Unknown backbone {name!r}: not a torchvision classification model.{hint} "
            f"See finetune.backbones.available_backbones() for the {len(names)} known names, or use a timm model "
            "as model.backbone=timm/<name>."
        )
    model = _torchvision_model(name, pretrained=pretrained)
    head_name = find_head(model)
    in_features = model.get_submodule(head_name).in_features
    _replace_module(model, head_name, new_head(in_features, num_classes))
    return model, head_name


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
        raise SettingError(
            f"{type(model).__name__} has no nn.Linear output layer (its classifier is convolutional), "
            "so its head cannot be replaced; choose another backbone."
        )
    return linears[-1]


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

    problems = _misfit(state, model.state_dict(), head_name)
    if any(problems.values()):
        named = f"model.backbone={backbone}" if backbone else "the backbone"
        fits = _architecture_that_fits(state)
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


def _misfit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], head_name: str) -> dict[str, list]:
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


def _architecture_that_fits(state: dict[str, torch.Tensor]) -> str | None:
    """The first torchvision backbone that ``state`` loads into, or ``None``. Models are built without memory (on
    the meta device), and only in the families (torchvision modules) whose first member's layer names resemble the
    file's: a second or two. (RegNets cannot be built on the meta device, so they are never suggested.)"""

    def built(name: str) -> tuple[dict[str, torch.Tensor], str] | None:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. GoogLeNet's notice about its future default init
                net = torchvision.models.get_model(name, weights=None)
            return net.state_dict(), find_head(net)
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
    for name in sorted(available_backbones(), key=size):
        families.setdefault(torchvision.models.get_model_builder(name).__module__, []).append(name)
    ours = pattern(state)
    for members in families.values():
        first = built(members[0])
        if first is None or len(ours & pattern(first[0])) < 0.5 * len(ours):
            continue
        for name in members:
            candidate = first if name == members[0] else built(name)
            if candidate is not None and not any(_misfit(state, *candidate).values()):
                return name
    return None


# --- network structure: what the head receives, and the random layers around it ---------------------------------
_RANDOM_LAYERS = (nn.modules.dropout._DropoutNd,)
_STOCHASTIC_DEPTH = ("StochasticDepth", "DropPath")  # torchvision's and timm's per-sample residual drop


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
        and (isinstance(module, _RANDOM_LAYERS) or type(module).__name__ in _STOCHASTIC_DEPTH)
        and (getattr(module, "p", 0) or getattr(module, "drop_prob", 0) or 0) > 0
    ]


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


# --- pretrained preprocessing --------------------------------------------------------------------------------------
def preprocessing(backbone: str) -> dict:
    """The input a backbone's pretrained weights expect: ``image_size`` (the square crop), ``resize_size`` (the
    eval resize before the centre crop), ``mean``, ``std``, ``interpolation`` (``"bilinear"``, ``"bicubic"``) and
    ``crop_pct`` (``image_size / resize_size``).

    torchvision backbones get the book's ImageNet settings (224 crop of a 256 resize, bilinear, ImageNet mean/std);
    ``timm/<name>`` backbones get their pretrained config (``timm.data.resolve_data_config``), e.g. 224 / 235,
    bicubic for ``timm/resnet18.a1_in1k`` (crop fraction 0.95) or mean = std = 0.5 for ``timm/vit_tiny_patch16_224``.
    No weights are downloaded and no model is built.
    """
    if not is_timm(backbone):
        return {
            "image_size": 224,
            "resize_size": 256,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bilinear",
            "crop_pct": 224 / 256,
        }
    timm = _import_timm()
    arch = _check_timm_name(backbone)
    pretrained_cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=True)
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    image_size = int(config["input_size"][-1])
    crop_pct = float(config.get("crop_pct") or 0.875)
    return {
        "image_size": image_size,
        "resize_size": math.floor(image_size / crop_pct),  # timm's own eval transform: floor(size / crop_pct)
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "interpolation": str(config.get("interpolation") or "bilinear"),
        "crop_pct": crop_pct,
    }


# --- timm ------------------------------------------------------------------------------------------------------------
def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise MissingPackageError(
            "model.backbone=timm/<name> needs the timm package: pip install 'finetune[timm]' (or pip install timm)."
        ) from err
    return timm


def _timm_knows(name: str) -> bool:
    """Whether timm (if installed) has ``name``: a hint for a timm name given without ``timm/``."""
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models() or name in timm.list_pretrained()


def _check_timm_name(backbone: str) -> str:
    """The timm name in ``timm/<name>``, checked against timm's registry (close names suggested)."""
    timm = _import_timm()
    arch = backbone[len(TIMM_PREFIX) :]
    architectures = timm.list_models()
    if arch in architectures:
        return arch
    tagged = timm.list_pretrained()
    if arch in tagged:
        return arch
    close = difflib.get_close_matches(arch, architectures + tagged, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
    raise SettingError(
        f"Unknown backbone {backbone!r}: {arch!r} is not a timm model{' or weight tag' if '.' in arch else ''}.{hint} "
        f"See timm.list_models() ({len(architectures)} architectures) and timm.list_pretrained() for the "
        "names with weight tags (name.tag)."
    )


def _timm_model(backbone: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
    """A timm model whose classifier is reset (timm's ``reset_classifier``) to a Xavier-initialised ``Linear``."""
    timm = _import_timm()
    arch = _check_timm_name(backbone)
    if pretrained:
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as err:  # no network, no such weights, a broken download or cache entry
            raise DownloadError(
                f"Could not load timm's pretrained weights for {backbone!r} ({type(err).__name__}: {err}). timm "
                "downloads them through the Hugging Face Hub (cached under $HF_HOME, by default ~/.cache/huggingface). "
                "Offline, either fill that cache on a machine with internet and set HF_HUB_OFFLINE=1, or pass "
                f"model.weights=PATH to a local state_dict (.pth or .safetensors) {_LOCAL_FILE_MATCHES}, or "
                "model.weights=null for random init."
            ) from err
    else:
        model = timm.create_model(arch, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if isinstance(classifier, (list, tuple)) and len(classifier) > 1:
        raise SettingError(
            f"{backbone!r} has {len(classifier)} classifier heads ({', '.join(classifier)}; a distilled model), and "
            "finetune replaces exactly one Linear head; choose a model with a single classifier."
        )
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise SettingError(
            f"{backbone!r} has no nn.Linear classifier (timm's get_classifier() gives a {type(head).__name__}), so "
            "its head cannot be replaced by a Xavier-initialised Linear; choose another backbone."
        )
    head_name = next(name for name, module in model.named_modules() if module is head)
    head.reset_parameters()
    nn.init.xavier_uniform_(head.weight)  # the book's head: Xavier weight, PyTorch's default bias
    return model, head_name


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        return torchvision.models.get_model(name, weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        raise DownloadError(
            f"Could not download the ImageNet weights {weights} for {name!r} ({err}). "
            f"Offline, either copy {Path(weights.url).name} into {checkpoints} (set TORCH_HOME to use another "
            f"cache), or pass model.weights=PATH to a local state_dict {_LOCAL_FILE_MATCHES}, or model.weights=null "
            "for random init."
        ) from err


# A local weights file is one architecture's: model.backbone (resnet18 by default) must name it.
_LOCAL_FILE_MATCHES = (
    "with model.backbone set to the architecture that file was trained for (model.backbone=mobilenet_v2 for a "
    "MobileNetV2 file)"
)


def _read_state_dict(path: Path):
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise MissingPackageError(
                f"{path.name} is a safetensors file: pip install safetensors (it comes with 'finetune[timm]')."
            ) from err
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


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
