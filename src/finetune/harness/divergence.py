"""A loss that is ``nan`` or ``inf`` stops the fit at once with a :class:`~finetune.errors.DivergedError` naming
``optimizer.lr``, instead of a run that "completes" on broken weights (:class:`DivergenceStop`)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch

from finetune.errors import DivergedError
from finetune.harness.distributed import any_rank, signal_group
from finetune.harness.private import process_group_timeout

log = logging.getLogger(__name__)


class DivergenceStop(pl.Callback):
    """Fails the fit with a :class:`~finetune.errors.DivergedError` once a loss is not finite (``nan``, ``inf``).

    A diverged run otherwise trains on, validates ``nan``, saves checkpoints of broken weights, gets a temperature
    fitted and tested, and reports ``completed``. Lightning's own means do not fit: ``Trainer(detect_anomaly=True)``
    is autograd's anomaly mode (every step much slower, and its error names a backward function, not the learning
    rate); ``EarlyStopping(check_finite=True)`` looks at one validation metric per epoch and ends the fit as a normal
    stop, which the run then tests and reports as completed.

    - The training loss of every batch: each is read at the end of the *next* batch, by which time the device has
      computed it, so the check never stalls the device queue; the last one of an epoch before validating.
    - ``val/loss`` at the end of each validation (not the sanity check), before the checkpoint callbacks, which
      Lightning runs last, can save the broken weights.

    Under DDP the ranks agree on it (:func:`~finetune.harness.distributed.any_rank`, a CPU all-reduce as for a stop
    signal), so every rank stops at the same batch end instead of one waiting for the others' gradients.
    Not for ``finetune.lr_find``, whose range test drives the loss up on purpose.
    """

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, int, int] | None = None  # (loss, epoch, batch) read at the next check
        self._largest: float | None = None  # the largest training loss of the epoch so far, for the message
        self._group: Any = None  # where the DDP ranks agree (None: the default group, under gloo)
        self._agree = False  # several processes: they decide together

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and not self._agree:
            self._group = signal_group(process_group_timeout(trainer.strategy))  # a collective: every rank, once
            self._agree = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._largest = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        previous = self._pending
        if isinstance(loss, torch.Tensor):
            self._pending = (loss.detach(), trainer.current_epoch, batch_idx)
        else:
            self._pending = None  # a skipped batch (training_step returned None): nothing to check
        self._check_training_loss(trainer, pl_module, previous)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._flush(trainer, pl_module)  # the epoch's last batch, before validating its weights

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is None or math.isfinite(float(value)):
            return  # the same on every rank: val/loss is synced over them
        largest = self._largest
        before = f" (its largest training loss: {largest:.4g})" if largest is not None else ""
        raise DivergedError(
            f"Training diverged: val/loss is {float(value)} after epoch {trainer.current_epoch + 1}{before}. "
            f"{divergence_advice(trainer, pl_module)}"
        )

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        previous, self._pending = self._pending, None
        self._check_training_loss(trainer, pl_module, previous)

    def _check_training_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: tuple[torch.Tensor, int, int] | None
    ) -> None:
        value = float(pending[0]) if pending is not None else 0.0
        diverged = not math.isfinite(value)
        if pending is not None and not diverged:
            self._largest = value if self._largest is None else max(self._largest, value)
        agreed = any_rank(diverged, self._group) if self._agree else diverged
        if not agreed:
            return
        if diverged:
            _, epoch, batch = pending
            where = f"the training loss is {value} in epoch {epoch + 1} (batch {batch + 1})"
        else:
            where = "the training loss of another DDP rank is not finite"
        raise DivergedError(f"Training diverged: {where}. {divergence_advice(trainer, pl_module)}")


def divergence_advice(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
    """The learning rates the run trains with (``optimizer.lr`` and the head's) and what keeps training stable."""
    mult = float(pl_module.hparams.get("head_lr_mult", 1.0)) if hasattr(pl_module, "hparams") else 1.0
    lr = configured_lr(trainer)
    if lr is None:
        rates = "The learning rate (optimizer.lr)"
    elif mult != 1:
        rates = f"optimizer.lr={lr:g} (the head's: {lr * mult:g}, optimizer.lr x model.head_lr_mult={mult:g})"
    else:
        rates = f"optimizer.lr={lr:g}"
    clip = trainer.gradient_clip_val
    clipping = (
        f"a lower trainer.gradient_clip_val (now {clip:g})"
        if clip
        else "clip gradients with trainer.gradient_clip_val=1.0"
    )
    advice = (
        f"{rates} is likely too high for this model and data: lower optimizer.lr (e.g. by 10x; python "
        f"-m finetune.lr_find suggests one), or {clipping}"
    )
    if str(trainer.precision).startswith("16"):
        advice += f", or train in trainer.precision=32-true (float16, {trainer.precision} now, overflows at 65504)"
    return advice + ". The run stopped there: nothing was tested or calibrated."


def configured_lr(trainer: pl.Trainer) -> float | None:
    """``optimizer.lr`` as the run set it: the rate a scheduler started from (``initial_lr``, which the schedule sees
    unscaled), else a group's rate divided by its ``lr_scale`` (the head's is ``optimizer.lr x model.head_lr_mult``)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if "initial_lr" in group:
                return float(group["initial_lr"])
            if group.get("lr") is not None:
                return float(group["lr"]) / float(group.get("lr_scale", 1.0))
    return None
