"""Stochastic Weight Averaging: ``+callbacks=swa`` (Lightning's ``StochasticWeightAveraging``, made to fit the recipe).

From epoch ``swa_epoch_start`` on, the rate anneals to ``swa_lrs`` (Lightning's ``SWALR`` replaces the configured
scheduler) and the weights are averaged once per epoch. After the last epoch Lightning runs one more: the average
goes into the model, the BatchNorm statistics are recomputed over the training data without any optimizer step, and
the average is validated and checkpointed (``last.ckpt``, and the best one when it validates best). What this class
changes in Lightning's:

- ``swa_lrs`` is the backbone's SWA rate (the default is ``optimizer.lr``): each group anneals to it times its
  ``lr_scale``, the head at ``model.head_lr_mult`` times it. Lightning's scalar ``swa_lrs`` would give every group
  the same rate; here ``SWALR`` steps through ``FineTuneModule.lr_scheduler_step``, which shows every schedule the
  unscaled rates, so the ratios hold.
- Frozen BatchNorm stays frozen: Lightning resets every BatchNorm layer's statistics (mean 0, variance 1) and
  recomputes them in train mode, but a frozen backbone's layers stay in eval mode (``model.freeze=backbone``,
  ``features=cached``), so they would keep the reset statistics. Here they are left exactly as they were.
- The extra epoch always runs, also for a network without BatchNorm (ViTs, ConvNeXt). Lightning skips it there and
  moves the average into the model only when fitting ends, after the last checkpoint was written: the run would
  test a checkpoint without the average. It costs one pass over the training data (or its cached features) without
  backward.
- The average includes the weights the last epoch trained: Lightning averages at the start of each SWA epoch, so
  its average stops one epoch short. Here: the weights at the start of epoch ``swa_epoch_start`` and at the end of
  every epoch from then on.
- The average is kept on the model's device (Lightning's default is the CPU), and only for ``fit``.
- A checkpoint written mid-SWA resumes with its average and its ``SWALR`` (which the callback restores itself, so
  the checkpoint lists only the schedulers the run configured), and one written before the extra epoch resumes
  into it (checkpoints record the epochs a callback adds: ``finetune.harness.checkpointing.EPOCHS_ADDED``).

The extra epoch is in the run's history (``epochs`` is ``trainer.max_epochs`` + 1): its training loss is that of
the average in train mode, without a step. The test after fitting scores the best checkpoint on validation, as
always: the average when it validates best (``last.ckpt`` always holds it). ``callbacks.ema`` is refused beside it:
both would put their own average into the model.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import StochasticWeightAveraging, WeightAveraging
from torch import nn

from finetune.checks import check_choice, check_int, check_number, configured_callbacks
from finetune.errors import SettingError


class SWA(StochasticWeightAveraging):
    """Lightning's SWA with the head's ratio, frozen BatchNorm and a validated, checkpointed average (see above)."""

    def __init__(
        self,
        swa_lrs: float,
        swa_epoch_start: int | float = 0.8,
        annealing_epochs: int = 1,
        annealing_strategy: str = "cos",
        device: str | None = None,
    ) -> None:
        _check(swa_lrs, swa_epoch_start, annealing_epochs, annealing_strategy)
        super().__init__(
            swa_lrs=float(swa_lrs),
            swa_epoch_start=swa_epoch_start,
            annealing_epochs=annealing_epochs,
            annealing_strategy=annealing_strategy,
            device=device,
        )

    @staticmethod
    def check_settings(node: DictConfig, cfg: DictConfig) -> None:
        """Its numbers, a start inside the run, and no other weight average beside it."""
        start = node.get("swa_epoch_start", 0.8)
        _check(node.get("swa_lrs"), start, node.get("annealing_epochs", 1), node.get("annealing_strategy", "cos"))
        epochs = cfg.trainer.get("max_epochs")
        if isinstance(start, int) and isinstance(epochs, int) and epochs > 0 and start > epochs:
            raise SettingError(
                f"callbacks.swa.swa_epoch_start={start} is after trainer.max_epochs={epochs}: nothing would be "
                f"averaged. Use an epoch from 1 to {epochs}, or a fraction of the run such as 0.8."
            )
        averaging = configured_callbacks(cfg, (WeightAveraging,))
        if averaging:
            raise SettingError(
                f"callbacks.swa cannot be combined with callbacks.{averaging[0]}: each puts its own average of the "
                "weights into the model. Drop one of them."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)  # the copy that becomes the average

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning averages at the start of epochs swa_start..swa_end, which leaves out what the last epoch trained:
        # the extra epoch's start adds it, before the average goes into the model (also when a resume starts there).
        epoch = trainer.current_epoch
        if self._max_epochs != -1 and epoch == self.swa_end + 1 and self.swa_start <= self._latest_update_epoch < epoch:
            if self.n_averaged is None:
                self.n_averaged = torch.tensor(self._init_n_averaged, dtype=torch.long, device=pl_module.device)
            self._average_model = self._average_model.to(self._device or pl_module.device)
            self.update_parameters(self._average_model, pl_module, self.n_averaged, self._avg_fn)
            self._latest_update_epoch = epoch
        super().on_train_epoch_start(trainer, pl_module)

    def pl_module_contains_batch_norm(self, pl_module: pl.LightningModule) -> bool:  # type: ignore[override]
        """Lightning runs its extra epoch (average in, BatchNorm recomputed, validated, checkpointed) only for a
        model with BatchNorm; here always, so that the average is validated and checkpointed in every case."""
        return True

    def reset_batch_norm_and_save_state(self, pl_module: pl.LightningModule) -> None:
        """Lightning's reset before the BatchNorm pass, for the layers that the pass updates: not frozen ones."""
        frozen = frozen_batchnorms(pl_module)
        self.momenta = {}
        for module in pl_module.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module in frozen:
                continue
            module.running_mean = torch.zeros_like(module.running_mean)
            module.running_var = torch.ones_like(module.running_var)
            self.momenta[module] = module.momentum
            module.momentum = None  # a cumulative average over the pass
            module.num_batches_tracked *= 0

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        # Lightning appends SWALR to the trainer's schedulers when the module has none; this callback restores
        # SWALR from its own state on resume, so the checkpoint lists the schedulers the module configured.
        if getattr(pl_module, "scheduler_config", None) is None and self._swa_scheduler is not None:
            checkpoint["lr_schedulers"] = []


