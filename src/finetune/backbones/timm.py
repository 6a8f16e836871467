"""timm's classifiers as ``timm/<name>`` (``timm/convnext_nano``, ``timm/resnet18.a1_in1k``), with their own input.

``pip install 'finetune[timm]'``. Pretrained weights come through the Hugging Face Hub (timm's
``create_model(name, pretrained=True)``); the preprocessing is the weights' pretrained config
(``timm.data.resolve_data_config``): e.g. 224 / 235 bicubic for ``resnet18.a1_in1k``, mean = std = 0.5 for ViTs.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from finetune.errors import DownloadError, MissingPackageError, SettingError

PREFIX = "timm/"


def build(name: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
    """The timm model, its classifier reset (``reset_classifier``) to a Xavier-initialised ``Linear``."""
    timm = _import_timm()
    arch = _checked_name(name)
    try:
        model = timm.create_model(arch, pretrained=pretrained)
    except Exception as err:  # no network, no such weights, a broken download or cache entry
        if not pretrained:
            raise
        raise DownloadError(
            f"Could not load timm's pretrained weights for {name!r} ({type(err).__name__}: {err}). timm downloads "
            "them through the Hugging Face Hub (cached under $HF_HOME, by default ~/.cache/huggingface). Offline, "
            "either fill that cache on a machine with internet and set HF_HUB_OFFLINE=1, or pass "
            "model.weights=PATH to a local state_dict (.pth or .safetensors) with model.backbone set to the "
            "architecture that file was trained for (timm/<name> for timm's), or model.weights=null for random init."
        ) from err
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if isinstance(classifier, (list, tuple)) and len(classifier) > 1:
        raise SettingError(
            f"{name!r} has {len(classifier)} classifier heads ({', '.join(classifier)}; a distilled model), and "
            "finetune replaces exactly one Linear head; choose a model with a single classifier."
        )
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise SettingError(
            f"{name!r} has no nn.Linear classifier (timm's get_classifier() gives a {type(head).__name__}), so its "
            "head cannot be replaced by a Xavier-initialised Linear; choose another backbone."
        )
    head.reset_parameters()
    nn.init.xavier_uniform_(head.weight)  # the book's head: Xavier weight, PyTorch's default bias
    return model, next(n for n, module in model.named_modules() if module is head)


def source_head(name: str) -> dict[str, torch.Tensor] | None:
    """The pretrained classifier of timm's weights for ``name`` (``model.head_init.from=source``); ``None`` where it
    is not one ``Linear`` layer."""
    timm = _import_timm()
    try:
        head = timm.create_model(_checked_name(name), pretrained=True).get_classifier()
    except Exception as err:  # the same download as build()'s, which succeeded or said why it failed
        raise DownloadError(
            f"Could not load timm's pretrained weights for {name!r} ({type(err).__name__}: {err})."
        ) from err
    if not isinstance(head, nn.Linear):
        return None
    return {key: value.detach().clone() for key, value in head.state_dict().items()}


def preprocessing(name: str, image_size: int | None = None) -> dict:
    """The pretrained config's input; another ``image_size`` keeps its crop fraction (``floor(size / crop_pct)``,
    timm's own eval transform). No weights are downloaded and no model is built."""
    timm = _import_timm()
    pretrained_cfg = timm.models.get_pretrained_cfg(_checked_name(name), allow_unregistered=True)
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    size = int(config["input_size"][-1]) if image_size is None else image_size
    crop_pct = float(config.get("crop_pct") or 0.875)
    return {
        "image_size": size,
        "resize_size": math.floor(size / crop_pct),
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "interpolation": str(config.get("interpolation") or "bilinear"),
    }


def knows(name: str) -> bool:
    """Whether timm (if installed) has ``name``: a hint for a timm name given without ``timm/``."""
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models() or name in timm.list_pretrained()


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise MissingPackageError(
            "model.backbone=timm/<name> needs the timm package: pip install 'finetune[timm]' (or pip install timm)."
        ) from err
    return timm


def _checked_name(name: str) -> str:
    """The timm name in ``timm/<name>``, checked against timm's registry (close names suggested)."""
    timm = _import_timm()
    arch = name[len(PREFIX) :]
    architectures = timm.list_models()
    tagged = timm.list_pretrained()
    if arch in architectures or arch in tagged:
        return arch
    close = difflib.get_close_matches(arch, architectures + tagged, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(PREFIX + c for c in close)}?" if close else ""
    raise SettingError(
        f"Unknown backbone {name!r}: {arch!r} is not a timm model{' or weight tag' if '.' in arch else ''}.{hint} "
        f"See timm.list_models() ({len(architectures)} architectures) and timm.list_pretrained() for the names with "
        "weight tags (name.tag)."
    )
