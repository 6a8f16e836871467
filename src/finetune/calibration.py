"""Temperature scaling (Guo et al., 2017): one scalar T > 0 fitted on validation so that softmax(logits / T) is
calibrated; the argmax, and so the accuracy, never changes.

T is fitted by LBFGS on the mean NLL of the validation logits, as ``log T`` (so T stays positive). The model divides
its logits by ``temperature`` at inference (:class:`finetune.module.FineTuneModule`); checkpoints keep it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchmetrics.functional.classification import multiclass_calibration_error

from finetune.errors import UserError
from finetune.metrics import ECE_BINS
from finetune.workers import ordered_loader


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
    """The model's uncalibrated logits (temperature 1, eval mode) and the targets of every item of ``dataset``."""
    loader = ordered_loader(dataset, batch_size, num_workers)
    was_training, temperature = model.training, model.temperature
    model.eval()
    model.temperature = 1.0
    logits, targets = [], []
    try:
        with torch.random.fork_rng(devices=[]):  # the run's random stream is left as it was
            for inputs, labels in loader:
                logits.append(model(inputs.to(model.device)).float().cpu())
                targets.append(labels.long())
    finally:
        model.train(was_training)
        model.temperature = temperature
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)
