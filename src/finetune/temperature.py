"""Temperature scaling (Guo et al., 2017): one scalar T > 0 fitted on validation so that softmax(logits / T) is
calibrated; the argmax, and so the accuracy, never changes.

T is fitted by LBFGS on the mean NLL of the validation logits, as ``log T`` (so T stays positive). A checkpoint keeps
it under ``temperature``, and :class:`finetune.scoring.Scorer` divides the logits by it whenever the model is scored.
``finetune.train`` fits it for its best checkpoint after the fit (``calibrate=true``), ``finetune.calibrate`` for a
checkpoint that has none, ``finetune.soup`` for the soup it makes.

A fitted T is applied only when it can be trusted (:func:`calibrate_logits`, what every command that calibrates
uses); otherwise the model keeps T = 1 and the record says why (``temperature_reliable: false``,
``temperature_reason``):

- at least ``MIN_IMAGES`` validation images: on a handful, the NLL is minimised by whatever the few mistakes dictate
  (T near 100 on 4 images, where one confident mistake is a quarter of the data);
- some of them misclassified: with none, the NLL keeps falling as T shrinks, so T is wherever the optimiser stopped;
- inside ``TEMPERATURE_RANGE``, a factor of 20 either way (|log T| <= 3). Trained classifiers fit temperatures within
  a small factor of 1 (above 1 for the usual overconfident networks, Guo et al. 2017; below 1 for underconfident
  recipes such as label smoothing or mixup). T far above 1 turns every probability nearly uniform: the logits carry
  little the validation labels agree with. T far below 1 sharpens scores that are nearly uniform: a barely trained
  model. Neither is a calibration of the model.
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

from finetune.errors import DivergedError, UserError
from finetune.metrics import ECE_BINS
from finetune.scoring import TEMPERATURE
from finetune.workers import ordered_loader

log = logging.getLogger(__name__)
MIN_IMAGES = 20  # fewer validation images: a fitted temperature is not applied
TEMPERATURE_RANGE = (0.05, 20.0)  # outside it (|log T| > 3): not applied, see the module docstring


class EmptyValidationError(UserError, ValueError):
    """A temperature was asked for, but the validation split holds no image."""


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 that minimises ``cross_entropy(logits / T, targets)``, as fitted: degenerate logits give a T near 0
    or a huge one, which :func:`calibrate_logits` refuses to apply. Non-finite logits are refused."""
    if len(targets) == 0:
        raise EmptyValidationError(
            "The temperature is fitted on the validation split, which holds no image: give it images "
            "(data.val_fraction, data.folds) or turn calibration off (calibrate=false)."
        )
    bad = int((~torch.isfinite(logits)).any(dim=-1).sum()) if logits.numel() else 0
    if bad:
        raise DivergedError(
            f"Cannot fit a temperature: the model's logits for {bad} of {len(targets)} validation images are nan or "
            "inf, so its weights are broken (a diverged training run; check the run's results.json) or overflow "
            "their precision. Retrain with a lower optimizer.lr (or trainer.gradient_clip_val=1.0, "
            "trainer.precision=32-true), or skip calibration (calibrate=false)."
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
    return float(log_t.detach().exp())


def unreliable_reason(temperature: float, images: int, mistakes: int) -> str | None:
    """Why a temperature fitted on ``images`` validation images (``mistakes`` of them classified wrong) must not be
    applied, with what to do; ``None`` when it can be."""
    low, high = TEMPERATURE_RANGE
    problems = []
    if images < MIN_IMAGES:
        plural = "s" if images != 1 else ""
        problems.append(
            f"it was fitted on only {images} validation image{plural} (fewer than {MIN_IMAGES}): give the "
            "validation split more images (data.val_fraction)"
        )
    if mistakes == 0:
        problems.append(
            "every validation image is classified right, so the NLL only falls as T shrinks and no temperature is "
            "determined (calibrating needs validation mistakes: more validation images)"
        )
    elif temperature > high or temperature != temperature:  # nan too
        problems.append(
            f"it is above {high:g}: the model is confidently wrong on much of validation, and T this large makes "
            "every probability nearly uniform (train longer, or with a lower optimizer.lr)"
        )
    elif temperature < low:
        problems.append(f"it is below {low:g}: the model's scores are nearly uniform (it has barely trained)")
    return "; ".join(problems) if problems else None


def calibrate_logits(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """The temperature to apply to a model with these validation logits, and the record of the fit.

    ``temperature`` is the fitted T when it can be trusted, else 1 (:func:`unreliable_reason`);
    ``temperature_fitted``, ``temperature_reliable``, ``temperature_reason`` and ``temperature_images`` say what was
    fitted and why it was or was not applied; NLL and ECE before and after are for the applied temperature.
    """
    fitted = fit_temperature(logits, targets)
    mistakes = int((logits.argmax(dim=-1) != targets).sum())
    reason = unreliable_reason(fitted, len(targets), mistakes)
    applied = 1.0 if reason else fitted
    return {
        **calibration_record(logits, targets, applied),
        "temperature_fitted": fitted if math.isfinite(fitted) else None,
        "temperature_reliable": reason is None,
        "temperature_reason": reason,
        "temperature_images": len(targets),
    }


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
) -> dict[str, Any]:
    """Load ``checkpoint``'s weights into ``model``, fit its temperature on validation and store it in
    ``checkpoint`` (the caller writes the file). The record (:func:`calibrate_logits`): ``val/temperature``
    (applied: 1 where the fit cannot be trusted), ``val/temperature_fitted``, ``val/temperature_reliable`` and
    ``val/temperature_reason``, ``val/temperature_images``, and the validation NLL and ECE before
    (``*_uncalibrated``) and after."""
    model.load_state_dict(checkpoint["state_dict"])
    images = getattr(datamodule, "images", datamodule)
    logits, targets = collect_logits(model, validation_dataset(model, datamodule), images.batch_size)
    record = {f"val/{key}": value for key, value in calibrate_logits(logits, targets).items()}
    checkpoint[TEMPERATURE] = record["val/temperature"]
    if record["val/temperature_reliable"]:
        log.info("%s, NLL %.3f -> %.3f", temperature_line(record), record["val/nll_uncalibrated"], record["val/nll"])
    else:
        log.warning(temperature_line(record))
    return record


def temperature_line(record: dict[str, Any]) -> str:
    """What a command that calibrated prints about it: the temperature applied, or why none was."""
    if record.get("val/temperature_reliable", True):
        return (
            f"temperature {record['val/temperature']:.3f}: val ECE {record['val/ece_uncalibrated']:.3f} -> "
            f"{record['val/ece']:.3f}"
        )
    fitted = record.get("val/temperature_fitted")
    fitted = "a nan or infinite T" if fitted is None else f"T={fitted:.4g}"
    return (
        f"temperature not applied (kept 1): {fitted} was fitted on {record.get('val/temperature_images')} validation "
        f"images, and cannot be trusted: {record['val/temperature_reason']}"
    )
