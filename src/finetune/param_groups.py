"""The optimizer's parameter groups: which parameters train at which rate and weight decay (``model.groups``).

Pure functions in the style of timm's ``optim/_param_groups.py``. Every group carries a ``name`` and an ``lr_scale``:
its rate is ``lr_scale`` times the schedule's at every step (``FineTuneModule.lr_scheduler_step``), so the ratios
hold under every scheduler, through ``callbacks.unfreeze`` and in ``finetune.lr_find``. A group that is excluded from
weight decay also carries its own ``weight_decay``.

- The book's (``model.groups`` all null): ``backbone`` (lr_scale 1) and ``head`` (``model.head_lr_mult``).
- ``model.groups.layer_decay=0.75``: the backbone split by depth into ``layer.0`` (the stem) ... ``layer.{L-1}`` (the
  block next to the head); block ``i`` learns at ``layer_decay ** (L - i)``, its distance from the head, and the head
  keeps ``model.head_lr_mult``. Depth (:func:`layer_ids`) is timm's own ``group_matcher`` for timm models (the blocks
  that timm's ``param_groups_layer_decay`` uses) and, for torchvision's, the top-level blocks in registration order.
- ``model.groups.norm_bias_weight_decay=0``: norms, biases, other 1-D parameters and the embeddings a timm model lists
  in ``no_weight_decay()`` (timm's rule) get that weight decay, in groups of their own named ``<group>.no_decay``.
  Null keeps the optimizer's weight decay for every parameter (the book's).

Why not timm's ``param_groups_layer_decay`` itself: it puts the head into the top layer at ``lr_scale`` 1 (here the
head is the ``head`` group at ``model.head_lr_mult``, which freezing, unfreezing and lr_find know by name), it needs
the weight decay passed in (here the optimizer's stays the default), and it serves timm models only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from finetune.checks import check_number
from finetune.errors import SettingError

HEAD, BACKBONE, LAYER, NO_DECAY = "head", "backbone", "layer", "no_decay"
# Containers whose children are blocks of their own (mobilenet's features.0..18, resnet's layer1.0, ...). Subclasses
# such as torchvision's Conv2dNormActivation are layers, not containers, and stay whole.
CONTAINERS = (nn.Sequential, nn.ModuleList)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


@dataclass(frozen=True)
class Grouping:
    """``model.groups``: ``layer_decay`` in (0, 1] or None; ``norm_bias_weight_decay`` >= 0 or None."""

    layer_decay: float | None = None
    norm_bias_weight_decay: float | None = None

    @classmethod
    def of(cls, groups: Mapping[str, Any] | None) -> Grouping:
        """The checked settings of ``model.groups`` (null or missing: the book's two groups)."""
        check_settings(groups)
        return cls(**dict(groups or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_settings(groups: Mapping[str, Any] | None) -> None:
    """``model.groups.*``: known keys, a decay in (0, 1], a weight decay >= 0 (both may be null)."""
    if groups is None:
        return
    if not isinstance(groups, Mapping):
        raise SettingError(
            f"model.groups must be a mapping such as {{layer_decay: 0.75, norm_bias_weight_decay: 0}}, got {groups!r}."
        )
    known = set(Grouping.__dataclass_fields__)
    unknown = sorted(str(k) for k in groups if k not in known)
    if unknown:
        raise SettingError(
            f"{', '.join('model.groups.' + k for k in unknown)}: not a setting of model.groups; its settings are "
            f"{', '.join(sorted(known))}."
        )
    decay = groups.get("layer_decay")
    if decay is not None:
        check_number(
            "model.groups.layer_decay", decay, "in (0, 1] or null", lambda x: 0 < x <= 1,
            "Each block's rate is this power of its distance from the head: e.g. 0.75 (ViTs) or 0.9; null for one "
            "backbone group.",
        )  # fmt: skip
    weight_decay = groups.get("norm_bias_weight_decay")
    if weight_decay is not None:
        check_number(
            "model.groups.norm_bias_weight_decay", weight_decay, ">= 0 or null", lambda x: x >= 0,
            "It is the weight decay of norms and biases: 0 (timm's rule), or null for the optimizer's.",
        )  # fmt: skip


def parameter_groups(net: nn.Module, head_name: str, head_lr_mult: float, grouping: Grouping) -> list[dict[str, Any]]:
    """The trainable parameters of ``net`` in named groups with their ``lr_scale``: the backbone's (by depth with a
    ``layer_decay``), then the head's; each split by weight decay with a ``norm_bias_weight_decay``. Empty groups are
    left out (a frozen backbone has none)."""
    head = {id(p) for p in net.get_submodule(head_name).parameters()}
    layers = layer_ids(net, head_name) if grouping.layer_decay is not None else {}
    depth = max(layers.values(), default=-1) + 1
    excluded = no_weight_decay_names(net) if grouping.norm_bias_weight_decay is not None else set()
    groups: dict[tuple[float, int], dict[str, Any]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in head:
            order, base, scale = math.inf, HEAD, float(head_lr_mult)
        elif layers:
            order = layers[name]
            base, scale = f"{LAYER}.{order}", float(grouping.layer_decay) ** (depth - order)
        else:
            order, base, scale = 0, BACKBONE, 1.0
        no_decay = name in excluded
        key = (order, int(no_decay))
        if key not in groups:
            groups[key] = {"name": f"{base}.{NO_DECAY}" if no_decay else base, "params": [], "lr_scale": scale}
            if no_decay:
                groups[key]["weight_decay"] = float(grouping.norm_bias_weight_decay)
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def is_head_group(group: Mapping[str, Any]) -> bool:
    """A group of the head (``head``, ``head.no_decay``); every other group is the backbone's."""
    return str(group.get("name", "")).split(".")[0] == HEAD


# --- depth ---------------------------------------------------------------------------------------------------------
def layer_ids(net: nn.Module, head_name: str) -> dict[str, int]:
    """Every backbone parameter's depth, ``0`` (the stem) to ``L - 1`` (next to the head), numbered without gaps.

    timm models: timm's ``group_matcher(coarse=False)`` through ``timm.models.group_parameters`` (ViT: the stem, each
    block, the final norm with the last block; parameters it does not match, such as a ``fc_norm``, sit on top).
    Other networks: :func:`blocks`.
    """
    ids = _timm_layer_ids(net)
    if ids is None:
        ids = {name: i for i, names in enumerate(blocks(net)) for name in names}
    prefix = f"{head_name}."
    ids = {name: i for name, i in ids.items() if not name.startswith(prefix)}
    renumbered = {old: new for new, old in enumerate(sorted(set(ids.values())))}
    return {name: renumbered[i] for name, i in ids.items()}


def _timm_layer_ids(net: nn.Module) -> dict[str, int] | None:
    matcher = getattr(net, "group_matcher", None)
    if matcher is None:
        return None
    try:
        from timm.models import group_parameters

        return group_parameters(net, matcher(coarse=False), reverse=True)
    except (ImportError, NotImplementedError):
        return None


def blocks(net: nn.Module) -> list[list[str]]:
    """The parameter names of ``net``'s blocks in registration order: its top-level children, with ``nn.Sequential``
    and ``nn.ModuleList`` containers opened at any depth (mobilenet's ``features.0`` ... ``features.18``, resnet's
    ``conv1``, ``bn1``, ``layer1.0`` ... ``layer4.1``), and so is a module that holds a container of like blocks
    (torchvision ViT's ``encoder``, whose ``layers`` are its blocks). Parameters held directly by an opened module
    (a class token, a position embedding) join the first block: the stem."""
    found: list[list[str]] = []
    stem: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        stem.extend(prefix + name for name, _ in module.named_parameters(recurse=False))
        for name, child in module.named_children():
            if _opened(child):
                visit(child, f"{prefix}{name}.")
            else:
                names = [f"{prefix}{name}.{n}" for n, _ in child.named_parameters()]
                if names:
                    found.append(names)

    visit(net, "")
    if stem:
        found = [stem + found[0], *found[1:]] if found else [stem]
    return found


def _opened(module: nn.Module) -> bool:
    if type(module) in CONTAINERS:
        return True
    return any(type(child) in CONTAINERS and _like_blocks(child) for child in module.children())


def _like_blocks(container: nn.Module) -> bool:
    children = list(container.children())
    return len(children) >= 2 and len({type(c) for c in children}) == 1


# --- norms and biases ----------------------------------------------------------------------------------------------
def norm_and_bias_names(net: nn.Module) -> set[str]:
    """The names of ``net``'s biases and of its normalization layers' parameters (BatchNorm, LayerNorm, GroupNorm,
    RMSNorm, and layers whose class name ends in ``Norm``/``Norm2d``, as timm's): what BitFit trains."""
    names = set()
    for module_name, module in net.named_modules():
        norm = isinstance(module, NORMS) or type(module).__name__.lower().endswith(("norm", "norm1d", "norm2d"))
        for name, _ in module.named_parameters(recurse=False):
            if norm or name == "bias":
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def no_weight_decay_names(net: nn.Module) -> set[str]:
    """Norms and biases, every other 1-D parameter (timm's ``weight_decay_exclude_1d``: layer scales, ...) and the
    parameters a timm model lists in its ``no_weight_decay()`` (the position embedding, the class token)."""
    listed = net.no_weight_decay() if callable(getattr(net, "no_weight_decay", None)) else set()
    return norm_and_bias_names(net) | {
        name for name, param in net.named_parameters() if param.ndim <= 1 or name in listed
    }
