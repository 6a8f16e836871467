"""An exponential moving average of the weights for validation, test and checkpoints: ``+callbacks=ema``.

Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` keeps the average (every weight and BatchNorm
statistic, ``torch.optim.swa_utils.AveragedModel``), swaps it in for validation (so the best checkpoint is chosen on
it), writes it as every checkpoint's ``state_dict`` (what ``finetune.evaluate`` and the test after fitting load) with
the weights being trained beside it for resuming, and leaves it in the model when fitting ends. Ours only adds the
warm-up of TensorFlow's and timm's EMA: the decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))``, without
which a run of a few hundred steps would average mostly its initial weights (Lightning's ``EMAWeightAveraging``
uses ``decay`` from the first step), and a checkpoint saved during validation (a stop signal), when the average is
swapped into the model, keeps the two apart as at any other time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging

from finetune.checks import check_number
from finetune.harness.private import averaged_model


class EMA(WeightAveraging):
    """EMA of the weights with decay ``min(decay, (1 + n) / (10 + n))`` after ``n`` optimizer steps."""

    def __init__(self, decay: float = 0.999) -> None:
        check_number(
            "callbacks.ema.decay", decay, "strictly between 0 and 1", lambda x: 0 < x < 1,
            "It is the weight of the average at each step, e.g. 0.999.",
        )  # fmt: skip
        super().__init__(use_buffers=True, multi_avg_fn=ema_multi_avg_fn(decay))
        self.decay = decay
        self.swapped = False  # the average is in the model (during validation)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self.swapped = averaged_model(self) is not None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self.swapped = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        if not self.swapped:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # Swapped: the model holds the average, and the averaged copy the weights being trained.
        average = averaged_model(self)
        checkpoint["state_dict"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        checkpoint["current_model_state"] = {k: v.detach().clone() for k, v in average.module.state_dict().items()}
        checkpoint["averaging_state"] = {k: v for k, v in average.state_dict().items() if not k.startswith("module.")}


def ema_multi_avg_fn(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """``AveragedModel``'s ``multi_avg_fn``: EMA with the warm-up ``min(decay, (1 + n) / (10 + n))``."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        rate = min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):
            for a, c in zip(averaged, current, strict=True):
                a.lerp_(c, 1.0 - rate)
        else:  # integer buffers (BatchNorm's num_batches_tracked): the latest count
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update
