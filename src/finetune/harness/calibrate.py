"""A checkpoint's temperature fitted on the run's validation split and written into the checkpoint file.

``finetune.train`` does this for its best checkpoint after the fit (``calibrate=true``), before the test, so that the
test, ``finetune.evaluate``, ``predict`` and ``export`` all use the calibrated scores; ``python -m finetune.calibrate``
does it for a checkpoint that has none, into a new file; ``finetune.soup`` for its soup. All fit it with
:func:`finetune.calibration.calibrate_logits`, which applies a fitted temperature only where it can be trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from finetune import atomic
from finetune.calibration import calibrate_logits, collect_logits
from finetune.harness.checkpoint import load_checkpoint
from finetune.module import TEMPERATURE

log = logging.getLogger(__name__)


def validation_dataset(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> Any:
    """The whole validation split as the model takes it now: cached features (a frozen cached-feature model) or
    images. Every DDP rank scores all of it, so every rank fits the same temperature."""
    if model.input_mode == "features":
        return datamodule.features("val")
    images = getattr(datamodule, "images", datamodule)
    return images.val_set


def fit_checkpoint_temperature(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    checkpoint_path: Path,
    output: Path,
    write: bool = True,
) -> dict[str, Any]:
    """Load ``checkpoint_path``'s weights into ``model``, fit its temperature on validation, and write the checkpoint
    with it to ``output`` (atomically; ``output`` may be ``checkpoint_path``). ``write=False`` on other DDP ranks.

    The record (:func:`finetune.calibration.calibrate_logits`): ``val/temperature`` (applied: 1 where the fit cannot
    be trusted), ``val/temperature_fitted``, ``val/temperature_reliable`` and ``val/temperature_reason``,
    ``val/temperature_images``, and the validation NLL and ECE before (``*_uncalibrated``) and after.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    model.load_state_dict(checkpoint["state_dict"])
    images = getattr(datamodule, "images", datamodule)
    logits, targets = collect_logits(model, validation_dataset(model, datamodule), images.batch_size)
    record = calibrate_logits(logits, targets)
    temperature = record["temperature"]
    model.temperature = temperature
    if write:
        checkpoint[TEMPERATURE] = temperature
        atomic.torch_save(checkpoint, output)
    if record["temperature_reliable"]:
        log.info(
            "Temperature %.3f fitted on %d validation images: val ECE %.3f -> %.3f, NLL %.3f -> %.3f (%s)",
            temperature,
            len(targets),
            record["ece_uncalibrated"],
            record["ece"],
            record["nll_uncalibrated"],
            record["nll"],
            output,
        )
    else:
        log.warning("%s (%s)", temperature_line({f"val/{key}": value for key, value in record.items()}), output)
    return {f"val/{key}": value for key, value in record.items()}


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
