"""Every use of a private Lightning or torch API in finetune, in one place, checked against the releases it was read on.

Each function here reaches into something upstream does not promise to keep (an underscored name or attribute).
They are needed where Lightning has a known trap and no public hook:

- the subprocess launcher that starts DDP ranks re-runs ``sys.argv`` (a whole new sweep inside a Hydra multirun,
  Lightning-AI/pytorch-lightning#11300): :func:`replace_rank_launcher`; which launcher a strategy has:
  :func:`starts_ranks_in_process`;
- the SIGTERM handler broadcasts from inside the handler (a signal to one DDP rank hangs every rank):
  :func:`install_signal_handlers`, :func:`signal_handlers_installed`;
- the process-group timeout is not a Trainer flag: :func:`set_process_group_timeout`, :func:`process_group_timeout`;
- ``nn.Module.compile`` has no public "undo" when compiling fails on first use: :func:`run_eagerly`,
  :data:`COMPILE_ERRORS`;
- Lightning's ``WeightAveraging`` keeps its ``AveragedModel`` to itself, and a checkpoint saved while it is swapped
  into the model (mid-validation) mixes the two up: :func:`averaged_model`.;
- LitData's ``optimize`` answers Ctrl+C with ``os._exit(0)`` (exit code 0, no clean-up) and leaves its handler
  installed: :func:`litdata_interruptible`.

:data:`CHECKED_LIGHTNING` names the Lightning releases these were read against and tested on
(``tests/test_private.py`` fails on a release outside it, so a new Lightning is looked at before it is trusted).
"""

from __future__ import annotations

import datetime
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger(__name__)

# (major, minor) of the pytorch-lightning releases whose private names below were read and tested.
CHECKED_LIGHTNING = ((2, 6),)


def lightning_version() -> tuple[int, int]:
    major, minor = pl.__version__.split(".")[:2]
    return int(major), int(minor)


def lightning_is_checked() -> bool:
    """Whether the installed Lightning is one this module was checked on."""
    return lightning_version() in CHECKED_LIGHTNING


# --- DDP ranks under Hydra --------------------------------------------------------------------------------------
def replace_rank_launcher(command: Callable[..., Any], observer: Callable[..., Any]) -> bool:
    """Make Lightning's (and Fabric's) subprocess launcher build rank commands with ``command`` and watch the ranks
    with ``observer``; False where this Lightning has no such hook (then nothing is changed)."""
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    from pytorch_lightning.strategies.launchers import subprocess_script as pl_launcher

    for module in (pl_launcher, fabric_launcher):  # the Trainer's, and Fabric's for scripts that use it
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = command
        if hasattr(module, "_launch_process_observer"):
            module._launch_process_observer = observer
    return getattr(pl_launcher, "_hydra_subprocess_cmd", None) is command


def starts_ranks_in_process(strategy: Any) -> bool:
    """Whether the strategy's launcher is Lightning's multiprocessing one (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``, XLA): ranks started inside each ``trainer.fit``/``test`` call, not by running the command."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher)


# --- process-group timeout --------------------------------------------------------------------------------------
def set_process_group_timeout(strategy: Any, seconds: float) -> bool:
    """Set the timeout the strategy gives its process group; False if it keeps none (single device, ...)."""
    if not hasattr(strategy, "_timeout"):  # DDPStrategy and its relatives (FSDP, DeepSpeed) keep it there
        return False
    strategy._timeout = datetime.timedelta(seconds=float(seconds))
    return True


def process_group_timeout(strategy: Any) -> datetime.timedelta | None:
    return getattr(strategy, "_timeout", None)


# --- signals under DDP --------------------------------------------------------------------------------------------
class _NotingSignalConnector(_SignalConnector):
    """Lightning's connector (SLURM requeueing, putting the earlier handlers back afterwards), except that while
    fitting SIGTERM and SIGINT only reach ``note``. ``received_sigterm`` stays False, so Lightning's loops never
    stop one rank on their own."""

    def __init__(self, trainer: pl.Trainer, note: Callable[[int, Any], None]) -> None:
        super().__init__(trainer)
        self.note = note

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()  # also saves the handlers that teardown() restores
        if self.trainer.state.fn != TrainerFn.FITTING:
            return
        self._register_signal(signal.SIGTERM, self.note)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # nohup or a background job: keep ignoring it
            self._register_signal(signal.SIGINT, self.note)


def install_signal_handlers(trainer: pl.Trainer, note: Callable[[int, Any], None]) -> None:
    """While ``trainer`` fits, SIGTERM and SIGINT call ``note`` only (Lightning installs its handlers through the
    trainer's private signal connector whenever a stage starts)."""
    if not signal_handlers_installed(trainer):
        trainer._signal_connector = _NotingSignalConnector(trainer, note)


def signal_handlers_installed(trainer: pl.Trainer) -> bool:
    return isinstance(getattr(trainer, "_signal_connector", None), _NotingSignalConnector)


# --- torch.compile --------------------------------------------------------------------------------------------------
def _compile_errors() -> tuple[type[BaseException], ...]:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # a torch without dynamo: nothing compiles, nothing to catch
        return ()
    return (TorchDynamoException,)


# What a compiled module raises on its first calls when compiling fails (compilation is lazy).
COMPILE_ERRORS: tuple[type[BaseException], ...] = _compile_errors()


def run_eagerly(module: torch.nn.Module) -> None:
    """Undo ``module.compile()``: the attribute ``nn.Module.compile`` sets; None restores the eager forward."""
    module._compiled_call_impl = None


def averaged_model(callback: Any) -> torch.optim.swa_utils.AveragedModel | None:
    """The ``AveragedModel`` of a Lightning ``WeightAveraging`` callback (``None`` before its fit starts)."""
    return callback._average_model


# --- LitData's Ctrl+C -----------------------------------------------------------------------------------------------
def _stop_workers_and_raise(processor: Any, signum: int, frame: Any) -> None:
    """LitData's own clean-up of its workers, then ``KeyboardInterrupt`` where LitData calls ``os._exit(0)``."""
    for queue in getattr(processor, "stop_queues", None) or []:
        queue.put(None)
    for worker in getattr(processor, "workers", None) or []:
        worker.join(5)
        if worker.is_alive():
            worker.terminate()
    raise KeyboardInterrupt


@contextmanager
def litdata_interruptible() -> Iterator[None]:
    """While ``litdata.optimize`` runs inside, Ctrl+C stops its workers and raises ``KeyboardInterrupt`` (so the
    caller's clean-up runs and the command exits 130), and the SIGINT handler from before is back afterwards."""
    from litdata.processing import data_processor

    processor = data_processor.DataProcessor
    litdata_handler = processor._signal_handler
    previous = signal.getsignal(signal.SIGINT)
    processor._signal_handler = _stop_workers_and_raise
    try:
        yield
    finally:
        processor._signal_handler = litdata_handler
        signal.signal(signal.SIGINT, previous)
