"""What a checkpoint carries besides the weights, so that a resumed run is the uninterrupted one.

- ``RngState``: the random generators (Lightning does not save them), so that one epoch plus a resumed epoch draws
  the same shuffles and augmentations as two epochs straight.
- ``EpochHistory``: the per-epoch metrics that ``results.json`` reports, carried through resumes.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

HISTORY_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")


class RngState(pl.Callback):
    """Saves the torch, numpy and python random generators in each checkpoint and restores them on resume.

    Restored when the checkpoint is loaded, i.e. before the resumed run creates its first data-loader iterator,
    the same point at which the uninterrupted run goes on drawing. Under several processes only rank 0's state is
    in the checkpoint, so there each rank keeps its freshly seeded generators instead.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                log.info("Several processes: random generators are seeded afresh, not restored from the checkpoint.")
                return
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


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
