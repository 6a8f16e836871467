"""Guards around a run that the research code should not have to read: torch.compile's fallback, out-of-memory advice.

- :func:`compile_network`: ``model.compile=true`` compiles the module's ``net`` in place (``nn.Module.compile``: the
  state_dict keys stay those of ``net``, so checkpoints load uncompiled). Where torch.compile is refused at once, or
  fails on the first steps (compiling is lazy), the run says so once and runs eagerly.
- :class:`OutOfMemoryAdvice`: a device out-of-memory error gets, once, the batch size and the settings that need
  less memory appended to its message (which ``results.json`` records).
- :class:`DivergenceStop`: a training or validation loss that is ``nan`` or ``inf`` stops the fit at once with a
  :class:`~finetune.errors.DivergedError` naming ``optimizer.lr``, instead of a run that "completes" on broken weights.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from finetune.errors import DivergedError
from finetune.harness.distributed import any_rank, signal_group
from finetune.harness.private import COMPILE_ERRORS, process_group_timeout, run_eagerly

log = logging.getLogger(__name__)

OOM_ADVICE = "Out of device memory"


class CompiledNet:
    """Calls ``net`` compiled; on the first compile failure, undoes the compile, says so once and calls it eagerly."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.compiled = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.net(images)
        try:
            return self.net(images)
        except COMPILE_ERRORS as err:
            self.fall_back(err)
            return self.net(images)

    def fall_back(self, err: BaseException) -> None:
        run_eagerly(self.net)
        self.compiled = False
        _say_uncompiled(err)


def compile_network(model: Any) -> bool:
    """Compile ``model.net`` and make the model call it through :class:`CompiledNet`; False where it runs eagerly."""
    if model.input_mode == "features":
        log.info("model.compile=true with model.cache_features=true: the backbone runs once per split, uncompiled.")
        return False
    try:
        model.net.compile()
    except Exception as err:  # noqa: BLE001 - e.g. "Dynamo is not supported on Python 3.x", or Windows
        run_eagerly(model.net)
        _say_uncompiled(err)
        return False
    model.net_runner = CompiledNet(model.net)
    return True


def _say_uncompiled(err: BaseException) -> None:
    text = str(err).strip()
    log.warning(
        "model.compile=true, but torch.compile fails here (%s: %s); running uncompiled. Set model.compile=false "
        "to silence this.",
        type(err).__name__,
        text.splitlines()[0][:300] if text else "",
    )


class OutOfMemoryAdvice(pl.Callback):
    """Appends what to change to a device out-of-memory error's message, once, whichever step raised it."""

    def __init__(self) -> None:
        self.batch_images: int | None = None  # the last batch's size, for the advice

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.batch_images = len(batch[0])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, torch.OutOfMemoryError) and OOM_ADVICE not in str(exception):
            # The same exception object is re-raised by Lightning after the callbacks: amend its message in place.
            exception.args = (f"{exception}\n\n{self.advice(trainer, pl_module)}", *exception.args[1:])

    def advice(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        images = self.batch_images
        precision = str(trainer.precision)
        accumulate = trainer.accumulate_grad_batches
        channels_last = bool(pl_module.hparams.get("channels_last", False))
        lines = [
            f"{OOM_ADVICE} with a batch of {images} images per device (data.batch_size), precision {precision}, "
            f"model.channels_last={str(channels_last).lower()}, "
            f"trainer.accumulate_grad_batches={accumulate}. To need less memory:",
            "- a smaller data.batch_size, with trainer.accumulate_grad_batches raised by the same factor to keep "
            f"the batch per optimiser step (e.g. data.batch_size={max((images or 2) // 2, 1)} "
            f"trainer.accumulate_grad_batches={accumulate * 2});",
        ]
        if precision.startswith(("32", "64")):
            lines.append("- trainer.precision=bf16-mixed (or 16-mixed): activations take half the bytes;")
        if not channels_last:
            lines.append("- model.channels_last=true (less workspace for convolutions on tensor-core GPUs);")
        lines.append("- a smaller data.image_size, or model.freeze=backbone to train the head only.")
        return "\n".join(lines)


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
    mult = float(getattr(pl_module, "head_lr_mult", 1.0))
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
    """``optimizer.lr`` as the run set it: a group's rate before any scheduler changed it, divided by its
    ``lr_scale`` (the head's group is ``optimizer.lr x model.head_lr_mult``)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            rate = group.get("initial_lr", group.get("lr"))
            if rate is not None:
                return float(rate) / float(group.get("lr_scale", 1.0))
    return None
