"""Checkpoints a run can be continued from: an up-to-date ``last.ckpt``, and ``interrupted.ckpt`` on a stop.

- ``AtomicCheckpointIO``: every checkpoint Lightning saves (``last.ckpt``, the best, ``interrupted.ckpt``,
  ``trainer.save_checkpoint``) appears whole or not at all, and a full disk is one :class:`DiskFullError`.

- ``ResumableModelCheckpoint``: Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` after every epoch (2.6
  only does when the best one changes) and keeps its best-so-far when a resumed run writes to a new folder
  (Lightning forgets it when the folder changes); the earlier run's files are never deleted.
- ``InterruptCheckpoint``: Ctrl+C, SIGTERM (Lightning stops at the end of the batch) or a crash while fitting
  saves ``checkpoints/interrupted.ckpt``; under DDP only a stop that every rank agreed on does (``SignalStop``);
  never a diverged fit's non-finite weights (``DivergenceStop``).
- ``CheckpointRecord``: what every checkpoint carries beside the weights: the class names and the eval
  preprocessing of its data (what evaluate, predict and export rely on), the optimizer's class and the recipe's
  components (what a resume checks) and the format version.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from finetune import atomic
from finetune.data.transforms import CLASSES, PREPROCESSING
from finetune.errors import DivergedError
from finetune.harness.distributed import StopRequested
from finetune.harness.run_folder import RunFolder

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on a local disk: :func:`finetune.atomic.torch_save`.

    Lightning's own "atomic" save writes the file to the system's temporary folder and then *copies* it to the
    checkpoint's folder when that is another file system: a full disk leaves a truncated ``last.ckpt`` under its
    final name, over the previous good one. Here the temporary file is in the checkpoint's own folder and renamed
    over the final name once complete. Remote URLs (``s3://``) keep Lightning's writer (object stores are atomic).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic.torch_save(checkpoint, path)


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Give ``trainer``'s strategy :class:`AtomicCheckpointIO` where it would use Lightning's plain writer.

    Set on the strategy after the Trainer is built, so it holds for every strategy that saves through a
    ``TorchCheckpointIO`` (single device, DDP and its spawn variants: rank 0 writes) whatever the precision plugin;
    a checkpoint IO the config chose (``trainer.plugins``, a strategy's own, XLA's, an async wrapper) stays.
    """
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class ResumableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with an up-to-date ``last.ckpt`` and a ranking that survives a resume into a new folder.

    Lightning keeps only ``best_model_path`` when the checkpoint folder changed, so the resumed run would call its
    first epoch "best" even when the earlier run did better. Here the earlier scores stay in the ranking; files
    outside this run's folder are never deleted (Lightning's own ``_should_remove_checkpoint`` rule).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        # Lightning 2.6 writes last.ckpt only when a top-k checkpoint is saved at the same step, so with save_top_k=1
        # last.ckpt is a copy of the best one; resuming needs the latest epoch.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)


