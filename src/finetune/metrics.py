"""The test report: per-class precision/recall/F1/support, balanced accuracy and macro-F1, confusion matrix, AUROC,
calibration, the worst images.

:class:`TestMetrics` holds torchmetrics objects that the module updates in ``test_step``; their states are synced
across DDP ranks when computed, so the report counts every test image exactly once whatever the number of processes
(the test loader shards without padding). :func:`report_record` turns the computed report into ``results.json``'s
``test/*`` keys (``finetune.harness.results.write_test_report`` also draws ``confusion_matrix.png`` and
``top_losses.png``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, IterableDataset, Subset
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat

# The test report's keys in results.json (besides test/acc and test/loss).
TEST_REPORT_KEYS = (
    "test/balanced_acc",
    "test/macro_f1",
    "test/per_class",
    "test/confusion_matrix",
    "test/auroc",
    "test/ece",
    "test/ece_uncalibrated",
    "test/top_losses",
)
ECE_BINS = 15
TOP_LOSSES = 16


class SampleRecords(Metric):
    """Every test sample's dataset index, true class, predicted class, its probability and its loss (cat states)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("index", "target", "predicted", "probability", "loss"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, loss: torch.Tensor) -> None:
        probability, predicted = probs.max(dim=-1)
        self.index.append(indices.long())
        self.target.append(targets.long())
        self.predicted.append(predicted.long())
        self.probability.append(probability.float())
        self.loss.append(loss.float().clamp_min(0.0))  # rounding can give -1e-8

    def compute(self) -> dict[str, torch.Tensor]:
        names = ("index", "target", "predicted", "probability", "loss")
        if isinstance(self.index, list) and not self.index:  # no sample (after a DDP sync: one tensor per state)
            return {name: torch.empty(0) for name in names}
        return {name: dim_zero_cat(getattr(self, name)).cpu() for name in names}


class TestMetrics(nn.Module):
    """The test report's metric objects; ``update`` per batch, ``compute`` once (synced), then ``reset``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.precision = MulticlassPrecision(num_classes, average=None, zero_division=0)
        self.recall = MulticlassRecall(num_classes, average=None, zero_division=0)
        self.f1 = MulticlassF1Score(num_classes, average=None, zero_division=0)
        self.auroc = MulticlassAUROC(num_classes, average=None, thresholds=None)
        self.ece = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1")
        self.ece_uncalibrated = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1")
        self.samples = SampleRecords()

    def metrics(self) -> list[Metric]:
        return [self.confusion, self.precision, self.recall, self.f1, self.auroc, self.ece, self.ece_uncalibrated,
                self.samples]  # fmt: skip

    def update(
        self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, temperature: float | None = 1.0
    ) -> None:
        """``logits`` as the model scores them (divided by ``temperature``); ECE is also kept for the raw ones
        (``temperature=None``: there are none, e.g. averaged test-time views)."""
        logits = logits.detach().float()
        probs = F.softmax(logits, dim=-1)
        for metric in self.metrics()[:-2]:
            metric.update(probs, targets)
        if temperature is not None:
            self.ece_uncalibrated.update(F.softmax(logits * temperature, dim=-1), targets)
        self.samples.update(probs, targets, indices, F.cross_entropy(logits, targets, reduction="none"))

    def compute(self) -> dict[str, Any]:
        """The report (CPU tensors), identical on every rank: every rank must call it (it gathers)."""
        confusion = self.confusion.compute().cpu()
        support = confusion.sum(dim=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AUROC of a class absent from test: left out of the mean below
            per_class_auroc = self.auroc.compute().cpu()
        present = support > 0
        # One-vs-rest AUROC averaged over the classes that occur in test (for 2 classes: the binary AUROC).
        auroc = per_class_auroc[present].mean().item() if present.any() and len(support) > 1 else math.nan
        recall, f1 = self.recall.compute().cpu(), self.f1.compute().cpu()
        return {
            "confusion": confusion,
            "precision": self.precision.compute().cpu(),
            "recall": recall,
            "f1": f1,
            "support": support,
            # Means over the classes present in test, each class counting once whatever its size: on a 1:9 test
            # split a model that always says the majority has accuracy 0.9 but balanced accuracy 0.5.
            "balanced_acc": recall[present].mean().item() if present.any() else math.nan,
            "macro_f1": f1[present].mean().item() if present.any() else math.nan,
            "auroc": auroc,
            "ece": self.ece.compute().item(),
            "ece_uncalibrated": self.ece_uncalibrated.compute().item()
            if self.ece_uncalibrated.update_called
            else math.nan,
            "samples": self.samples.compute(),
        }

    def reset(self) -> None:
        for metric in self.metrics():
            metric.reset()


def batch_indices(dataloader: Any) -> list[list[int]] | None:
    """The dataset indices of each batch this rank's test loader yields (``None`` if they cannot be known)."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    if batch_sampler is None or isinstance(getattr(dataloader, "dataset", None), IterableDataset):
        return None  # a stream (shards) has no sampler to read its order from (its sampler never ends)
    return [list(batch) for batch in batch_sampler]


def report_record(report: dict[str, Any] | None, classes: list[str], dataset: Dataset | None = None) -> dict:
    """``results.json``'s ``test/*`` report keys (``None`` values when there was no test)."""
    if report is None:
        return dict.fromkeys(TEST_REPORT_KEYS)
    per_class = {
        name: {
            "precision": _number(report["precision"][i]),
            "recall": _number(report["recall"][i]),
            "f1": _number(report["f1"][i]),
            "support": int(report["support"][i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "test/balanced_acc": _number(report["balanced_acc"]),
        "test/macro_f1": _number(report["macro_f1"]),
        "test/per_class": per_class,
        "test/confusion_matrix": {
            "classes": list(classes),
            "rows": "true class",
            "columns": "predicted class",
            "matrix": report["confusion"].long().tolist(),
        },
        "test/auroc": _number(report["auroc"]),
        "test/ece": _number(report["ece"]),
        "test/ece_uncalibrated": _number(report["ece_uncalibrated"]),
        "test/top_losses": top_losses(report, classes, dataset),
    }


def top_losses(report: dict[str, Any], classes: list[str], dataset: Dataset | None, k: int = TOP_LOSSES) -> list:
    """The ``k`` test samples with the highest loss, highest first (ties: lower dataset index first)."""
    samples = report["samples"]
    if not len(samples["loss"]):
        return []
    losses = torch.nan_to_num(samples["loss"].double(), nan=math.inf)  # a NaN loss is the worst of all
    order = sorted(range(len(losses)), key=lambda i: (-float(losses[i]), int(samples["index"][i])))
    rows = []
    for i in order[:k]:
        index = int(samples["index"][i])
        rows.append(
            {
                "index": index,
                "path": sample_path(dataset, index),
                "true": classes[int(samples["target"][i])],
                "predicted": classes[int(samples["predicted"][i])],
                "probability": _number(samples["probability"][i]),
                "loss": _number(samples["loss"][i]),
            }
        )
    return rows


def sample_path(dataset: Dataset | None, index: int) -> str | None:
    """The image file behind ``dataset[index]``, when the dataset knows it (``ImageFolder`` and subsets of it)."""
    if dataset is None or index < 0:
        return None
    if isinstance(dataset, Subset):
        return sample_path(dataset.dataset, int(dataset.indices[index]))
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None and index < len(samples) else None


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