def frozen_batchnorms(pl_module: pl.LightningModule) -> set[nn.Module]:
    """The BatchNorm layers frozen now (``FineTuneModule.frozen_batchnorms`` while its backbone is frozen, or
    always with ``model.batchnorm=frozen``)."""
    if not getattr(pl_module, "batchnorm_frozen", False):
        return set()
    return set(pl_module.frozen_batchnorms())


def _check(swa_lrs: Any, start: Any, annealing_epochs: Any, strategy: Any) -> None:
    check_number(
        "callbacks.swa.swa_lrs", swa_lrs, "> 0", lambda x: x > 0,
        "It is the backbone's rate during SWA (the head's is model.head_lr_mult times it), e.g. optimizer.lr.",
    )  # fmt: skip
    if isinstance(start, float):
        check_number(
            "callbacks.swa.swa_epoch_start", start, "in (0, 1] as a fraction of the run", lambda x: 0 < x <= 1,
            "0.8 averages the last fifth of the epochs; an integer names the first epoch (from 1).",
        )  # fmt: skip
    else:
        check_int("callbacks.swa.swa_epoch_start", start, 1, "the first averaged epoch, from 1; or a fraction")
    check_int("callbacks.swa.annealing_epochs", annealing_epochs, 0, "epochs to anneal to swa_lrs")
    check_choice("callbacks.swa.annealing_strategy", strategy, ("cos", "linear"), "how the rate anneals")
