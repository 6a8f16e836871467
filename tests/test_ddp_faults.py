"""Faults in a 2-process DDP run (gloo on CPU): a signal to one rank stops both; a lost rank fails the other.

Each test starts ``python -m finetune.train trainer.strategy=ddp trainer.devices=2`` in its own process group, waits
until both ranks are training (``Progress`` below: slow batches, and a file per rank that gives its pid and step),
acts on one rank, and waits for both under a hard limit; the process group is killed whatever happens.
Rank 1 is rank 0's child, not ours: the test process becomes a child subreaper, so that rank 1 is handed to it
when rank 0 exits and its exit status can be read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from finetune.harness.distributed import RankObserver, lost_ranks

from .conftest import make_image_folder, start_cli, tiny_overrides

linux = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux (prctl, waitid)")

LIMIT_S = 300  # hard limit for one run, start to end
DDP_TIMEOUT_S = 30  # long enough for rank 1 to start on a busy machine: the timeout also bounds that wait
STEPS_PER_EPOCH = 8  # 40 images, 8 of them val: 16 per rank, batches of 2


class Progress(pl.Callback):
    """Test-only: every training batch lasts at least ``seconds``; ``<folder>/rank<N>`` says "<pid> <global step>"."""

    def __init__(self, seconds: float, folder: str) -> None:
        self.seconds, self.folder = seconds, Path(folder)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        time.sleep(self.seconds)
        path = self.folder / f"rank{trainer.global_rank}"
        path.with_suffix(".tmp").write_text(f"{os.getpid()} {trainer.global_step}")
        path.with_suffix(".tmp").replace(path)


class NanLossOnRank(pl.Callback):
    """Test-only: on ``rank``, the loss that the callbacks see after optimizer step ``step`` reads nan (the training
    itself is untouched): a loss that turned non-finite on one rank only, as on one rank's batch."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            outputs["loss"].fill_(float("nan"))


@dataclass
class DdpRun:
    process: subprocess.Popen  # rank 0
    progress: Path
    log_dir: Path
    console: Path  # both ranks' stdout and stderr
    rank1_pid: int | None = None

    def wait_until_training(self, min_step: int = 3) -> int:
        """Both ranks have finished ``min_step`` batches of the first epoch: rank 1's pid."""
        deadline = time.monotonic() + LIMIT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            steps = {}
            for rank in (0, 1):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    steps[rank] = [int(x) for x in (self.progress / f"rank{rank}").read_text().split()]
            if len(steps) == 2 and min(step for _, step in steps.values()) >= min_step:
                assert steps[0][0] == self.process.pid and steps[1][0] != self.process.pid
                assert max(step for _, step in steps.values()) < STEPS_PER_EPOCH - 2, "too late to stop mid-epoch"
                self.rank1_pid = steps[1][0]
                return self.rank1_pid
            time.sleep(0.05)
        raise TimeoutError("training did not start")

    def output(self) -> str:
        return self.console.read_text(errors="replace")[-4000:]

    def run_dir(self) -> Path:
        (run_dir,) = (self.log_dir / "runs").iterdir()
        return run_dir

    def results(self) -> dict:
        return json.loads((self.run_dir() / "results.json").read_text())


def wait_for_exit(pid: int, deadline: float) -> int | None:
    """Exit code of rank 1 (-N: killed by signal N), once it and rank 0 have exited; None if rank 0 collected it."""
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # still rank 0's child, or already collected by rank 0
            if not Path(f"/proc/{pid}").exists():
                return None
        else:
            if done:
                return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} still running")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=20)


