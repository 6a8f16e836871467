"""Image classifiers by name, pretrained weights and a fresh output layer.

A name picks a *family* by its prefix (:data:`FAMILIES`): ``timm/convnext_nano`` is timm's, a bare name such as
``resnet18`` is torchvision's. A family is one module with two functions, ``build(name, num_classes, pretrained)``
(the model with a new ``num_classes``-way ``Linear`` head, and that head's name) and ``preprocessing(name,
image_size)`` (what its pretrained weights expect as input). A new family is one such file and one line here.

Weights come from the family's own pretrained download (``"imagenet"``), from a local ``state_dict`` file (any other
string: a path), or not at all (``None``: random init). The head is always new, its weight Xavier-uniform
initialised, as in the d2l "Fine-Tuning" chapter, unless ``head_init`` asks for the pretrained classifier's rows
(:mod:`finetune.backbones.head_init`): read from the weights file, or, for the library's download, from the
family's optional ``source_head(name)`` (the pretrained classifier's ``{"weight", "bias"}``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from finetune.errors import SettingError

IMAGENET = "imagenet"
# Name prefix -> the module of that family. The first prefix that a name starts with wins ("" matches every name).
FAMILIES = {
    "timm/": "finetune.backbones.timm",
    "": "finetune.backbones.torchvision",
}


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


def build_backbone(
    name: str, num_classes: int, weights: str | Path | None = IMAGENET, head_init: dict[str, Any] | None = None
) -> Backbone:
    """Build ``name`` with ``weights`` and a new ``num_classes``-way head: Xavier-initialised, or with ``head_init``
    ``{"from": "source", "classes": {name: [indices] | "rest"}}`` (in output order) the pretrained classifier's rows
    (:mod:`finetune.backbones.head_init`)."""
    from finetune.backbones.head_init import check_head_init, init_from_source, uses_source

    if num_classes < 2:
        raise SettingError(f"A classifier needs at least 2 classes, got num_classes={num_classes}.")
    if isinstance(weights, str) and weights.lower() in ("none", "null", "random"):
        weights = None
    check_head_init(head_init, weights)
    pretrained = isinstance(weights, str) and weights.lower() == IMAGENET
    builder = family(name)
    model, head_name = builder.build(name, num_classes, pretrained)
    source = None
    if weights is not None and not pretrained:
        from finetune.backbones.weights import load_backbone_weights  # a local file: read, checked, loaded

        source = load_backbone_weights(model, head_name, Path(weights), backbone=name)
    if uses_source(head_init):
        where, advice = f"model.weights={weights}", "Pass a weights file saved with its classifier."
        if pretrained:
            where, advice = f"the pretrained weights of {name!r}", "Pass a weights file that keeps its classifier."
            source = builder.source_head(name) if hasattr(builder, "source_head") else None
        init_from_source(model.get_submodule(head_name), source, head_init, where, advice)
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
