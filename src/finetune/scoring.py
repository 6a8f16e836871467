"""A trained classifier as it is scored: its logits divided by the temperature fitted on validation, its
probabilities averaged over test-time views, and the test report.

:class:`Scorer` wraps the trained :class:`~finetune.module.FineTuneModule` for ``trainer.test`` and
``trainer.predict``: the test after fitting, ``finetune.evaluate``, ``predict`` and the shift benchmark all score
through it, so temperature and views live here and nowhere in the module being trained.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.metrics import TestMetrics, batch_indices
from finetune.tta import average_views

TEMPERATURE = "temperature"  # the checkpoint key of the fitted temperature


class Scorer(pl.LightningModule):
    """``model``'s logits divided by ``temperature`` (1: uncalibrated); a batch of test-time views ``(N, V, C, H, W)``
    is scored as the mean of the views' calibrated probabilities (:mod:`finetune.tta`)."""

    def __init__(self, model: pl.LightningModule, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        num_classes = model.hparams.num_classes
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_loss = MeanMetric(nan_strategy=math.nan)  # a nan batch makes test/loss nan, not vanish
        self.test_metrics = TestMetrics(num_classes)  # per class, confusion matrix, AUROC, ECE, worst images
        self.report: dict[str, Any] | None = None
        self._batches: list[list[int]] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim == 5:
            return average_views(self.calibrated, inputs)
        return self.calibrated(inputs)

    def calibrated(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        return logits if self.temperature == 1.0 else logits / self.temperature

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self.report = None
        self._batches = batch_indices(self.trainer.test_dataloaders)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        self.test_acc(logits, targets)
        self.test_loss.update(loss.detach(), weight=targets.shape[0])
        # Metric objects: Lightning computes them once per epoch over every sample of every DDP rank.
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, prog_bar=True)
        temperature = self.temperature if inputs.ndim < 5 else None  # averaged views have no raw logits
        self.test_metrics.update(logits, targets, self._sample_indices(batch_idx, len(targets)), temperature)

    def on_test_epoch_end(self) -> None:
        self.report = self.test_metrics.compute()  # synced over DDP ranks: every test image once
        self.test_metrics.reset()

    def _sample_indices(self, batch_idx: int, size: int) -> torch.Tensor:
        """The test set indices of this batch's samples (-1 where the loader's order is unknown)."""
        batches = self._batches
        if batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == size:
            return torch.tensor(batches[batch_idx], dtype=torch.long, device=self.device)
        return torch.full((size,), -1, dtype=torch.long, device=self.device)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(inputs).softmax(dim=-1)
