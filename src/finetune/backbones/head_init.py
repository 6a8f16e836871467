"""The new head initialised from the pretrained one (``model.head_init``): the fine-tuned model starts as the
pretrained classifier restricted to the task, e.g. ImageNet's "hotdog" (row 934) against every other class.

``model.head_init.from``: ``xavier`` (the book's fresh head) or ``source``; ``model.head_init.classes`` maps every
class folder to source class indices, a list, or ``rest`` (every source index that no other class names)::

    model.head_init.from=source 'model.head_init.classes={hot_dog:[934],not_hot_dog:rest}'

How a group of source rows becomes one row of the new ``Linear`` head. The pretrained classifier gives the group
``G`` the probability ``sum_{j in G} softmax(z)_j``, i.e. the logit ``logsumexp_{j in G} z_j`` up to a constant
shared by every group; a ``Linear`` layer cannot compute a log-sum-exp of several rows. A one-row group keeps its row
exactly (weight and bias). A group of ``n`` rows gets the mean of their weights and the mean of their biases plus
``log(n)``: the first-order expansion of the log-sum-exp where the group's logits are equal (by Jensen's inequality
a lower bound of it), so a group is neither favoured nor penalised for its size. Averaging the rows without the
``log(n)`` would compare one hot dog logit with the *mean* logit of 999 other classes (near 0: every photo would be a
hot dog); summing them would add 999 logits.

Measured zero-shot on the Kaggle hot dog test photos (500, balanced) with EfficientNet-Lite2's ImageNet head
(docs/robustness.md): this head scores 0.854 accuracy (AUROC 0.942). For comparison, rules a ``Linear`` layer cannot
express: "hotdog is the top-1 of 1000" 0.892, the exact group probability above 0.5 0.830 (AUROC 0.956).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from finetune.errors import SettingError

XAVIER, SOURCE = "xavier", "source"
CHOICES = (XAVIER, SOURCE)
REST = "rest"  # every source index that no other class names
KEYS = ("from", "classes")
EXAMPLE = "'model.head_init.classes={hot_dog:[934],not_hot_dog:rest}'"


def uses_source(head_init: Any) -> bool:
    """Whether ``model.head_init`` asks for the source head (``from: source``)."""
    return isinstance(head_init, Mapping) and head_init.get("from") == SOURCE


def check_head_init(head_init: Any, weights: Any) -> None:
    """``model.head_init`` before anything is built: its choice, and a mapping of class names to source indices
    (lists of integers >= 0, or ``rest`` once, no index named twice). ``from: source`` needs pretrained weights
    (``model.weights``), whose source head is read when the model is built."""
    if head_init is None:
        return
    if not isinstance(head_init, Mapping):
        raise SettingError(
            f"model.head_init must be a node with from: xavier|source (and classes: for source), got {head_init!r}. "
            f"E.g. model.head_init.from=source {EXAMPLE}."
        )
    unknown = [key for key in head_init if key not in KEYS]
    if unknown:
        raise SettingError(
            f"{', '.join(f'model.head_init.{k}' for k in unknown)}: not a setting of model.head_init (it takes "
            f"{', '.join(KEYS)})."
        )
    choice, classes = head_init.get("from"), head_init.get("classes")
    if choice not in CHOICES:
        raise SettingError(
            f"Unknown model.head_init.from={choice!r}: choose one of {', '.join(CHOICES)} (xavier: a fresh head, the "
            "book's; source: the pretrained classifier's rows of the classes named in model.head_init.classes)."
        )
    if choice == XAVIER:
        if classes is not None:
            raise SettingError(
                "model.head_init.classes is only read with model.head_init.from=source: set that too, or leave "
                "model.head_init.classes out."
            )
        return
    if weights is None or str(weights).lower() in ("none", "null", "random"):
        raise SettingError(
            "model.head_init.from=source starts the head from the pretrained classifier, but model.weights=null "
            "(random init, e.g. experiment=scratch) has none. Pass pretrained weights that keep their classifier "
            "(pretrained_weights=PATH or model.weights=imagenet), or model.head_init.from=xavier."
        )
    if not isinstance(classes, Mapping) or not classes:
        raise SettingError(
            f"model.head_init.from=source needs model.head_init.classes: every class folder mapped to the source "
            f"classifier's class indices (a list) or to rest (every other index), e.g. {EXAMPLE}; got {classes!r}."
        )
    rest = [name for name, value in classes.items() if value == REST]
    if len(rest) > 1:
        raise SettingError(
            f"model.head_init.classes maps {', '.join(map(str, rest))} to rest: at most one class takes every "
            "source index that no other class names."
        )
    owner: dict[int, str] = {}
    for name, value in classes.items():
        if value == REST:
            continue
        if not _index_list(value):
            raise SettingError(
                f"model.head_init.classes.{name}={value!r}: give a non-empty list of source class indices (integers "
                f">= 0, e.g. [934]) or rest. E.g. {EXAMPLE}."
            )
        for index in value:
            if index in owner and owner[index] != name:
                raise SettingError(
                    f"model.head_init.classes names the source index {index} for both {owner[index]} and {name}: "
                    "each source class belongs to one class at most."
                )
            owner[index] = name


def _index_list(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    )


def in_class_order(head_init: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """``head_init`` with its ``classes`` mapping in the data's class order (the head's output order), refused
    when it misses a class folder or names one that is not there."""
    mapping = dict(head_init["classes"])
    missing = [c for c in classes if c not in mapping]
    extra = [str(c) for c in mapping if c not in classes]
    if missing or extra:
        said = []
        if missing:
            said.append(f"it does not map the class folder(s) {', '.join(missing)}")
        if extra:
            said.append(f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not a class folder")
        raise SettingError(
            f"model.head_init.classes must map every class folder of data.root ({', '.join(classes)}) to source "
            f"class indices or rest: {'; '.join(said)}. E.g. {EXAMPLE}."
        )
    return {**head_init, "classes": {c: mapping[c] for c in classes}}


def source_groups(classes: Mapping[str, Any], source_classes: int, where: str) -> list[list[int]]:
    """Each class's source indices, in ``classes``' order, ``rest`` resolved; ``where``: the source head, for
    messages (e.g. ``the head of model.weights=PATH``)."""
    named = {i for value in classes.values() if value != REST for i in value}
    outside = sorted(i for i in named if i >= source_classes)
    if outside:
        raise SettingError(
            f"model.head_init.classes names the source class index {', '.join(map(str, outside))}, but {where} has "
            f"{source_classes} classes (indices 0 to {source_classes - 1})."
        )
    rest = [i for i in range(source_classes) if i not in named]
    groups = [list(rest) if value == REST else list(value) for value in classes.values()]
    for name, group in zip(classes, groups, strict=True):
        if not group:
            raise SettingError(
                f"model.head_init.classes.{name}=rest is empty: the other classes name every one of the "
                f"{source_classes} source classes of {where}."
            )
    return groups


def combined_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(weight, bias)`` row per group: a single row as it is; several as the mean of the weights and the mean
    of the biases plus ``log(n)`` (see the module's docstring for why)."""
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    rows = torch.stack([weight[list(g)].double().mean(0) for g in groups]).to(weight.dtype)
    offsets = torch.stack([bias[list(g)].double().mean() + math.log(len(g)) for g in groups]).to(weight.dtype)
    return rows, offsets


