"""DDP under Hydra: every rank of a run, or of one multirun job, composes that job's config and shares its folder.

Lightning's ``strategy=ddp`` starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` appended
(``_hydra_subprocess_cmd`` in ``lightning_fabric/strategies/launchers/subprocess_script.py``). In a multirun
``sys.argv`` still holds ``-m`` and the sweep lists, so every extra rank starts a *whole new sweep* in a new folder
and joins whichever job happens to be listening: wrong results, stray folders, exit code 0
(Lightning-AI/pytorch-lightning#11300; the fix #11617 was reverted, #18175 is still open; hydra#2070). Under a
launcher that runs jobs in worker processes (joblib, submitit's local executor) ``sys.argv`` is not even ours.

:func:`rank_command` builds the command from the job instead: ``python -m finetune.train``, the job's config source,
the job's own overrides (``hydra.overrides.task``, no sweep lists) and its output folder as ``hydra.run.dir``.
:func:`job_scope` puts it in Lightning's place for one job and, after the job, tears the process group down and
restores the launcher's environment variables, so the next job of a sequential sweep starts a fresh DDP group.

Faults: :func:`agree_on_signal` is how the ranks agree to stop together after a signal reached any one of them
(``finetune.harness.signals.SignalStop``), raising :class:`StopRequested` at the same point on every rank
(:func:`any_rank`: the same for a diverged loss, ``finetune.harness.divergence.DivergenceStop``);
:func:`set_timeout` bounds every collective (``ddp_timeout_s``), so that a dead or stuck rank makes the others fail
instead of wait; :func:`lost_ranks` names the rank that went missing, for the error message.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import StrategyRegistry

from finetune.errors import SettingError
from finetune.harness.overrides import override_keys, quote
from finetune.harness.private import replace_rank_launcher, set_process_group_timeout, starts_ranks_in_process

log = logging.getLogger(__name__)

# What Lightning's launcher sets in the launching process for its children; a later job must not inherit them.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides that describe the sweep (or that rank_command sets itself), never a single rank's run.
_SWEEP_KEYS = ("hydra.mode", "hydra.sweep", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper")
_OWN_KEYS = ("hydra.run.dir", "hydra.job.name", "hydra.output_subdir", "hydra.job.chdir")
# Who started this process: for ranks 1..N-1 that Lightning launched, rank 0 (see lost_ranks).
_PARENT_PID = os.getppid()
# How long rank 0 may go on after a rank it launched failed, before RankObserver kills every rank (set_timeout).
_observer_grace_s = 1800.0


# Start methods of Lightning's multiprocessing launcher (ddp_spawn, ddp_fork, ddp_notebook and their variants).
IN_PROCESS_START_METHODS = ("spawn", "fork", "forkserver")


def in_process_ranks_refused(name: str) -> SettingError:
    """The refusal of a strategy that starts its ranks inside the run, naming ``trainer.strategy=ddp`` (or its
    ``find_unused_parameters`` sibling) instead."""
    instead = "ddp"
    for variant in ("_spawn", "_fork", "_notebook"):
        sibling = name.replace(variant, "")
        if sibling != name and sibling in StrategyRegistry:
            instead = sibling
    return SettingError(
        f"trainer.strategy={name} starts its processes inside each fit and test call, and hands back only rank 0's "
        "metrics: the calibration, the test after fit, the test report, results.json and the stop on a signal "
        "need every process to run the whole command, so this template does not support it. Use "
        f"trainer.strategy={instead} (the same DDP: it starts the other processes by running the command again), "
        "from a terminal rather than a notebook."
    )


def check_strategy(strategy: Any) -> None:
    """Refuse, before anything is built, a ``trainer.strategy`` whose ranks are started by Lightning's
    multiprocessing launcher: a registered name (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, ...) or a strategy
    config with such a ``start_method``. :func:`check_launcher` catches the rest once the Trainer exists."""
    if isinstance(strategy, str):
        entry = StrategyRegistry[strategy] if strategy in StrategyRegistry else {}
        name, method = strategy, entry.get("init_params", {}).get("start_method")
    elif isinstance(strategy, Mapping) or OmegaConf.is_dict(strategy):
        method = strategy.get("start_method")
        name = f"{strategy.get('_target_')}(start_method={method})"
    else:
        return
    if method in IN_PROCESS_START_METHODS:
        raise in_process_ranks_refused(name)


def check_launcher(trainer: pl.Trainer) -> None:
    """Refuse a built Trainer whose ranks Lightning's multiprocessing launcher would start: a strategy object,
    or ``strategy=auto`` with several devices in a notebook (Lightning then picks ``ddp_fork``)."""
    if starts_ranks_in_process(trainer.strategy):
        raise in_process_ranks_refused(f"{type(trainer.strategy).__name__} (Lightning's multiprocessing launcher)")


def rank_command(local_rank: int, entry_module: str = "finetune.train") -> tuple[list[str], str]:
    """The command and working directory that start DDP rank ``local_rank`` of the current Hydra job
    (``python -m entry_module``: the entry point that rank 0 runs)."""
    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", entry_module, f"--config-name={hydra_cfg.job.config_name}"]
    for source in hydra_cfg.runtime.config_sources:
        location = source.path if source.schema == "file" else f"{source.schema}://{source.path}"
        if source.provider == "main":
            command.append(f"--config-path={location}")
        elif source.provider == "command-line":
            command.append(f"--config-dir={location}")
    command += [
        o for o in hydra_cfg.overrides.hydra if not override_keys([o]).pop().startswith(_SWEEP_KEYS + _OWN_KEYS)
    ]
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir={quote(_output_dir(hydra_cfg))}",  # the job's folder, never a new one
        f"hydra.job.name=train_ddp_process_{local_rank}",  # the rank's log: <output_dir>/train_ddp_process_N.log
        "hydra.output_subdir=null",  # rank 0 already wrote .hydra/
        f"hydra.job.chdir={'true' if hydra_cfg.job.chdir else 'false'}",
    ]
    return command, hydra_cfg.runtime.cwd


def install(entry_module: str = "finetune.train") -> bool:
    """Make Lightning's subprocess launcher start extra ranks with :func:`rank_command` (running ``entry_module``)
    and watch them with :class:`RankObserver`; False if it cannot."""
    command = functools.partial(rank_command, entry_module=entry_module)
    patched = replace_rank_launcher(command, _launch_rank_observer)
    if not patched:
        log.warning(
            "This Lightning version has no _hydra_subprocess_cmd to replace: trainer.strategy=ddp inside a Hydra "
            "multirun (-m) would start stray sweeps. Run DDP jobs as single runs, or pin pytorch-lightning<=2.6."
        )
    return patched


@contextlib.contextmanager
def job_scope(entry_module: str = "finetune.train") -> Iterator[None]:
    """One Hydra job's DDP lifetime: ranks started from the job itself, and nothing left behind for the next job."""
    install(entry_module)
    saved = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has finished this job before rank 0 moves on to the next one
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _output_dir(hydra_cfg: DictConfig) -> str:
    # Set once Hydra runs a job; a config from hydra.compose has none, so fall back to Lightning's choice.
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", throw_on_missing=False)
    return str(output_dir) if output_dir else str(hydra_cfg.run.dir)


