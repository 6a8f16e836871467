"""What a model's recipe does over the course of a fit: unfreeze the backbone at an epoch, average the weights.

:class:`FineTuneModule` returns these callbacks from ``configure_callbacks`` (from ``model.unfreeze_at_epoch`` and
``model.ema_decay``), so they act wherever the model is fit, and their state travels in its checkpoints.

**Unfreezing** (:class:`BackboneUnfreeze`). The optimizer holds both groups from the first step: ``backbone`` and
``head``, whatever ``model.head_lr_mult``. Until the epoch, the backbone is frozen in every way that matters:

- its gradients are dropped before each optimizer step, so the optimizer never touches it (no update, no weight
  decay, no momentum or Adam state: that state starts at the unfreeze epoch, as for a group added then) while the
  head's optimizer state carries on unbroken;
- its learning rate reads 0 (re-asserted before every batch, whatever a scheduler writes), and at the unfreeze epoch
  it becomes the head's rate times ``lr_scale`` backbone / head: the rate a run without freezing has then, since
  every scheduler in ``conf/scheduler`` scales all groups alike;
- its BatchNorm layers stay in eval mode, so their running statistics do not move (``FineTuneModule.train``).

Why not ``requires_grad=False`` until the epoch (or Lightning's ``BaseFinetuning``, which adds the group then)?
Under DDP, parameters that did not require grad when DDP wrapped the model are left out of its gradient sync
for good: after the unfreeze every rank would train its own backbone. And a checkpoint written before the unfreeze
would hold other optimizer groups than one written after, which ``check_resumable`` refuses. The price is the
backbone's backward pass during the frozen epochs, unless those epochs train on cached features
(``model.cache_features=true``: see :mod:`finetune.features`).

**EMA** (:class:`WeightAverage`). An exponential moving average of every weight and BatchNorm statistic
(``torch.optim.swa_utils.AveragedModel``), updated after every optimizer step with the decay
``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (the warm-up of TensorFlow's and timm's EMA: without it
a run of a few hundred steps would average mostly its initial weights). Validation and test use the average, so the
best checkpoint is chosen on it; every checkpoint's ``state_dict`` holds the average (what ``finetune.evaluate``
and ``trainer.test(ckpt_path=...)`` load), and the weights being trained travel beside it for resuming.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)


class BackboneUnfreeze(pl.Callback):
    """Keeps the ``backbone`` optimizer group frozen for the first ``epoch`` epochs (see the module docstring)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def frozen(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self.epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            backbone, head = _groups(optimizer)
            if self.frozen(trainer):
                backbone["lr"] = 0.0
            elif trainer.current_epoch == self.epoch:
                backbone["lr"] = head["lr"] * backbone.get("lr_scale", 1.0) / head.get("lr_scale", 1.0)
                log.info("Epoch %d: the backbone unfreezes at lr %.3g", self.epoch, backbone["lr"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.frozen(trainer):
            for optimizer in trainer.optimizers:
                _groups(optimizer)[0]["lr"] = 0.0  # a step-wise scheduler may have written a rate

    def on_before_optimizer_step(self, trainer, pl_module, optimizer: torch.optim.Optimizer) -> None:
        if self.frozen(trainer):
            for param in _groups(optimizer)[0]["params"]:
                param.grad = None  # the optimizer skips a parameter without a gradient altogether


def _groups(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    groups = {group.get("name"): group for group in optimizer.param_groups}
    if "backbone" not in groups or "head" not in groups:
        raise RuntimeError(
            f"model.unfreeze_at_epoch needs optimizer groups named 'backbone' and 'head', got {list(groups)}."
        )
    return groups["backbone"], groups["head"]


def ema_multi_avg_fn(decay: float):
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


class WeightAverage(pl.Callback):
    """An EMA of ``pl_module.net`` used for validation, test and the saved checkpoints (see the module docstring)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.average: AveragedModel | None = None
        self._last_step: int | None = None
        self._live: dict[str, torch.Tensor] | None = None
        self._pending: dict[str, Any] | None = None

    # --- keeping the average ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.average is None:
            self.average = AveragedModel(pl_module.net, multi_avg_fn=ema_multi_avg_fn(self.decay), use_buffers=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.average.to(pl_module.device)
        if self._pending is not None:
            self.average.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._last_step:  # an optimizer step happened (not an accumulation batch)
            self._last_step = trainer.global_step
            self.average.update_parameters(pl_module.net)

    @property
    def updates(self) -> int:
        return 0 if self.average is None else int(self.average.n_averaged)

    # --- using it -----------------------------------------------------------------------------------------------
    def swap_in(self, pl_module: pl.LightningModule) -> None:
        """Put the average into ``pl_module.net``, keeping the weights being trained aside."""
        if self.updates and self._live is None:
            self._live = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
            pl_module.net.load_state_dict(self.average.module.state_dict())

    def swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._live is not None:
            pl_module.net.load_state_dict(self._live)
            self._live = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_out(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a checkpoint's weights are the average already
            self.swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_out(pl_module)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("average") is not None:
            self._pending = state_dict["average"]  # loaded at on_fit_start, once the average exists on its device

    def write_average(self, checkpoint: dict[str, Any], prefix: str = "net.") -> None:
        """Make ``checkpoint["state_dict"]`` the average, keeping the trained weights in ``checkpoint["ema"]``."""
        if not self.updates:
            return  # nothing averaged yet: the weights are the average
        weights = checkpoint["state_dict"]
        trained = dict(weights)
        if self._live is not None:  # saved during validation (a stop signal): the average is in the module now
            trained.update({prefix + k: v.clone() for k, v in self._live.items()})
        averaged = {prefix + k: v for k, v in self.average.module.state_dict().items()}
        checkpoint["ema"] = {"decay": self.decay, "updates": self.updates, "trained_state_dict": trained}
        weights.update({k: v.detach().to(weights[k].device).clone() for k, v in averaged.items()})

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Resuming: the module got the average from ``state_dict``; it continues from the weights being trained."""
        ema = checkpoint.get("ema")
        if trainer.state.fn == TrainerFn.FITTING and ema is not None:
            pl_module.load_state_dict(ema["trained_state_dict"])
