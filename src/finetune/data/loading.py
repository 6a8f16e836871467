"""Loader settings that follow the machine: worker processes per device, pinned memory on accelerators."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch

AUTO = "auto"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or a batch job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_ranks(trainer: pl.Trainer | None) -> int:
    """Processes on this machine that each start their own loader workers: one per device under DDP.

    ``LOCAL_WORLD_SIZE`` (set by torchrun) wins; otherwise the trainer's devices on this node (``trainer.devices``).
    """
    env = os.environ.get("LOCAL_WORLD_SIZE", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    devices = getattr(trainer, "num_devices", None) if trainer is not None else None
    return devices if isinstance(devices, int) and devices > 0 else 1


def resolve_num_workers(setting: int | str, trainer: pl.Trainer | None = None) -> int:
    """``data.num_workers``: an int as given; ``auto``: the available cores shared among the local ranks (>= 1)."""
    if setting != AUTO:
        return int(setting)
    return max(1, available_cores() // local_ranks(trainer))


def pin_memory(trainer: pl.Trainer | None = None) -> bool:
    """Pin host batches when they go to a CUDA device (page-locked memory: faster, asynchronous copies)."""
    if trainer is not None:
        try:
            return trainer.strategy.root_device.type == "cuda"
        except (AttributeError, RuntimeError, IndexError):
            pass
    return torch.cuda.is_available()
