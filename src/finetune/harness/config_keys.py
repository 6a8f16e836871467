"""Config keys that would never be used: refused by name before anything is built.

Hydra's ``instantiate`` lets the code's own arguments win over the config's, and takes any key the config has: a key
the code fills itself (``+model.num_classes=5``) would be silently replaced, and one its class does not take (a
typo, ``+model.lr=0.1``) fails deep inside, or only once fitting starts. The assembly checks every node it builds
(:func:`check_node_keys`); the commands that load a trained checkpoint refuse the nodes they never read
(:func:`check_checkpoint_command`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import SettingError

# --- keys that never reach the object built from their config node -------------------------------------------------
# Arguments the code passes itself when it builds a node's object: hydra's instantiate lets the call's arguments win
# over the config's, so a config key of the same name would be silently replaced (+model.num_classes=5 trained a
# 2-class head and .hydra/config.yaml recorded 5). Each is refused saying where the value comes from.
FILLED_BY_THE_CODE: dict[str, dict[str, str]] = {
    "model": {
        "num_classes": "the number of classes is the number of class folders in data.root's train/ (one output "
        "per folder), so the head always matches the data. To train on fewer classes, point data.root at a folder "
        "holding only their folders",
        "optimizer": "the optimizer is the optimizer group's (optimizer=sgd|adamw, optimizer.lr=...)",
        "scheduler": "the scheduler is the scheduler group's (scheduler=cosine|warmup_cosine|..., none by default)",
    },
    "data": {
        "test_only": "the command sets it (finetune.evaluate reads only the images it scores)",
        "require_test": "test_after_fit=false sets it (a run that never tests needs no test/ folder)",
    },
    "optimizer": {"params": "the model hands the optimizer its parameter groups (model.head_lr_mult, model.freeze)"},
    "scheduler": {"optimizer": "the model hands the schedule its optimizer"},
    "features": {
        "images": "the image data is the data group's (data=...)",
        "model": "the model is the model group's (model.*)",
        "unfreeze_epoch": "callbacks.unfreeze.epoch sets it",
    },
    "trainer": {
        "callbacks": "callbacks come from the callbacks group (+callbacks=early_stopping, "
        "callbacks=[default,lr_monitor])",
        "logger": "loggers come from the logger group (logger=tensorboard, +logger=wandb, logger=[] for none)",
        "enable_checkpointing": "checkpoints are written while callbacks.model_checkpoint is configured "
        "(~callbacks.model_checkpoint turns them off)",
    },
}


def check_node_keys(node: str, settings: Mapping[str, Any]) -> None:
    """Refuse a ``node.key`` that the object built from ``node`` would never see: one the code passes itself
    (:data:`FILLED_BY_THE_CODE`), or one its ``_target_`` does not take (a typo, ``+model.lr=0.1``), which
    instantiate would report as a ``TypeError`` traceback, or, for a ``_partial_`` optimizer, only once fitting starts.
    """
    group = node.split(".")[0]
    for key, source in FILLED_BY_THE_CODE.get(group, {}).items():
        if key in settings:
            raise SettingError(f"{node}.{key} cannot be set: {source}. Remove {node}.{key}={settings[key]!r}.")
    target = settings.get("_target_")
    accepted = target_arguments(target)
    if accepted is None:
        return  # takes any keyword, or cannot be imported (instantiate names it)
    known = accepted
    unknown = [key for key in settings if not str(key).startswith("_") and key not in known]
    if unknown:
        settable = sorted(known - FILLED_BY_THE_CODE.get(group, {}).keys())
        close = sorted({m for key in unknown for m in difflib.get_close_matches(str(key), settable, n=3)})
        hint = f"Did you mean {', '.join(f'{node}.{m}' for m in close)}? " if close else ""
        listing = f"Its settings: {', '.join(settable)}." if len(settable) <= 30 else "See its documentation."
        raise SettingError(
            f"{', '.join(f'{node}.{key}' for key in unknown)}: not a setting of {node} ({target} takes no argument "
            f"of that name), so it would never be used. {hint}{listing}"
        )


def target_arguments(target: Any) -> set[str] | None:
    """The keyword arguments that ``target`` (a dotted name of a class or function) takes; None when it takes any
    (``**kwargs`` all the way up) or cannot be imported. A class's ``**kwargs`` are followed to its base classes."""
    if not isinstance(target, str):
        return None
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any import failure: the assembly reports it with the target's name
        return None
    names: set[str] = set()
    for owner in found.__mro__ if isinstance(found, type) else (found,):
        try:
            parameters = inspect.signature(owner.__init__ if isinstance(found, type) else owner).parameters
        except (TypeError, ValueError):
            return None
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names |= {name for name, p in parameters.items() if p.kind in kinds and name != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names
    return None


# Config nodes that a command using a trained checkpoint never reads, and why: their configs have no such node, but
# Hydra adds any +model.backbone=resnet18 (or an experiment= overlay) without a word.
UNUSED_WITH_A_CHECKPOINT = {
    "model": "the model (backbone, head, weights, freezing) is the checkpoint's",
    "optimizer": "nothing is trained",
    "scheduler": "nothing is trained",
    "data": "the images go through the checkpoint's own preprocessing (its image and resize sizes, normalisation)",
}


def check_checkpoint_command(
    cfg: DictConfig, command: str, unused: Sequence[str] = ("model", "optimizer", "scheduler")
) -> None:
    """Refuse settings that ``finetune.<command>`` (which loads a trained checkpoint) would ignore: those of the
    ``unused`` config nodes (:data:`UNUSED_WITH_A_CHECKPOINT`), e.g. ``+model.backbone=resnet18``."""
    given = [key for node in unused if node in cfg for key in _dotted_keys(node, cfg[node])]
    if given:
        reasons = "; ".join(dict.fromkeys(UNUSED_WITH_A_CHECKPOINT[key.split(".")[0]] for key in given))
        raise SettingError(
            f"finetune.{command} does not use {', '.join(given)}: {reasons} (ckpt_path). Remove them; to train "
            "another model, use finetune.train."
        )


def _dotted_keys(prefix: str, node: Any) -> list[str]:
    """The leaf keys of a config node, dotted (``model.backbone``), read without resolving interpolations."""
    tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if not isinstance(tree, Mapping) or not tree:
        return [prefix]
    return [key for name, value in tree.items() for key in _dotted_keys(f"{prefix}.{name}", value)]