class StopRequested(SystemExit):
    """Raised on every rank at the same point: ``signum`` (SIGINT or SIGTERM) reached at least one of them.

    A ``SystemExit`` (code 128 + ``signum``), not a ``KeyboardInterrupt``: Lightning answers a KeyboardInterrupt on
    rank 0 by SIGKILLing the other ranks, which must instead save and exit together.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def signal_group(timeout: datetime.timedelta | None) -> dist.ProcessGroup | None:
    """The process group for :func:`agree_on_signal`: the default one under gloo, else a gloo group of all ranks.

    The flag is a CPU tensor, so agreeing costs no device synchronisation in the training loop (an all-reduce on
    the GPU and ``.item()`` would stall the CUDA stream every batch). A collective: every rank calls it once.
    """
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def agree_on_signal(signum: int, group: dist.ProcessGroup | None = None) -> int:
    """The largest signal number that any rank has received (0: none), the same on every rank.

    A collective: every rank must call it at the same point of the loop (the end of a training batch).
    """
    flag = torch.tensor([signum], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` is true on any rank, the same answer on every rank (a CPU all-reduce over ``group``, see
    :func:`signal_group`). A collective: every rank must call it at the same point of the loop."""
    return bool(agree_on_signal(int(flag), group))


def set_timeout(trainer: pl.Trainer, seconds: float | None) -> None:
    """Bound every collective of the run (and the start-up rendezvous) to ``seconds``; None keeps Lightning's 30 min.

    Must be called before ``trainer.fit``: the process group takes its timeout when it is created, so it also
    bounds how long rank 0 waits for the other ranks to start. It is also the time :class:`RankObserver` gives
    rank 0 to end on its own after another rank failed. gloo (CPU) enforces it on every collective (tested);
    with NCCL it is the watchdog's limit, acted on as PyTorch's ``TORCH_NCCL_*`` settings say (not tested here).
    """
    global _observer_grace_s
    if seconds is None:
        return
    _observer_grace_s = float(seconds)
    strategy = trainer.strategy
    if not set_process_group_timeout(strategy, seconds) and trainer.world_size > 1:
        log.warning("%s has no process-group timeout to set: ddp_timeout_s is ignored", type(strategy).__name__)


