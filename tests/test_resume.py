"""Nothing lost: resume equals an uninterrupted run, interruptions leave a checkpoint, runs never share a folder."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from finetune.errors import ResumeError
from finetune.harness.resume import find_checkpoint, with_run_overrides
from finetune.train import check_resume_before_start, train

from .conftest import (
    assert_counted_accuracy,
    compose_config,
    count_correct,
    make_image_folder,
    run_cli,
    start_cli,
    tiny_overrides,
    without,
)

# Momentum and a warm-up scheduler so that the optimizer and scheduler state matter; head at 10x: two groups.
RECIPE = [
    "trainer.deterministic=true",
    "optimizer.lr=0.001",
    "optimizer.momentum=0.9",
    "scheduler=warmup",
    "seed=3",
]
METRICS = ("val/acc", "test/acc", "test/loss", "epochs", "history")
# Losses after the same float operations in the same order: equal to rounding. Accuracies are k/n for n <= 8
# images, so any real difference is at least 1/8.
TOL = {"rel": 1e-6, "abs": 1e-7}


class Pace(pl.Callback):
    """Test-only: each training batch lasts at least ``seconds``, and ``progress_file`` says how far training got.

    Lets a test send a signal to a real training process at a known point in the middle of an epoch.
    """

    def __init__(self, seconds: float, progress_file: str) -> None:
        self.seconds, self.progress_file = seconds, Path(progress_file)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        time.sleep(self.seconds)
        self.progress_file.write_text(f"{trainer.current_epoch} {trainer.global_step}")


def _state(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), n_train=10)


@pytest.mark.parametrize("experiment", ["finetune", "frozen"])
def test_one_epoch_then_resume_for_one_equals_two_epochs_straight(tmp_path, data, experiment):
    def run(out: str, *extra: str) -> dict:
        overrides = [f"experiment={experiment}", *RECIPE, *extra] + tiny_overrides(data, tmp_path / out)
        return train(compose_config(overrides))

    straight = run("straight", "trainer.max_epochs=2")
    run("first", "trainer.max_epochs=1", "test_after_fit=false")
    first_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*") if p.is_file()}
    resumed = run("resumed", "trainer.max_epochs=2", f"resume={tmp_path / 'first'}")

    assert resumed["status"] == straight["status"] == "completed"
    for key in ("val/acc", "test/acc", "test/loss", "epochs"):
        assert resumed[key] == pytest.approx(straight[key], **TOL), key
    assert [e["epoch"] for e in resumed["history"]] == [0, 1]  # the first run's epoch is in the resumed history
    for got, want in zip(resumed["history"], straight["history"], strict=True):  # approx() takes no list of dicts
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], **TOL), (want["epoch"], key)
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["history"] == resumed["history"]
    assert resumed["resumed_from"] == str(tmp_path / "first" / "checkpoints" / "last.ckpt")

    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 8)
    for key, value in a["state_dict"].items():  # weights and BatchNorm statistics
        assert torch.allclose(value.float(), b["state_dict"][key].float(), rtol=0, atol=1e-6), key
    groups_a, groups_b = a["optimizer_states"][0]["param_groups"], b["optimizer_states"][0]["param_groups"]
    lrs = {g["name"]: g["lr"] for g in groups_a}
    assert list(lrs.items()) == [(g["name"], g["lr"]) for g in groups_b]
    expected = {"head": 0.01} if experiment == "frozen" else {"backbone": 0.001, "head": 0.01}
    assert lrs == pytest.approx(expected)  # warm-up over, head at 10x
    momentum = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert momentum[0].keys() == momentum[1].keys() and momentum[0]
    for index in momentum[0]:
        assert torch.allclose(momentum[0][index]["momentum_buffer"], momentum[1][index]["momentum_buffer"], atol=1e-6)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 2

    # The earlier run's folder is untouched: the resumed run wrote only into its own.
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*") if p.is_file()} == first_files


def test_resuming_into_another_setup_says_what_differs(tmp_path, data):
    train(compose_config(["trainer.max_epochs=1", "test_after_fit=false"] + tiny_overrides(data, tmp_path / "a")))
    overrides = ["model.freeze=backbone", "data.split_seed=5", f"resume={tmp_path / 'a'}"]
    with pytest.raises(ValueError, match=r"model.freeze: 'none' in the checkpoint, 'backbone' now.*data.split_seed"):
        train(compose_config(overrides + tiny_overrides(data, tmp_path / "b")))
    with pytest.raises(ValueError, match="resume= or ckpt_path=, not both"):
        train(compose_config([f"resume={tmp_path / 'a'}", "ckpt_path=x.ckpt"] + tiny_overrides(data, tmp_path / "c")))
    with pytest.raises(FileNotFoundError, match=r"resume=.*nowhere: no such run folder or checkpoint"):
        train(compose_config([f"resume={tmp_path / 'nowhere'}"] + tiny_overrides(data, tmp_path / "d")))
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/interrupted.ckpt or checkpoints/last.ckpt"):
        find_checkpoint(tmp_path / "b")  # a folder that never got a checkpoint


def test_resuming_a_run_that_reached_its_limit_is_refused_saying_how_to_train_longer(tmp_path, data):
    train(compose_config(["trainer.max_epochs=1"] + tiny_overrides(data, tmp_path / "done")))  # 4 steps
    best = json.loads((tmp_path / "done" / "results.json").read_text())["best_checkpoint"]
    again = tiny_overrides(data, tmp_path / "again")
    resume = [f"resume={tmp_path / 'done'}", *again]
    with pytest.raises(ResumeError) as info:
        check_resume_before_start(["trainer.max_epochs=1", *resume])  # what the command line runs before Hydra
    assert str(info.value) == (
        f"resume={tmp_path / 'done'}: nothing left to train, that run already reached trainer.max_epochs=1 "
        f"(1 epoch(s) done). To train it longer, resume with a larger limit (resume={tmp_path / 'done'} "
        f"trainer.max_epochs=2); to test it again, python -m finetune.evaluate ckpt_path={best}."
    )
    last = tmp_path / "done" / "checkpoints" / "last.ckpt"
    with pytest.raises(ResumeError, match=r"ckpt_path=.*last.ckpt: nothing left to train, .*max_steps=4 \(4 step"):
        train(compose_config(["trainer.max_epochs=3", "+trainer.max_steps=4", f"ckpt_path={last}", *again]))
    assert not (tmp_path / "again").exists()  # refused before its folder was claimed
    check_resume_before_start(["trainer.max_epochs=2", *resume])  # a larger limit goes ahead
    assert train(compose_config(["trainer.max_epochs=2", *resume]))["epochs"] == 2


@pytest.mark.slow
def test_resuming_a_finished_run_on_the_command_line_makes_no_new_folder(tmp_path, data):
    logs = tmp_path / "logs"
    run_cli([*without(tiny_overrides(data, tmp_path), "paths."), f"paths.log_dir={logs}", "trainer.max_epochs=1"])
    (run,) = (logs / "runs").iterdir()
    done = run_cli([f"resume={run}"], check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nothing left to train" in errors[0] and "Traceback" not in done.stderr
    assert list((logs / "runs").iterdir()) == [run]


def test_resume_on_the_command_line_brings_back_the_runs_overrides(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    (run / ".hydra" / "overrides.yaml").write_text(
        "- data=folder\n- data.root=/d\n- trainer.max_epochs=2\n- hydra.run.dir=/old\n- resume=/older\n"
    )
    argv = with_run_overrides(["train.py", f"resume={run}", "trainer.max_epochs=5"])
    assert argv == ["train.py", "data=folder", "data.root=/d", f"resume={run}", "trainer.max_epochs=5"]
    assert with_run_overrides(["train.py", "-m", f"resume={run}"]) == ["train.py", "-m", f"resume={run}"]


@pytest.mark.slow  # two loader worker processes per run, three runs
def test_same_seed_gives_identical_results_with_loader_workers(tmp_path, data):
    def run(out: str, seed: int) -> dict:
        overrides = ["trainer.deterministic=true", "trainer.max_epochs=1", "data.num_workers=2", f"seed={seed}"]
        return train(compose_config(overrides + tiny_overrides(data, tmp_path / out)))

    first, second, other_seed = run("a", 0), run("b", 0), run("c", 1)
    assert {k: first[k] for k in METRICS} == {k: second[k] for k in METRICS}
    assert first["history"] != other_seed["history"]  # the comparison can tell runs apart


def _popen_training(args: list[str]) -> subprocess.Popen:
    # SIGINT not ignored in the child (as it is under a background shell job), so that Python installs its
    # KeyboardInterrupt handler: the signal then acts as Ctrl+C.
    return start_cli(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_leaves_a_checkpoint_and_the_run_resumes_to_completion(tmp_path, signum):
    data = make_image_folder(tmp_path / "data", n_train=20)  # 32 train images, batch 2: 16 steps an epoch
    progress = tmp_path / "progress"
    overrides = without(tiny_overrides(data, tmp_path), "paths.output_dir")
    overrides = [o.replace("data.batch_size=4", "data.batch_size=2") for o in overrides] + [
        "trainer.max_epochs=2",
        "+callbacks.pace._target_=tests.test_resume.Pace",
        "+callbacks.pace.seconds=0.05",
        f"+callbacks.pace.progress_file={progress}",
        *count_correct("${paths.output_dir}/counts.json"),  # resume= brings it back, counting into the new folder
    ]
    process = _popen_training(overrides)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (
            progress.exists()
            and progress.read_text().split()[0:1] == ["1"]
            and int(progress.read_text().split()[1]) > 19
        ):
            break  # the second epoch is under way (steps 16..31)
        time.sleep(0.05)
    process.send_signal(signum)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signum, output[-3000:]

    (run,) = (tmp_path / "logs" / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] is None
    assert [e["epoch"] for e in results["history"]] == [0] and results["test/acc"] is None
    assert results["interrupted_checkpoint"] == str(run / "checkpoints" / "interrupted.ckpt")
    state = _state(run, "interrupted.ckpt")
    assert state["epoch"] == 1 and 16 < state["global_step"] < 32  # mid-epoch, after the first epoch
    assert "resume=" in output

    if signum == signal.SIGINT:
        return  # one resume through the command line is enough; both checkpoints come from the same callback
    run_cli([f"resume={run}"])  # the documented command, nothing else
    new_run = next(p for p in (tmp_path / "logs" / "runs").iterdir() if p != run)
    final = json.loads((new_run / "results.json").read_text())
    assert final["status"] == "completed" and final["resumed_from"] == results["interrupted_checkpoint"]
    assert [e["epoch"] for e in final["history"]] == [0, 1] and final["history"][0] == results["history"][0]
    counted = json.loads((new_run / "counts.json").read_text())["test"]
    assert_counted_accuracy(final["test/acc"], counted, total=8)  # 4 test images per class
    assert _state(new_run)["global_step"] == 32
    assert json.loads((run / "results.json").read_text()) == results  # the interrupted run's folder is kept as is


def test_a_new_run_never_writes_into_an_earlier_runs_folder(tmp_path, data):
    overrides = ["trainer.fast_dev_run=true"] + tiny_overrides(data, tmp_path)
    train(compose_config(overrides))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a run \(\.claim, results.json.*resume="):
        train(compose_config(overrides))
    assert (tmp_path / "results.json").read_text() == before

    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints/\)"):
        train(compose_config(["trainer.fast_dev_run=true"] + tiny_overrides(data, tmp_path / "other")))


@pytest.fixture(scope="module")
def two_concurrent_multiruns(tmp_path_factory, data):
    """Two multiruns started together: one sweeps seeds, one sweeps head_lr_mult with an invalid value (0)."""
    logs = tmp_path_factory.mktemp("logs")
    overrides = without(tiny_overrides(data, logs), "paths.")
    common = ["-m", "trainer.fast_dev_run=true", f"paths.log_dir={logs}", *overrides]
    processes = [
        _popen_training([*common, "seed=0,1"]),
        _popen_training([*common, "model.head_lr_mult=10,0,1"]),
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    return logs, processes, outputs


@pytest.mark.slow
def test_two_multiruns_started_together_write_separate_folders(two_concurrent_multiruns):
    logs, processes, outputs = two_concurrent_multiruns
    assert processes[0].returncode == 0, outputs[0][-3000:]
    sweeps = sorted((logs / "multiruns").iterdir())
    assert len(sweeps) == 2, sweeps
    jobs = sorted(p.parent for p in (logs / "multiruns").glob("*/*/.hydra"))
    assert len(jobs) == 5 and len(set(jobs)) == 5


@pytest.mark.slow
def test_a_failing_multirun_job_keeps_the_others_results_and_is_reported(two_concurrent_multiruns):
    logs, processes, outputs = two_concurrent_multiruns
    assert processes[1].returncode != 0
    assert "head_lr_mult must be > 0" in outputs[1]
    (sweep,) = {p.parent.parent for p in (logs / "multiruns").glob("*/2_*/results.json")}
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert {name: r["status"] for name, r in results.items()} == {
        "0_finetune_seed0": "completed",
        "1_finetune_seed0": "failed",
        "2_finetune_seed0": "completed",
    }
    assert "head_lr_mult must be > 0" in results["1_finetune_seed0"]["error"]
    assert results["2_finetune_seed0"]["test/acc"] is not None
    assert "head_lr_mult must be > 0" in (sweep / "1_finetune_seed0" / "train.log").read_text()
