"""Guards around a run that the research code should not have to read: torch.compile's fallback, out-of-memory advice.

- :func:`compile_network`: ``model.compile=true`` compiles the module's ``net`` in place (``nn.Module.compile``: the
  state_dict keys stay those of ``net``, so checkpoints load uncompiled). Where torch.compile is refused at once, or
  fails on the first steps (compiling is lazy), the run says so once and runs eagerly.
- :class:`OutOfMemoryAdvice`: a device out-of-memory error gets, once, the batch size and the settings that need
  less memory appended to its message (which ``results.json`` records).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from finetune.harness.private import COMPILE_ERRORS, run_eagerly

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