def lost_ranks(trainer: pl.Trainer | None, wait_s: float = 2.0) -> str | None:
    """The ranks that went missing, as seen from this one: launched ranks that exited, or rank 0 if it is gone.

    Under Lightning's launcher rank 0 (of each node) started the node's other ranks and sees their exit status;
    another rank only sees that its parent, rank 0, is gone. None when nothing is known: a single process, or every
    rank still running (a stuck rank looks like a healthy one from here). It is asked while a failed run is being
    recorded, so it never raises: a launcher whose processes it cannot read (another kind of launcher, another
    Lightning) gives None, and the run's own error is recorded as it is.
    """
    try:
        return _lost_ranks(trainer, wait_s)
    except Exception:  # noqa: BLE001 - a guess at the cause must never hide the error it is asked to explain
        log.debug("Could not tell which rank went missing", exc_info=True)
        return None


def _lost_ranks(trainer: pl.Trainer | None, wait_s: float) -> str | None:
    if trainer is None or trainer.world_size < 2:
        return None
    if trainer.local_rank != 0:
        gone = os.getppid() != _PARENT_PID
        return (
            f"the process that started this rank (pid {_PARENT_PID}, rank 0 under Lightning) is gone" if gone else None
        )
    launcher = getattr(trainer.strategy, "launcher", None)
    procs = list(getattr(launcher, "procs", None) or [])
    # Lightning's subprocess launcher starts ranks 1..N-1 (rank 0 is this process); its multiprocessing launcher
    # (ddp_spawn, ddp_fork: refused by check_launcher, but never a reason to raise here) starts every rank.
    first = 0 if starts_ranks_in_process(trainer.strategy) else 1
    deadline = time.monotonic() + wait_s  # a rank that failed first may still be on its way out
    found = []
    for local_rank, proc in enumerate(procs, start=first):
        code = _wait_exit_code(proc, max(0.0, deadline - time.monotonic()))
        if code:
            rank = trainer.node_rank * trainer.num_devices + local_rank
            found.append(f"rank {rank} (pid {getattr(proc, 'pid', '?')}) {_exit_status(code)}")
    return "; ".join(found) or None


def _wait_exit_code(proc: object, timeout_s: float) -> int | None:
    """The exit code of a launched rank after waiting up to ``timeout_s`` (-N: killed by signal N); None while it
    runs or when ``proc`` is no process this knows how to ask: ``subprocess.Popen`` (Lightning's subprocess
    launcher) and ``multiprocessing.Process`` (its multiprocessing launcher: ``SpawnProcess``, ``ForkProcess``)."""
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        return proc.returncode
    if isinstance(proc, multiprocessing.process.BaseProcess):
        with contextlib.suppress(AssertionError, ValueError):  # not started by this process, or closed
            proc.join(timeout=timeout_s)
            return proc.exitcode
        return None
    return None


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class RankObserver(threading.Thread):
    """Rank 0's watch over the ranks it launched, in place of Lightning's ``_ChildProcessObserver``.

    Lightning's SIGKILLs every rank, rank 0 included, within 5 s of a launched rank exiting with a non-zero code:
    rank 0 then never writes ``results.json``, and after a stop that every rank agreed on, rank 1 exiting with 143
    kills rank 0 while it is still recording the interruption. This one gives rank 0 ``grace_s``
    (``ddp_timeout_s``) to end on its own, which it does: a collective with a lost rank fails within that timeout.
    Only if rank 0 is still running then (stuck outside the collectives) does it kill every rank, as Lightning's
    does. It reads exit codes without collecting them (``waitid`` with ``WNOWAIT``), so that :func:`lost_ranks`,
    or whoever inherits the process, still can.
    """

    def __init__(self, procs: list[subprocess.Popen], main_pid: int, grace_s: float, period_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="rank-observer")  # ends with the main process
        self.procs, self.main_pid, self.grace_s, self.period_s = procs, main_pid, grace_s, period_s

    def run(self) -> None:
        while True:
            time.sleep(self.period_s)
            codes = [_peek_exit_code(proc) for proc in self.procs]
            if all(code == 0 for code in codes):
                return  # every launched rank finished
            failed = [f"pid {p.pid} {_exit_status(c)}" for p, c in zip(self.procs, codes, strict=True) if c]
            if failed:
                break
        # 130 or 143 after an agreed stop, an error otherwise: either way rank 0 should be on its way out too.
        log.warning("A launched rank ended (%s): rank 0 has %.0f s to end too", "; ".join(failed), self.grace_s)
        time.sleep(self.grace_s)
        log.error("Rank 0 is still running %.0f s after another rank failed: killing every rank", self.grace_s)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        os.kill(self.main_pid, signal.SIGKILL)


def _launch_rank_observer(child_processes: list[subprocess.Popen]) -> None:
    """Lightning's ``_launch_process_observer``, with :class:`RankObserver`."""
    RankObserver(child_processes, os.getpid(), _observer_grace_s).start()


def _peek_exit_code(proc: subprocess.Popen) -> int | None:
    """``proc``'s exit code (-N: killed by signal N), None while it runs; the process is left for others to reap."""
    if proc.returncode is not None or not hasattr(os, "waitid"):
        return proc.poll()
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already collected
        return proc.poll()
    if info is None:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status
