"""The run's Lightning callbacks: checkpoints a run can be continued from, its history, its speed.

- ``ResumableModelCheckpoint``: Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` after every epoch (2.6
  only does when the best one changes) and keeps its best-so-far when a resumed run writes to a new folder
  (Lightning forgets it when the folder changes); the earlier run's files are never deleted.
- ``InterruptCheckpoint``: Ctrl+C, SIGTERM (Lightning stops at the end of the batch) or a crash while fitting
  saves ``checkpoints/interrupted.ckpt``; under DDP only a stop that every rank agreed on does (``SignalStop``).
- ``SignalStop``: under DDP, SIGTERM or Ctrl+C reaching any one rank stops every rank at the same batch end.
- ``RngState``: the random generators travel in every checkpoint (Lightning does not save them), so that one epoch
  plus a resumed epoch draws the same shuffles and augmentations as two epochs straight.
- ``EpochHistory``: the per-epoch metrics that ``results.json`` reports, carried through resumes.
- ``Throughput``: images per second, written to ``throughput.json``.

What ``resume=RUN_DIR`` means (finding, checking and continuing a run) lives in :mod:`finetune.resume`.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector
from pytorch_lightning.trainer.states import TrainerFn

from finetune.distributed import StopRequested, agree_on_signal, signal_group
from finetune.results import write_json_atomic
from finetune.run_folder import RunFolder

log = logging.getLogger(__name__)

HISTORY_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")


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
    :class:`~finetune.distributed.StopRequested` that every rank raises at the same point; after an error on some
    ranks the others may be gone or elsewhere, and ``last.ckpt`` is the state to resume from.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.ckpt_path = str(RunFolder(Path(run_dir)).interrupted_checkpoint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # nothing trained yet (or interrupted while testing): last.ckpt, if any, is the state to keep
        if trainer.world_size > 1 and not isinstance(exception, StopRequested):
            log.warning("Not saving %s: under DDP only a stop that every rank reached together can", self.ckpt_path)
            return
        try:
            trainer.save_checkpoint(self.ckpt_path)
            log.warning("Fitting stopped (%s): saved %s", type(exception).__name__, self.ckpt_path)
        except Exception as err:  # noqa: BLE001 - keep the original exception visible
            log.error("Could not save %s after %s: %s", self.ckpt_path, type(exception).__name__, err)


class SignalStop(pl.Callback):
    """Under DDP, SIGTERM or Ctrl+C (SIGINT) reaching any one rank stops every rank at the same training batch end.

    Lightning's SIGTERM handler broadcasts from inside the handler: when the signal reaches one rank only (``kill``
    of one process, a node's scheduler), that broadcast meets the other ranks' gradient all-reduce and every rank
    hangs. Here the handler only notes the signal. At the end of every training batch, and at the end of training,
    the ranks all-reduce the signal numbers they noted (:func:`~finetune.distributed.agree_on_signal`) and, if there
    is one, all raise :class:`~finetune.distributed.StopRequested` there: ``InterruptCheckpoint`` saves
    ``interrupted.ckpt`` (every rank is there for the save's barrier), ``train.py`` writes ``results.json`` and every
    rank exits with 128 + the signal (SIGTERM wins over SIGINT). A signal during validation takes effect at the next
    training batch end. A second Ctrl+C on a rank aborts it at once (a KeyboardInterrupt, Lightning's way: the
    other ranks then fail within ``ddp_timeout_s``).

    Only while fitting, and only with several processes: a single process keeps Lightning's handling (Ctrl+C stops
    at once, SIGTERM at the end of the batch), and testing after the fit keeps Lightning's handlers.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._group: Any = None  # where the ranks agree (signal_group): created once, by every rank

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning (re)installs its handlers through the trainer's private signal connector when a stage starts.
        if trainer.world_size > 1 and not isinstance(trainer._signal_connector, _NotingSignalConnector):
            trainer._signal_connector = _NotingSignalConnector(trainer, self)
            self._group = signal_group(getattr(trainer.strategy, "_timeout", None))

    def note(self, signum: int, frame: Any = None) -> None:
        """The signal handler: remember the signal, nothing else (no collective, no I/O but one log line)."""
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt  # a second Ctrl+C: stop waiting for the batch to end
        self.signum = max(self.signum, signum)
        log.warning("Received %s: every rank stops at the next end of a training batch", signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the last validation: do not go on to testing

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        if not isinstance(trainer._signal_connector, _NotingSignalConnector):
            return
        signum = agree_on_signal(self.signum, self._group)
        if signum:
            log.warning("Stopping every rank: a rank received %s", signal.Signals(signum).name)
            raise StopRequested(signum)


class _NotingSignalConnector(_SignalConnector):
    """Lightning's connector (SLURM requeueing, putting the earlier handlers back afterwards), except that while
    fitting SIGTERM and SIGINT only reach :meth:`SignalStop.note`. ``received_sigterm`` stays False, so Lightning's
    loops never stop one rank on their own."""

    def __init__(self, trainer: pl.Trainer, stop: SignalStop) -> None:
        super().__init__(trainer)
        self.stop = stop

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()  # also saves the handlers that teardown() restores
        if self.trainer.state.fn != TrainerFn.FITTING:
            return
        self._register_signal(signal.SIGTERM, self.stop.note)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # nohup or a background job: keep ignoring it
            self._register_signal(signal.SIGINT, self.stop.note)


class RngState(pl.Callback):
    """Saves the torch, numpy and python random generators in each checkpoint and restores them on resume.

    Restored when the checkpoint is loaded, i.e. before the resumed run creates its first data-loader iterator,
    the same point at which the uninterrupted run goes on drawing. Under several processes only rank 0's state is
    in the checkpoint, so there each rank keeps its freshly seeded generators instead.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                log.info("Several processes: random generators are seeded afresh, not restored from the checkpoint.")
                return
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class EpochHistory(pl.Callback):
    """Records ``train/*`` and ``val/*`` epoch metrics, one entry per finished training epoch.

    Kept in the checkpoint, so a resumed run continues its history instead of starting a new one.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        entry: dict[str, float] = {"epoch": trainer.current_epoch}
        for key in HISTORY_KEYS:
            if key in metrics:
                entry[key] = float(metrics[key])
        self.history = [e for e in self.history if e["epoch"] != entry["epoch"]] + [entry]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


class Throughput(pl.Callback):
    """Training speed in images per second, written to ``throughput.json`` in the run's folder.

    Add it to any run: ``+callbacks.throughput._target_=finetune.callbacks.Throughput``. Two figures, both global
    (every DDP rank's images) and both past the warm-up epochs (worker start-up, cuDNN autotuning, lazy init):

    - ``images_per_s``: training epochs end to end, data loading included, validation excluded: what a run gets;
    - ``step_images_per_s``: forward + backward + optimizer step only (from batch start to batch end, the device
      synchronised at both): what the model and precision allow when data loading keeps up.
    """

    def __init__(self, warmup_epochs: int = 1, filename: str = "throughput.json") -> None:
        self.warmup_epochs = warmup_epochs
        self.filename = filename
        self.train_seconds = self.step_seconds = 0.0
        self.train_images = self.step_images = self.epochs = 0
        self._epoch_start: float | None = None
        self._epoch_images = 0
        self._batch_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._epoch_images = _now(pl_module), 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_start = _now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        now = _now(pl_module)
        images = len(batch[0]) * trainer.world_size  # DistributedSampler gives every rank as many samples
        self._epoch_images += images
        if trainer.current_epoch >= self.warmup_epochs:
            self.step_seconds += now - self._batch_start
            self.step_images += images

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(trainer, pl_module)  # validation runs inside the training epoch: stop its clock here

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json_atomic(Path(trainer.default_root_dir) / self.filename, self.summary(trainer, pl_module))

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        device = pl_module.device
        return {
            "images_per_s": self.train_images / self.train_seconds if self.train_seconds else None,
            "step_images_per_s": self.step_images / self.step_seconds if self.step_seconds else None,
            "epochs_measured": self.epochs,
            "train_images": self.train_images,
            "train_seconds": round(self.train_seconds, 3),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        }

    def _close_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is None or trainer.sanity_checking:
            return
        if trainer.current_epoch >= self.warmup_epochs and self._epoch_images:
            self.train_seconds += _now(pl_module) - self._epoch_start
            self.train_images += self._epoch_images
            self.epochs += 1
        self._epoch_start = None


def _now(pl_module: pl.LightningModule) -> float:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)  # CUDA runs ahead of Python: time finished work only
    return time.perf_counter()
