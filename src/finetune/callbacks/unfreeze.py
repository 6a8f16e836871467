"""The backbone frozen for the first ``epoch`` epochs of a fit, then trained: ``+callbacks=unfreeze`` (LP-FT).

The optimizer holds the backbone's groups (``backbone``, or one per block with ``model.groups.layer_decay``) and the
head's from the first step. Until the epoch, the backbone is frozen in every way that matters:

- its gradients are dropped before each optimizer step, so the optimizer never touches it (no update, no weight
  decay, no momentum or Adam state: that state starts at the unfreeze epoch, as for a group added then) while the
  head's optimizer state carries on unbroken;
- its learning rates read 0 (re-asserted before every batch, whatever a scheduler writes), and at the unfreeze
  epoch each becomes the head's rate times its ``lr_scale`` / the head's: the rate a run without freezing has then,
  since every group's rate is its ``lr_scale`` times the schedule's (``FineTuneModule.lr_scheduler_step``);
- its BatchNorm layers stay in eval mode, so their running statistics do not move (``FineTuneModule.train``, while
  ``backbone_frozen``: this callback sets the module's ``frozen_epochs``).

Why not ``requires_grad=False`` until the epoch (or Lightning's ``BaseFinetuning``, which adds the group then)?
Under DDP, parameters that did not require grad when DDP wrapped the model are left out of its gradient sync
for good: after the unfreeze every rank would train its own backbone. And a checkpoint written before the unfreeze
would hold other optimizer groups than one written after, which ``check_resumable`` refuses. The price is the
backbone's backward pass during the frozen epochs, unless those epochs train on cached features
(``features=cached``: see :mod:`finetune.features`).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from finetune.checks import check_int
from finetune.errors import SettingError
from finetune.param_groups import is_head_group

log = logging.getLogger(__name__)


class BackboneUnfreeze(pl.Callback):
    """Keeps the backbone's optimizer groups frozen for the first ``epoch`` epochs (see the module docstring)."""

    def __init__(self, epoch: int) -> None:
        check_int("callbacks.unfreeze.epoch", epoch, 1, "the epochs the backbone stays frozen before it trains")
        self.epoch = epoch

    @staticmethod
    def check_settings(node: DictConfig, cfg: DictConfig) -> None:
        """The backbone must be trainable (``model.freeze=none``) and get at least one epoch to train."""
        freeze = cfg.model.get("freeze") if cfg.get("model") else None
        if freeze not in (None, "none"):
            raise SettingError(
                f"callbacks.unfreeze needs model.freeze=none (got {freeze!r}): a backbone frozen for the whole run "
                "never unfreezes."
            )
        epochs, epoch = cfg.trainer.get("max_epochs"), node.get("epoch")
        if isinstance(epoch, int) and isinstance(epochs, int) and epochs >= 0 and epoch >= epochs:
            if not cfg.trainer.get("fast_dev_run"):
                raise SettingError(
                    f"callbacks.unfreeze.epoch={epoch} is not below trainer.max_epochs={epochs}: the backbone would "
                    f"never train. Use an epoch < {epochs}, raise trainer.max_epochs, or experiment=frozen to train "
                    "the head only."
                )

    def frozen(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self.epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.frozen_epochs = self.epoch

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.frozen_epochs = 0  # outside a fit (testing, say) the model is the whole network

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            head, backbone = _groups(optimizer)
            for group in backbone:
                if self.frozen(trainer):
                    group["lr"] = 0.0
                elif trainer.current_epoch == self.epoch:
                    group["lr"] = head["lr"] / head.get("lr_scale", 1.0) * group.get("lr_scale", 1.0)
            if trainer.current_epoch == self.epoch and backbone:
                log.info("Epoch %d: the backbone unfreezes at lr %.3g", self.epoch, backbone[0]["lr"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.frozen(trainer):
            for optimizer in trainer.optimizers:
                for group in _groups(optimizer)[1]:
                    group["lr"] = 0.0  # a step-wise scheduler may have written a rate

    def on_before_optimizer_step(self, trainer, pl_module, optimizer: torch.optim.Optimizer) -> None:
        if self.frozen(trainer):
            for group in _groups(optimizer)[1]:
                for param in group["params"]:
                    param.grad = None  # the optimizer skips a parameter without a gradient altogether


def _groups(optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """A ``head`` group (``head``, or ``head.no_decay``: :func:`~finetune.param_groups.is_head_group`) and the
    backbone's groups (every other one: ``backbone``, or ``layer.<i>`` with ``model.groups.layer_decay``)."""
    head = [g for g in optimizer.param_groups if is_head_group(g)]
    backbone = [g for g in optimizer.param_groups if not is_head_group(g)]
    if not head or not backbone:
        names = [g.get("name") for g in optimizer.param_groups]
        raise RuntimeError(f"callbacks.unfreeze needs a 'head' group and the backbone's groups, got {names}.")
    return head[0], backbone
