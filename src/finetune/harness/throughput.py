"""Training speed in images per second, for any run (``+callbacks=throughput``) and the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from finetune.harness.results import write_json_atomic


class Throughput(pl.Callback):
    """Training speed in images per second, written to ``throughput.json`` in the run's folder.

    Add it to any run: ``+callbacks=throughput``. Two figures, both global (every DDP rank's images) and both past
    the warm-up epochs (worker start-up, cuDNN autotuning, lazy init):

    - ``images_per_s``: training epochs end to end, data loading included, validation excluded: what a run gets;
    - ``step_images_per_s``: forward + backward + optimizer step only (from batch start to batch end, the device
      synchronised at both): what the model and precision allow when data loading keeps up.
    """

    def __init__(self, warmup_epochs: int = 1, filename: str = "throughput.json") -> None:
        self.warmup_epochs = warmup_epochs
        self.filename = filename
        self.train_seconds = self.step_seconds = 0.0
        self.train_images = self.step_images = self.epochs = 0
        self._epoch_start: float | None = None
        self._epoch_images = 0
        self._batch_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._epoch_images = read_clock(pl_module), 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_start = read_clock(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        now = read_clock(pl_module)
        images = len(batch[0]) * trainer.world_size  # DistributedSampler gives every rank as many samples
        self._epoch_images += images
        if trainer.current_epoch >= self.warmup_epochs:
            self.step_seconds += now - self._batch_start
            self.step_images += images

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(trainer, pl_module)  # validation runs inside the training epoch: stop its clock here

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json_atomic(Path(trainer.default_root_dir) / self.filename, self.summary(trainer, pl_module))

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        device = pl_module.device
        return {
            "images_per_s": self.train_images / self.train_seconds if self.train_seconds else None,
            "step_images_per_s": self.step_images / self.step_seconds if self.step_seconds else None,
            "epochs_measured": self.epochs,
            "train_images": self.train_images,
            "train_seconds": round(self.train_seconds, 3),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        }

    def _close_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is None or trainer.sanity_checking:
            return
        if trainer.current_epoch >= self.warmup_epochs and self._epoch_images:
            self.train_seconds += read_clock(pl_module) - self._epoch_start
            self.train_images += self._epoch_images
            self.epochs += 1
        self._epoch_start = None


def read_clock(pl_module: pl.LightningModule, clock: Callable[[], Any] = time.perf_counter) -> Any:
    """``clock()`` once ``pl_module``'s device has finished its queued work."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)  # CUDA runs ahead of Python: time finished work only
    return clock()