class InterruptCheckpoint(pl.Callback):
    """Saves ``checkpoints/interrupted.ckpt`` when fitting stops on an exception, once training has made progress.

    A plain callback, not one of Lightning's ``Checkpoint`` kind: those take part in resolving ``ckpt_path`` and
    make Lightning warn about a second checkpoint callback. A failure to save is logged, never raised: it must
    not hide the error that stopped the run.

    Under DDP saving is a collective (rank 0 writes, every rank waits for it), so it only happens on the
    :class:`~finetune.harness.distributed.StopRequested` that every rank raises at the same point; after an error on
    some ranks the others may be gone or elsewhere, and ``last.ckpt`` is the state to resume from.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.ckpt_path = str(RunFolder(Path(run_dir)).interrupted_checkpoint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # nothing trained yet (or interrupted while testing): last.ckpt, if any, is the state to keep
        if isinstance(exception, DivergedError):
            return  # the weights are nan or inf now: last.ckpt, if any, holds the last finite ones
        if atomic.is_disk_full(exception):
            log.warning("Not saving %s: the disk is full (the checkpoints saved before are kept).", self.ckpt_path)
            return
        if trainer.world_size > 1 and not isinstance(exception, StopRequested):
            log.warning("Not saving %s: under DDP only a stop that every rank reached together can", self.ckpt_path)
            return
        try:
            # The whole training state (optimizer, loops, callbacks), to resume from. Lightning's ``weights_only`` here
            # means "save the weights alone"; left unset it logs "`weights_only` was not set, defaulting to
            # `False`", which reads as if checkpoints were *read* unsafely (they are read with torch.load's
            # weights_only=True: finetune.harness.checkpoint_io).
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            log.warning("Fitting stopped (%s): saved %s", type(exception).__name__, self.ckpt_path)
        except Exception as err:  # noqa: BLE001 - keep the original exception visible
            log.error("Could not save %s after %s: %s", self.ckpt_path, type(exception).__name__, err)


# The version of what a checkpoint holds: checkpoints of another version are refused for resuming (and, without the
# class names and preprocessing records, for scoring), with a message that says so.
FORMAT_KEY = "finetune_format"
FORMAT = 2
RECIPE = "recipe"
# Epochs a callback adds to trainer.max_epochs (SWA's BatchNorm epoch): a resume before them has work left.
EPOCHS_ADDED = "epochs_added"


def recipe(cfg: DictConfig) -> dict[str, Any]:
    """What shapes a fit besides the model's hyper-parameters: the loss, the feature cache, the scheduler's stepping,
    and the recipe's callbacks (those of ``finetune.callbacks`` that change what is computed) with their settings."""
    callbacks = cfg.get("callbacks") or {}
    ours = {name: node for name, node in callbacks.items() if node and _changes_the_result(node)}
    scheduler = cfg.get("scheduler") or {}
    found = {
        "model.criterion": cfg.model.get("criterion") if cfg.get("model") else None,
        "features": cfg.get("features"),
        "scheduler.interval": scheduler.get("interval"),
        **{f"callbacks.{name}": node for name, node in ours.items()},
    }
    return {key: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for key, v in found.items()}


def _changes_the_result(node: DictConfig) -> bool:
    """A callback of ``finetune.callbacks`` whose class does not say ``recipe = False`` (compile, channels-last:
    how the network runs, not what it computes)."""
    module, _, name = str(node.get("_target_", "")).rpartition(".")
    if not module.startswith("finetune.callbacks"):
        return False
    return getattr(getattr(importlib.import_module(module), name, None), "recipe", True)


class CheckpointRecord(pl.Callback):
    """Writes into every checkpoint the data it was fitted on (class names in output order, eval preprocessing),
    the optimizer's class, the run's :func:`recipe`, the epochs a callback added to the fit (:data:`EPOCHS_ADDED`)
    and :data:`FORMAT`."""

    def __init__(self, cfg: DictConfig | None = None) -> None:
        self.recipe = recipe(cfg) if cfg is not None else None
        self.max_epochs = cfg.trainer.get("max_epochs") if cfg is not None and cfg.get("trainer") else None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        images = getattr(trainer.datamodule, "images", trainer.datamodule)  # the image data behind a feature cache
        if images is not None and getattr(images, "classes", None):
            checkpoint[CLASSES] = list(images.classes)
            checkpoint[PREPROCESSING] = images.preprocessing.to_dict()
        if trainer.optimizers:
            optimizer = type(trainer.optimizers[0])
            checkpoint["optimizer_class"] = f"{optimizer.__module__}.{optimizer.__qualname__}"
        if self.recipe is not None:
            checkpoint[RECIPE] = self.recipe
        if isinstance(self.max_epochs, int) and 0 < self.max_epochs < (trainer.max_epochs or 0):
            checkpoint[EPOCHS_ADDED] = trainer.max_epochs - self.max_epochs
        checkpoint[FORMAT_KEY] = FORMAT
