"""NHWC tensors for the network's weights and image batches: ``+callbacks=channels_last``.

Faster convolutions on CPUs (oneDNN) and tensor-core GPUs; the numbers are the same up to rounding.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


class ChannelsLast(pl.Callback):
    recipe = False  # how the network runs, not what it computes: a resume may add or drop it

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def _convert(self, batch: Any) -> None:
        if isinstance(batch, list) and getattr(batch[0], "ndim", 0) == 4:
            batch[0] = batch[0].contiguous(memory_format=torch.channels_last)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._convert(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        self._convert(batch)

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._convert(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        self._convert(batch)
