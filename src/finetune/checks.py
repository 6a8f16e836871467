"""Small rules every component uses to check its own settings, by their config names.

Each component checks its settings beside its code, in a ``check_settings(node, cfg)`` static method that the
assembly (``finetune.run``) calls before any data is read. Torch and Lightning accept values that train nothing
(``lr=0``) or fail without naming the setting (``Invalid learning rate: -0.1``); these helpers say which setting is
wrong and what works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from finetune.errors import SettingError


def is_number(value: object) -> bool:
    """A finite real number (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(key: str, value: Any, rule: str, holds: Callable[[float], bool], advice: str) -> None:
    """``SettingError`` naming ``key`` and ``value`` unless ``value`` is a finite real number for which ``holds``."""
    if not (is_number(value) and holds(value)):
        raise SettingError(f"{key} must be {rule}, got {value!r}. {advice}")


def check_int(key: str, value: object, minimum: int | None, meaning: str) -> None:
    """A whole number (not a bool or a float), at least ``minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise SettingError(f"{key} must be {bound} ({meaning}), got {value!r}.")


def check_choice(key: str, value: object, choices: tuple[Any, ...], meaning: str) -> None:
    if value not in choices:
        raise SettingError(f"{key} must be one of {', '.join(map(str, choices))} ({meaning}), got {value!r}.")


def numbers(value: object, count: int) -> bool:
    """``value`` is a list or tuple of ``count`` numbers."""
    return isinstance(value, (list, tuple)) and len(value) == count and all(is_number(v) for v in value)


# optimizer.<setting>: (rule, test, what to do).
OPTIMIZER_RULES: dict[str, tuple[str, Callable[[float], bool], str]] = {
    "lr": (
        "> 0",
        lambda x: x > 0,
        "It is the backbone's learning rate (the head's is optimizer.lr x model.head_lr_mult): set a positive one, "
        "or leave optimizer.lr out to get the experiment's (docs/configuration.md, 'What each experiment sets').",
    ),
    "weight_decay": (">= 0", lambda x: x >= 0, "Use 0 for no weight decay."),
    "momentum": ("in [0, 1)", lambda x: 0 <= x < 1, "Use 0 (the book's plain SGD) or e.g. 0.9."),
}


def check_optimizer(settings: Mapping[str, Any]) -> None:
    """``optimizer.*`` (any torch optimizer's config): the settings it has, before any optimizer is built."""
    for key, (rule, holds, advice) in OPTIMIZER_RULES.items():
        if key in settings:
            check_number(f"optimizer.{key}", settings[key], rule, holds, advice)
    if "betas" in settings:
        betas = settings["betas"]
        if not (numbers(betas, 2) and all(0 <= b < 1 for b in betas)):
            raise SettingError(
                f"optimizer.betas must be two numbers in [0, 1), got {betas!r}. AdamW's own are [0.9, 0.999]."
            )


def configured_callbacks(cfg: Mapping[str, Any], kind: type | tuple[type, ...]) -> list[str]:
    """The names of the configured callbacks (``callbacks.<name>``) whose ``_target_`` class is a subclass of
    ``kind``; targets that cannot be imported are left to the assembly, which names them."""
    import importlib

    found = []
    for name, node in (cfg.get("callbacks") or {}).items():
        module, _, attribute = str((node or {}).get("_target_", "")).rpartition(".")
        try:
            target = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(target, type) and issubclass(target, kind):
            found.append(str(name))
    return found