def init_from_source(
    head: nn.Linear,
    source: Mapping[str, torch.Tensor] | None,
    head_init: Mapping[str, Any],
    where: str,
    advice: str,
) -> None:
    """Set ``head``'s weight and bias from the ``source`` head (``{"weight", "bias"}`` of the pretrained
    classifier); ``None`` (the weights have no classifier) is refused, naming ``where`` and ``advice``."""
    if source is None or "weight" not in source:
        raise SettingError(
            f"model.head_init.from=source starts the head from the pretrained classifier, but {where} holds no "
            f"classifier (its head was not kept). {advice} Or use model.head_init.from=xavier."
        )
    weight, bias = source["weight"], source.get("bias")
    if weight.ndim != 2 or weight.shape[1] != head.in_features:
        raise SettingError(
            f"The classifier in {where} has the shape {tuple(weight.shape)}; the head of this backbone takes "
            f"{head.in_features} features, so model.head_init.from=source cannot use it."
        )
    groups = source_groups(head_init["classes"], weight.shape[0], where)
    if len(groups) != head.out_features:
        raise ValueError(f"{len(groups)} class groups for a {head.out_features}-class head")  # run.py orders them
    rows, offsets = combined_rows(weight, bias, groups)
    with torch.no_grad():
        head.weight.copy_(rows)
        if head.bias is not None:
            head.bias.copy_(offsets)
