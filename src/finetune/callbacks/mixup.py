"""MixUp and CutMix of training batches: ``+callbacks=mixup`` (``callbacks.mixup.mixup_alpha``, ``cutmix_alpha``).

torchvision's batch ``v2.MixUp`` / ``v2.CutMix`` (one of the two per batch when both are on) turn each training
batch and its labels into mixed images and soft targets, on the device, after the transfer; the criterion takes the
soft targets (``torch.nn.CrossEntropyLoss`` does) and the training accuracy counts the larger share. Validation and
test batches are never mixed. Lightning hands this hook the very batch object that ``training_step`` receives, so the
mix is written into it.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torchvision.transforms import v2

from finetune.checks import check_number
from finetune.errors import SettingError


class MixUpCutMix(pl.Callback):
    """Mixes every training batch: ``mixup_alpha`` / ``cutmix_alpha`` > 0 is the Beta(alpha, alpha) of the share."""

    def __init__(self, mixup_alpha: float = 0.2, cutmix_alpha: float = 0.0) -> None:
        advice = (
            "It is the Beta(alpha, alpha) of the mixing share (0: off; 0.2 for mixup and 1.0 for cutmix are usual)."
        )
        check_number("callbacks.mixup.mixup_alpha", mixup_alpha, ">= 0", lambda x: x >= 0, advice)
        check_number("callbacks.mixup.cutmix_alpha", cutmix_alpha, ">= 0", lambda x: x >= 0, advice)
        if not (mixup_alpha or cutmix_alpha):
            raise SettingError(
                "callbacks.mixup has mixup_alpha=0 and cutmix_alpha=0, so it mixes nothing: set one > 0 "
                "(e.g. callbacks.mixup.mixup_alpha=0.2), or drop the callback."
            )
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix: v2.Transform | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        classes = pl_module.hparams.num_classes
        mixes = [v2.MixUp(alpha=self.mixup_alpha, num_classes=classes)] if self.mixup_alpha else []
        mixes += [v2.CutMix(alpha=self.cutmix_alpha, num_classes=classes)] if self.cutmix_alpha else []
        self.mix = v2.RandomChoice(mixes)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if not isinstance(batch, list) or batch[0].ndim != 4:
            raise SettingError(
                "callbacks.mixup mixes batches of images; this run's training batches are "
                f"{'cached features' if batch[0].ndim == 2 else type(batch).__name__}: drop the mixup callback."
            )
        batch[0], batch[1] = self.mix(batch[0], batch[1])  # soft targets: (N, classes) shares of the two images
