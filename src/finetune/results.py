"""What a run leaves behind: a per-epoch metrics history and ``results.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

HISTORY_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")


class EpochHistory(pl.Callback):
    """Records ``train/*`` and ``val/*`` epoch metrics, one entry per finished training epoch.

    Kept in the checkpoint, so a resumed run continues its history instead of starting a new one.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        entry: dict[str, float] = {"epoch": trainer.current_epoch}
        for key in HISTORY_KEYS:
            if key in metrics:
                entry[key] = float(metrics[key])
        self.history = [e for e in self.history if e["epoch"] != entry["epoch"]] + [entry]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def to_number(value: Any) -> float | None:
    """A plain float for JSON (tensors included); ``None`` for missing or non-finite values."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
