"""A signal to one DDP rank stops every rank at the same batch end, instead of hanging the job."""

from __future__ import annotations

import logging
import signal
from typing import Any

import pytorch_lightning as pl

from finetune.harness.distributed import StopRequested, agree_on_signal, signal_group
from finetune.harness.private import install_signal_handlers, process_group_timeout, signal_handlers_installed

log = logging.getLogger(__name__)


class SignalStop(pl.Callback):
    """Under DDP, SIGTERM or Ctrl+C (SIGINT) reaching any one rank stops every rank at the same training batch end.

    Lightning's SIGTERM handler broadcasts from inside the handler: when the signal reaches one rank only (``kill``
    of one process, a node's scheduler), that broadcast meets the other ranks' gradient all-reduce and every rank
    hangs. Here the handler only notes the signal. At the end of every training batch, and at the end of training,
    the ranks all-reduce the signal numbers they noted (:func:`~finetune.harness.distributed.agree_on_signal`) and,
    if there is one, all raise :class:`~finetune.harness.distributed.StopRequested` there: ``InterruptCheckpoint`` saves
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
        if trainer.world_size > 1 and not signal_handlers_installed(trainer):
            install_signal_handlers(trainer, self.note)
            self._group = signal_group(process_group_timeout(trainer.strategy))

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
        if not signal_handlers_installed(trainer):
            return
        signum = agree_on_signal(self.signum, self._group)
        if signum:
            log.warning("Stopping every rank: a rank received %s", signal.Signals(signum).name)
            raise StopRequested(signum)
