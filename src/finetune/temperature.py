"""Temperature scaling (Guo et al., 2017): one scalar T > 0 fitted on validation so that softmax(logits / T) is
calibrated; the argmax, and so the accuracy, never changes.

T is fitted by LBFGS on the mean NLL of the validation logits, as ``log T`` (so T stays positive). A checkpoint keeps
it under ``temperature``, and :class:`finetune.scoring.Scorer` divides the logits by it whenever the model is scored.
``finetune.train`` fits it for its best checkpoint after the fit (``calibrate=true``), ``finetune.calibrate`` for a
checkpoint that has none, ``finetune.soup`` for the soup it makes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchmetrics.functional.classification import multiclass_calibration_error

from finetune.errors import UserError
from finetune.metrics import ECE_BINS
from finetune.scoring import TEMPERATURE
from finetune.workers import ordered_loader

log = logging.getLogger(__name__)


class EmptyValidationError(UserError, ValueError):
    """A temperature was asked for, but the validation split holds no image."""


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 that minimises ``cross_entropy(logits / T, targets)``."""
    if len(targets) == 0:
        raise EmptyValidationError(
            "The temperature is fitted on the validation split, which holds no image: give it images "
            "(data.val_fraction, data.folds) or turn calibration off (calibrate=false)."
        )
    logits, targets = logits.detach().double(), targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:  # all-correct, infinitely confident logits
        return 1.0
    return temperature


def calibration_record(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float]:
    """NLL and ECE (15 bins, as the test report) of ``logits`` before and after dividing by ``temperature``."""
    logits, targets = logits.float(), targets.long()
    num_classes = logits.shape[1]

    def ece(scaled: torch.Tensor) -> float:
        probs = scaled.softmax(dim=-1)
        return float(multiclass_calibration_error(probs, targets, num_classes, n_bins=ECE_BINS, norm="l1"))

    return {
        "temperature": temperature,
        "nll_uncalibrated": float(F.cross_entropy(logits, targets)),
        "nll": float(F.cross_entropy(logits / temperature, targets)),
        "ece_uncalibrated": ece(logits),
        "ece": ece(logits / temperature),
    }


@torch.no_grad()
def collect_logits(
    model: Any, dataset: Dataset, batch_size: int, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (eval mode) and the targets of every item of ``dataset``, in order."""
    loader = ordered_loader(dataset, batch_size, num_workers)
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        with torch.random.fork_rng(devices=[]):  # the run's random stream is left as it was
            for inputs, labels in loader:
                logits.append(model(inputs.to(model.device)).float().cpu())
                targets.append(labels.long())
    finally:
        model.train(was_training)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def validation_dataset(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> Any:
    """The whole validation split as the model takes it now: cached features (a frozen cached-feature model) or
    images. Every DDP rank scores all of it, so every rank fits the same temperature."""
    if hasattr(datamodule, "features") and model.backbone_frozen:
        return datamodule.features("val")
    return getattr(datamodule, "images", datamodule).val_set


def calibrate_checkpoint(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, checkpoint: dict[str, Any]
) -> dict[str, float]:
    """Load ``checkpoint``'s weights into ``model``, fit its temperature on validation and store it in
    ``checkpoint`` (the caller writes the file). The record: ``val/temperature`` and the validation NLL and ECE
    before (``*_uncalibrated``) and after."""
    model.load_state_dict(checkpoint["state_dict"])
    images = getattr(datamodule, "images", datamodule)
    logits, targets = collect_logits(model, validation_dataset(model, datamodule), images.batch_size)
    temperature = fit_temperature(logits, targets)
    record = calibration_record(logits, targets, temperature)
    checkpoint[TEMPERATURE] = temperature
    log.info(
        "Temperature %.3f fitted on %d validation images: val ECE %.3f -> %.3f, NLL %.3f -> %.3f",
        temperature,
        len(targets),
        record["ece_uncalibrated"],
        record["ece"],
        record["nll_uncalibrated"],
        record["nll"],
    )
    return {f"val/{key}": value for key, value in record.items()}
