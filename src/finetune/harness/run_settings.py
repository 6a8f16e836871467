"""The run's own rules, by config name: the trainer's stopping rules and devices, the seed. Every component checks
its own settings (``check_settings`` beside its code); these are the ones no component owns.

Lightning accepts values that train nothing (``max_epochs=0``) or fail without naming the setting (``devices=0``).
``max_epochs=0`` is a run of its own only with a head started from the pretrained classifier
(``model.head_init.from=source``): the zero-shot model, validated, calibrated and tested untrained.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.backbones.head_init import uses_source
from finetune.checks import check_number
from finetune.errors import SettingError
from finetune.harness.distributed import check_strategy


def check_run_settings(cfg: DictConfig) -> None:
    """``trainer.*`` of a composed run config (and ``seed`` where the entry point seeds: :func:`check_seed`)."""
    check_trainer_settings(cfg.trainer, zero_shot=zero_shot_allowed(cfg))


def zero_shot_allowed(cfg: DictConfig) -> bool:
    """Whether ``trainer.max_epochs=0`` means something: the model's head is the source classifier's
    (``model.head_init.from=source``), so the untrained model is the zero-shot classifier."""
    return uses_source(OmegaConf.select(cfg, "model.head_init", default=None))


def is_zero_shot(cfg: DictConfig) -> bool:
    """A zero-shot run: ``trainer.max_epochs=0`` with the source head (nothing is fitted, see ``finetune.train``)."""
    return OmegaConf.select(cfg, "trainer.max_epochs", default=None) == 0 and zero_shot_allowed(cfg)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_settings(trainer: DictConfig, zero_shot: bool = False) -> None:
    """Stopping rules Lightning accepts but that train nothing: a run would report "completed" on untrained weights.

    ``max_epochs=-1`` (Lightning's "no epoch limit") is allowed with a step limit, ``+trainer.max_steps=N``;
    ``max_epochs=0`` where ``zero_shot`` (the head is the pretrained classifier's: :func:`zero_shot_allowed`).
    """
    steps = trainer.get("max_steps", -1)
    if not (_count(steps) and (steps == -1 or steps >= 1)):
        raise SettingError(
            f"trainer.max_steps must be -1 (no step limit) or an integer >= 1, got {steps!r}. Leave it out to train "
            "for trainer.max_epochs, or set the number of optimizer steps to stop after."
        )
    check_devices(trainer.get("devices", "auto"), trainer.get("num_nodes", 1))
    check_gradient_clipping(trainer.get("gradient_clip_val"), trainer.get("gradient_clip_algorithm"))
    check_accelerator(trainer.get("accelerator", "auto"))
    check_strategy(trainer.get("strategy", "auto"))
    epochs = trainer.get("max_epochs")
    if not (_count(epochs) and (epochs >= 1 or (epochs == -1 and steps >= 1) or (epochs == 0 and zero_shot))):
        raise SettingError(
            f"trainer.max_epochs must be an integer >= 1 (the epochs to train), got {epochs!r}. Set e.g. "
            "trainer.max_epochs=5 (the book's): with 0 a run reports 'completed' on untrained weights (0 is a "
            "zero-shot run only with the head started from the pretrained classifier, model.head_init.from=source). "
            "-1 (no epoch limit) needs a step limit, +trainer.max_steps=N."
        )


def check_devices(devices: Any, num_nodes: Any) -> None:
    """``trainer.devices`` and ``trainer.num_nodes`` as Lightning reads them, refused with the setting's name
    (Lightning's own message for ``devices=0`` names neither the setting nor a value that works)."""
    if isinstance(devices, str) and devices.strip() == "auto":
        pass
    else:
        text = str(devices).strip()
        if isinstance(devices, str) and "," in text:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            good = bool(parts) and all(p.isdigit() for p in parts)
        elif OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
            good = len(devices) > 0 and all(_count(d) and d >= 0 for d in devices)
        else:
            number = int(text) if re.fullmatch(r"-?\d+", text) and not isinstance(devices, bool) else None
            good = number is not None and (number >= 1 or number == -1)
        if not good:
            raise SettingError(
                f"trainer.devices must be auto, a number of devices >= 1, -1 (all of them) or a list of device "
                f"indices such as [0,1], got {devices!r}. For the CPU, use trainer.accelerator=cpu trainer.devices=1."
            )
    if not (_count(num_nodes) and num_nodes >= 1):
        raise SettingError(f"trainer.num_nodes must be an integer >= 1 (machines to train on), got {num_nodes!r}.")


CLIP_ALGORITHMS = ("norm", "value")


def check_gradient_clipping(value: Any, algorithm: Any) -> None:
    """``trainer.gradient_clip_val`` (null or 0: no clipping) and ``trainer.gradient_clip_algorithm``. Lightning skips
    clipping for a negative limit without a word, and fails on ``nan`` with a message about a conflict."""
    if value is not None:
        check_number(
            "trainer.gradient_clip_val",
            value,
            "a number >= 0 (null or 0: no clipping)",
            lambda x: x >= 0,
            "It is the largest gradient norm a step may take (gradient_clip_algorithm=norm); 1.0 is a usual limit.",
        )
    if algorithm is not None and algorithm not in CLIP_ALGORITHMS:
        raise SettingError(
            f"trainer.gradient_clip_algorithm must be one of {', '.join(CLIP_ALGORITHMS)}, got {algorithm!r}. norm "
            "(Lightning's default) scales the whole gradient down to trainer.gradient_clip_val; value clips each entry."
        )


def check_accelerator(accelerator: Any) -> None:
    """``trainer.accelerator=gpu``, ``cuda`` or ``mps`` on a machine where PyTorch sees no such device, refused by
    name (Lightning's own message, "No supported gpu backend found!", names neither the setting nor the fix)."""
    name = str(accelerator).strip().lower()
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    missing = {"gpu": not (cuda or mps), "cuda": not cuda, "mps": not mps}.get(name, False)
    if missing:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SettingError(
            f"trainer.accelerator={accelerator}, but PyTorch sees no {_DEVICE_KINDS[name]} on this machine "
            f"(torch {torch.__version__}, {build}). Use trainer.accelerator=cpu, or trainer.accelerator=auto to "
            "take a GPU where there is one."
        )


_DEVICE_KINDS = {"gpu": "GPU (CUDA or Apple MPS)", "cuda": "CUDA GPU", "mps": "Apple MPS device"}
SEED_RANGE = (0, 2**32 - 1)  # Lightning's: outside it, seed_everything only warns and draws a random seed


def check_seed(seed: Any) -> int:
    """``seed`` as the integer every entry point seeds with; refused by name unless an integer in ``SEED_RANGE``
    (Lightning would fail on ``seed=abc`` with a bare ``int()`` error and replace ``seed=-1`` by a random seed)."""
    low, high = SEED_RANGE
    if not (_count(seed) and low <= seed <= high):
        raise SettingError(
            f"seed must be an integer from {low} to {high}, got {seed!r}. Pass e.g. seed=0; several seeds run as a "
            "multirun: -m seed=0,1,2."
        )
    return int(seed)
