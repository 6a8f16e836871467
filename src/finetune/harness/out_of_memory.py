"""Out-of-memory advice: a device out-of-memory error gets, once, the batch size and the settings that need less
memory appended to its message (which ``results.json`` records).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

OOM_ADVICE = "Out of device memory"


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
        channels_last = any(type(c).__name__ == "ChannelsLast" for c in trainer.callbacks)
        lines = [
            f"{OOM_ADVICE} with a batch of {images} images per device (data.batch_size), precision {precision}, "
            f"channels_last {'on' if channels_last else 'off'}, "
            f"trainer.accumulate_grad_batches={accumulate}. To need less memory:",
            "- a smaller data.batch_size, with trainer.accumulate_grad_batches raised by the same factor to keep "
            f"the batch per optimiser step (e.g. data.batch_size={max((images or 2) // 2, 1)} "
            f"trainer.accumulate_grad_batches={accumulate * 2});",
        ]
        if precision.startswith(("32", "64")):
            lines.append("- trainer.precision=bf16-mixed (or 16-mixed): activations take half the bytes;")
        if not channels_last:
            lines.append("- +callbacks=channels_last (less workspace for convolutions on tensor-core GPUs);")
        lines.append("- a smaller data.image_size, or model.freeze=backbone to train the head only.")
        return "\n".join(lines)