@pytest.fixture
def start_ddp(tmp_path, data):
    """Starts a 2-rank run; afterwards kills whatever is left of its process group and reaps rank 1."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    runs: list[DdpRun] = []

    def start(*extra: str) -> DdpRun:
        progress = tmp_path / "progress"
        progress.mkdir()
        overrides = [o for o in tiny_overrides(data, tmp_path) if not o.startswith("paths.output_dir")]
        overrides = [o.replace("data.batch_size=4", "data.batch_size=2") for o in overrides] + [
            "experiment=frozen",
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "trainer.max_epochs=2",
            f"ddp_timeout_s={DDP_TIMEOUT_S}",
            "+callbacks.progress._target_=tests.test_ddp_faults.Progress",
            "+callbacks.progress.seconds=0.3",
            f"+callbacks.progress.folder={progress}",
            *extra,
        ]
        console = tmp_path / "console.txt"
        with console.open("w") as out:  # a file, not a pipe that nobody reads while the ranks run
            process = start_cli(
                overrides,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, which rank 1 joins: one killpg ends both
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # so Python makes it a Ctrl+C
            )
        runs.append(DdpRun(process, progress, tmp_path / "logs", console))
        return runs[-1]

    try:
        yield start
    finally:
        for run in runs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait(timeout=60)
            if run.rank1_pid is not None:  # collect rank 1 if it was handed to us
                wait_for_exit(run.rank1_pid, time.monotonic() + 60)
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def assert_interrupted(run: DdpRun, signum: int, rank1_pid: int, signalled_at: float) -> None:
    deadline = signalled_at + LIMIT_S
    rank0 = run.process.wait(timeout=LIMIT_S)
    output = run.output()
    rank1 = wait_for_exit(rank1_pid, deadline)
    print(f"{signal.Signals(signum).name}: both ranks exited {time.monotonic() - signalled_at:.1f} s after it")
    assert (rank0, rank1) == (128 + signum, 128 + signum), output

    run_dir = run.run_dir()
    results = run.results()
    assert results["status"] == "interrupted" and results["error"] is None, results
    assert results["interrupted_checkpoint"] == str(run_dir / "checkpoints" / "interrupted.ckpt")
    state = torch.load(run_dir / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and 3 <= state["global_step"] < STEPS_PER_EPOCH  # stopped mid-epoch, together
    assert "resume=" in output
    rank1_log = (run_dir / "train_ddp_process_1.log").read_text()
    assert f"a rank received {signal.Signals(signum).name}" in rank1_log  # rank 1 stopped on the agreed signal


@linux
@pytest.mark.slow
def test_sigterm_to_rank_1_alone_stops_both_ranks_with_a_checkpoint(start_ddp):
    run = start_ddp()
    rank1_pid = run.wait_until_training()
    os.kill(rank1_pid, signal.SIGTERM)
    assert_interrupted(run, signal.SIGTERM, rank1_pid, time.monotonic())


@linux
@pytest.mark.slow
def test_ctrl_c_to_rank_0_alone_stops_both_ranks_with_a_checkpoint(start_ddp):
    run = start_ddp()
    rank1_pid = run.wait_until_training()
    run.process.send_signal(signal.SIGINT)
    assert_interrupted(run, signal.SIGINT, rank1_pid, time.monotonic())


@linux
@pytest.mark.slow
def test_killed_rank_fails_the_other_and_is_named(start_ddp):
    run = start_ddp()
    rank1_pid = run.wait_until_training()
    os.kill(rank1_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    code = run.process.wait(timeout=LIMIT_S)
    print(f"SIGKILL to rank 1: rank 0 exited {time.monotonic() - killed_at:.1f} s after it")
    output = run.output()
    assert code != 0 and time.monotonic() - killed_at < 60, output
    results = run.results()
    assert results["status"] == "failed", results
    assert results["error"].startswith(f"rank 1 (pid {rank1_pid}) was killed by SIGKILL: "), results["error"]
    assert not (run.run_dir() / "checkpoints" / "interrupted.ckpt").exists()  # no collective save without rank 1


@linux
@pytest.mark.slow
def test_a_loss_that_turns_nan_on_one_rank_stops_both_with_the_divergence_error(start_ddp):
    """Without agreeing, rank 1 would stop alone and rank 0 would wait in the next gradient all-reduce until
    ddp_timeout_s, then fail with a timeout or a lost rank instead of the message that says what to change."""
    run = start_ddp(
        "+callbacks.nan_loss._target_=tests.test_ddp_faults.NanLossOnRank",
        "+callbacks.nan_loss.rank=1",
        "+callbacks.nan_loss.step=5",
    )
    rank1_pid = run.wait_until_training(min_step=2)
    rank0 = run.process.wait(timeout=LIMIT_S)
    rank1 = wait_for_exit(rank1_pid, time.monotonic() + LIMIT_S)
    output = run.output()
    # None: rank 0 was still alive when rank 1 exited and reaped it itself; rank 1's own log below shows its error.
    assert rank0 == 2 and rank1 in (2, None), (rank0, rank1, output)
    results = run.results()
    assert results["status"] == "failed" and results["test/acc"] is None, results
    # Rank 0 records its own divergence error, or rank 1's when it saw rank 1 exit first (then "rank 1 ... exited")
    assert "DivergedError: Training diverged: the training loss " in results["error"], results["error"]
    assert "optimizer.lr=" in results["error"] and "Traceback" not in output
    rank1_log = (run.run_dir() / "train_ddp_process_1.log").read_text()
    assert "Error: Training diverged: the training loss is nan in epoch 1 (batch 5)" in rank1_log
    assert not (run.run_dir() / "checkpoints" / "interrupted.ckpt").exists()


@linux
@pytest.mark.slow
def test_stuck_rank_fails_the_other_after_ddp_timeout_s(start_ddp):
    run = start_ddp()
    rank1_pid = run.wait_until_training()
    os.kill(rank1_pid, signal.SIGSTOP)  # alive but answering nothing, like a rank stuck outside the collectives
    stopped_at = time.monotonic()
    code = run.process.wait(timeout=LIMIT_S)
    seconds = time.monotonic() - stopped_at
    print(f"SIGSTOP to rank 1: rank 0 exited {seconds:.1f} s after it (ddp_timeout_s={DDP_TIMEOUT_S})")
    output = run.output()
    assert code != 0 and DDP_TIMEOUT_S - 5 < seconds < DDP_TIMEOUT_S + 45, output
    results = run.results()
    assert results["status"] == "failed" and "timed out" in results["error"].lower(), results


@linux
def test_rank_observer_gives_rank_0_time_to_end_then_kills_every_rank():
    main = subprocess.Popen(["sleep", "60"])  # stands in for rank 0, stuck outside the collectives
    rank = subprocess.Popen(["sh", "-c", "exit 3"])
    started = time.monotonic()
    RankObserver([rank], main.pid, grace_s=1.5, period_s=0.1).start()
    try:
        assert main.wait(timeout=30) == -signal.SIGKILL
        assert 1.5 <= time.monotonic() - started < 20
        assert rank.wait(timeout=5) == 3  # the exit status was left for the rank's parent to collect
    finally:
        main.kill()


@linux
def test_rank_observer_leaves_rank_0_alone_when_the_ranks_finish():
    main = subprocess.Popen(["sleep", "60"])
    rank = subprocess.Popen(["true"])
    observer = RankObserver([rank], main.pid, grace_s=0.1, period_s=0.1)
    observer.start()
    try:
        observer.join(timeout=10)
        assert not observer.is_alive() and main.poll() is None
    finally:
        main.kill()


def _agree_in_a_side_group(rank: int, port: int, signals: list[int], results) -> None:
    import torch.distributed as dist

    from finetune.harness.distributed import agree_on_signal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        side = dist.new_group(backend="gloo")  # what signal_group makes when the training backend is not gloo
        results[rank] = (agree_on_signal(signals[rank], side), agree_on_signal(0, side))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_the_largest_signal_in_a_side_group_of_cpu_tensors():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_agree_in_a_side_group, args=(port, [signal.SIGINT, signal.SIGTERM], results), nprocs=2, join=True)
    assert dict(results) == {0: (signal.SIGTERM, 0), 1: (signal.SIGTERM, 0)}


@linux
def test_lost_ranks_reads_the_processes_of_either_launcher_and_never_raises():
    """Asked while a failed run is recorded: it names a failed rank of Lightning's subprocess launcher (Popen) or its
    multiprocessing one (SpawnProcess, ForkProcess; ranks from 0), and says nothing, never raising, otherwise."""
    subprocess_launched = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    rank1 = subprocess.Popen(["sh", "-c", "exit 3"])
    subprocess_launched.strategy.launcher.procs = [rank1]
    assert lost_ranks(subprocess_launched, wait_s=30) == f"rank 1 (pid {rank1.pid}) exited with code 3"

    spawned = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=sys.exit, args=(code,)) for code in (0, 4)]
    for rank in ranks:
        rank.start()
    spawned.strategy.launcher.procs = ranks
    assert lost_ranks(spawned, wait_s=60) == f"rank 1 (pid {ranks[1].pid}) exited with code 4"

    forked = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    forked.start()
    os.kill(forked.pid, signal.SIGKILL)
    spawned.strategy.launcher.procs = [forked]
    assert lost_ranks(spawned, wait_s=30) == f"rank 0 (pid {forked.pid}) was killed by SIGKILL"

    spawned.strategy.launcher.procs = [object(), "not a process", multiprocessing.get_context("fork").Process()]
    assert lost_ranks(spawned) is None  # nothing it can read, not even a process never started
    spawned.strategy.launcher.procs = None
    assert lost_ranks(spawned) is None
    assert lost_ranks(type("NotATrainer", (), {"world_size": 2})()) is None  # no local_rank: not an error either
