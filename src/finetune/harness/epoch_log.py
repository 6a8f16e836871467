"""One summary line per epoch in the log, for runs nobody watches in a terminal (``nohup``, SLURM, CI).

Without a TTY the progress bar writes nothing a log keeps, so a 20-epoch run was silent until its final table: one
could not tell epoch 3 from a hang. This callback logs, on global rank 0, after every training epoch::

    epoch 3/20  train/loss 0.4123  val/loss 0.3550  val/acc 0.8600  best val/acc 0.8800  38.2 s  ETA 10m49s

The line goes through :mod:`logging`, so it reaches ``train.log`` and stdout (Hydra's handlers). ``when=auto`` (the
default) logs only when stdout is not a terminal or the progress bar is off; ``always`` and ``never`` force it.

An epoch resumed from its middle (``resume=`` of an interrupted run) gets no ``on_train_epoch_start`` from Lightning:
its line counts from the start of training in this process, says ``resumed mid-epoch``, and is left out of the ETA
(it ran only part of the batches).
"""

from __future__ import annotations

import logging
import math
import sys
import time

import pytorch_lightning as pl

from finetune.errors import SettingError

log = logging.getLogger(__name__)
WHEN = ("auto", "always", "never")


class EpochSummary(pl.Callback):
    """Log one line per epoch: epoch/total, train and val loss, val accuracy, the best so far, seconds, ETA."""

    def __init__(self, when: str = "auto", monitor: str = "val/acc") -> None:
        if when not in WHEN:
            raise SettingError(f"callbacks.epoch_summary.when must be one of {', '.join(WHEN)}, got {when!r}.")
        self.when = when
        self.monitor = monitor
        self.best: float | None = None
        self._epoch_start = time.perf_counter()
        self._whole_epoch = False  # whether Lightning started the current epoch in this process
        self._seconds: list[float] = []

    def active(self, trainer: pl.Trainer) -> bool:
        if self.when != "auto":
            return self.when == "always"
        return not sys.stdout.isatty() or trainer.progress_bar_callback is None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._whole_epoch = time.perf_counter(), False  # until an epoch starts here
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)  # a resumed run ranks against its earlier best
        if score is not None and getattr(checkpoint, "monitor", None) == self.monitor:
            self.best = float(score)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._whole_epoch = time.perf_counter(), True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On every rank, logged on rank 0: reading ``callback_metrics`` first computes the epoch's metrics, which
        under DDP is a collective. Read on rank 0 alone it met another collective on the other ranks (a callback's
        all-reduce after it) and both waited until the process-group timeout."""
        seconds = time.perf_counter() - self._epoch_start
        whole, self._whole_epoch = self._whole_epoch, False
        if whole:
            self._seconds.append(seconds)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        score = metrics.get(self.monitor)
        if score is not None and not math.isnan(score) and (self.best is None or score > self.best):
            self.best = score
        if trainer.is_global_zero and self.active(trainer):
            log.info(self.line(trainer.current_epoch + 1, trainer.max_epochs, metrics, seconds, resumed=not whole))

    def line(
        self, epoch: int, total: int | None, metrics: dict[str, float], seconds: float, resumed: bool = False
    ) -> str:
        """The summary of epoch ``epoch`` (1-based) of ``total`` (None or -1: no limit); ``resumed``: this process
        ran only its last part, in ``seconds``."""
        known = total is not None and total > 0
        parts = [f"epoch {epoch}/{total}" if known else f"epoch {epoch}"]
        parts += [f"{key} {metrics[key]:.4f}" for key in ("train/loss", "val/loss", "val/acc") if key in metrics]
        if self.best is not None:
            parts.append(f"best {self.monitor} {self.best:.4f}")
        parts.append(f"{seconds:.1f} s" + (" (resumed mid-epoch)" if resumed else ""))
        if known and self._seconds:
            recent = self._seconds[-5:]  # the last whole epochs: the first one also caches and compiles
            parts.append(f"ETA {_duration(sum(recent) / len(recent) * max(total - epoch, 0))}")
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
