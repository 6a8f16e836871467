"""The everyday loop as a new user meets it: score any folder of labelled photos, clean errors, progress in logs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from finetune.errors import SettingError
from finetune.evaluate import evaluate
from finetune.harness.run_folder import RunFolder, keep_claimed, release_unstarted
from finetune.harness.run_settings import check_devices, check_seed
from finetune.predict import predict
from finetune.train import train

from .conftest import (
    as_unprivileged,
    cli_command,
    cli_env,
    compose_config,
    make_image_folder,
    run_cli,
    tiny_overrides,
    without,
)
from .inference import eval_config, predict_config, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def copy_test_images(root: Path, into: Path, plain: bool) -> Path:
    """A copy of ``root``'s test images alone: ``into/test/<class>/`` or, ``plain``, ``into/<class>/``."""
    shutil.copytree(root / "test", into if plain else into / "test")
    return into


@pytest.mark.parametrize("plain", [False, True], ids=["test-class", "class"])
def test_evaluate_scores_a_folder_of_test_images_alone_as_the_full_folder(run, tmp_path, plain):
    reference = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp_path / "full"))
    photos = copy_test_images(run["root"], tmp_path / "photos", plain)
    # train/val settings that would be refused for training are ignored: evaluation selects nothing
    results = evaluate(eval_config(run["best_checkpoint"], photos, tmp_path / "eval", "data.val_fraction=0"))
    assert results["test/acc"] == pytest.approx(reference["test/acc"])
    assert results["test/loss"] == pytest.approx(reference["test/loss"], rel=1e-6)
    assert sum(map(sum, results["test/confusion_matrix"]["matrix"])) == 8  # every test image, once
    assert (tmp_path / "eval" / "eval_results.json").is_file()


def test_evaluate_still_refuses_other_classes_in_a_test_only_folder(run, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("hot_dog", "not_hot_dog"))
    photos = copy_test_images(other, tmp_path / "photos", plain=True)
    with pytest.raises(ValueError, match=r"\['cat', 'dog'\].*\['hot_dog', 'not_hot_dog'\]"):
        evaluate(eval_config(run["best_checkpoint"], photos, tmp_path / "eval"))


def test_evaluate_refuses_a_train_folder_without_test_by_name(run, tmp_path):
    shutil.copytree(run["root"] / "train", tmp_path / "photos" / "train")
    with pytest.raises(FileNotFoundError, match="has a train/ folder but no test/ folder"):
        evaluate(eval_config(run["best_checkpoint"], tmp_path / "photos", tmp_path / "eval"))


@pytest.mark.parametrize("plain", [False, True], ids=["test-class", "class"])
def test_predict_reads_a_folder_of_test_images_alone(run, tmp_path, plain):
    photos = copy_test_images(run["root"], tmp_path / "photos", plain)
    rows = predict(predict_config(run["best_checkpoint"], photos, tmp_path / "pred"))
    assert len(rows) == 8 and not any(row["error"] for row in rows)
    assert {Path(row["path"]).parent.name for row in rows} == {"cat", "dog"}
    assert (tmp_path / "pred" / "predictions.csv").is_file()


# --- a user's mistake ends in one line and exit code 2; a bug keeps its traceback ----------------------------------


def test_a_user_error_is_one_line_on_stderr_with_exit_code_2_and_leaves_no_folder(tmp_path):
    a_file = tmp_path / "photos.zip"
    a_file.write_bytes(b"not a folder")
    out = tmp_path / "run"
    args = [*without(tiny_overrides(a_file, out), "paths.output_dir"), f"hydra.run.dir={out}", "trainer.max_epochs=1"]
    done = run_cli(args, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "is a file, not a folder" in errors[0] and "data.root" in errors[0]
    assert "is a file, not a folder" not in done.stdout  # said once
    assert not out.exists()  # refused before it started: the Error line is its whole record


@pytest.mark.slow
def test_commands_refused_before_they_start_leave_no_folder_and_a_users_folder_as_it_was(run, tmp_path, tiny_folder):
    logs = tmp_path / "logs"
    for module, args in [
        ("finetune.train", [*without(tiny_overrides(tiny_folder, tmp_path), "paths."), "model.head_lr_mult=0"]),
        ("finetune.evaluate", [f"ckpt_path={tmp_path / 'missing.ckpt'}"]),
        ("finetune.predict", [f"ckpt_path={run['best_checkpoint']}", f"inputs={tmp_path / 'missing'}"]),
    ]:
        done = run_cli([*args, f"paths.log_dir={logs}"], check=False, module=module)
        assert done.returncode == 2 and done.stderr.count("Error: ") == 1, done.stderr[-3000:]
    assert list((logs / "runs").iterdir()) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    done = run_cli(
        [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={mine}"], check=False, module="finetune.evaluate"
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def _claimed(folder: Path, *, results: dict | None = None, extra: str | None = None) -> RunFolder:
    """``folder`` claimed by this process, with what a command writes at its start (and ``extra``, a file)."""
    run_folder = RunFolder(folder)
    run_folder.claim()
    run_folder.hydra.mkdir()
    run_folder.overrides.write_text("- seed=0\n")
    (folder / "train.log").write_text("")
    if results is not None:
        run_folder.results.write_text(json.dumps(results))
    if extra:
        (folder / extra).parent.mkdir(parents=True, exist_ok=True)
        (folder / extra).write_bytes(b"work")
    return run_folder


REFUSED = {"status": "failed", "history": [], "best_checkpoint": None, "last_checkpoint": None, "error": "E"}


def test_only_what_a_command_wrote_at_its_start_is_taken_back_after_a_refusal(tmp_path):
    release_unstarted()  # claims of earlier tests in this process are not this test's
    gone = _claimed(tmp_path / "refused", results=REFUSED)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.log").write_text("the user's")
    restored = _claimed(theirs)
    trained = _claimed(tmp_path / "trained", results={**REFUSED, "history": [{"epoch": 0}]})
    checkpoint = _claimed(tmp_path / "checkpoint", results=REFUSED, extra="checkpoints/last.ckpt")
    figure = _claimed(tmp_path / "figure", extra="confusion_matrix.png")
    kept = {
        run_folder.path: sorted(p.name for p in run_folder.path.rglob("*"))
        for run_folder in (trained, checkpoint, figure)
    }

    assert sorted(release_unstarted()) == sorted([gone.path, restored.path])
    assert not gone.path.exists()
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.log"]  # the user's folder, as it was
    for path, names in kept.items():  # work was done: the folder stays whole
        assert sorted(p.name for p in path.rglob("*")) == names
    assert release_unstarted() == []  # each claim is considered once


def test_once_training_starts_a_failure_keeps_the_folder_whatever_it_holds(tmp_path):
    release_unstarted()
    started = _claimed(tmp_path / "diverged", results=REFUSED)  # e.g. a first epoch that diverged: no checkpoint
    keep_claimed()  # finetune.train, just before fitting
    assert release_unstarted() == []
    assert sorted(p.name for p in started.path.iterdir()) == [".claim", ".hydra", "results.json", "train.log"]


def test_hydra_full_error_shows_the_stack_of_a_user_error(tmp_path):
    env = {**cli_env(), "HYDRA_FULL_ERROR": "1"}
    args = [*tiny_overrides(tmp_path / "missing", tmp_path / "run"), "trainer.max_epochs=1"]
    done = run_cli(args, timeout=300, check=False, env=env)
    assert done.returncode == 1 and "Traceback" in done.stderr and "PathError" in done.stderr


def test_a_user_error_in_one_multirun_job_is_its_message_alone_and_the_other_jobs_run(tmp_path, tiny_folder):
    sweep = tmp_path / "sweep"
    args = [*without(tiny_overrides(tiny_folder, tmp_path), "paths.output_dir", "data.root"), "trainer.max_epochs=1"]
    done = run_cli(
        ["-m", f"data.root={tmp_path / 'missing'},{tiny_folder}", f"hydra.sweep.dir={sweep}", *args], check=False
    )
    assert done.returncode == 1, done.stderr[-3000:]  # Hydra's exit status for a sweep with a failed job
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert f"Dataset folder '{tmp_path / 'missing'}' (data.root) does not exist" in done.stderr
    failed, completed = (json.loads((sweep / f"{i}_finetune_seed0" / "results.json").read_text()) for i in (0, 1))
    assert failed["status"] == "failed" and "does not exist" in failed["error"]
    assert completed["status"] == "completed"


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("finetune.evaluate", ["ckpt_path={ckpt}", "data=folder", "data.root={missing}"]),
        ("finetune.predict", ["ckpt_path={ckpt}", "inputs={missing}"]),
        ("finetune.export", ["ckpt_path={missing}/model.ckpt"]),
    ],
)
def test_every_entry_point_ends_a_user_error_with_exit_code_2(run, tmp_path, module, args):
    filled = [a.format(ckpt=run["best_checkpoint"], missing=tmp_path / "missing") for a in args]
    done = run_cli([*filled, f"hydra.run.dir={tmp_path / 'out'}"], check=False, module=module)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.count("Error: ") == 1


@pytest.mark.parametrize(
    ("module", "args", "missing"),
    [
        ("finetune.train", ["data=folder"], "data.root"),
        ("finetune.evaluate", [], "ckpt_path"),
        ("finetune.predict", ["ckpt_path=x.ckpt"], "inputs"),
        ("finetune.export", [], "ckpt_path"),
        ("finetune.calibrate", [], "ckpt_path"),
        ("finetune.robustness", [], "ckpt_path"),
        ("finetune.soup", [], "ckpts"),
        ("finetune.shards", ["data=folder", "data.root=."], "output"),
    ],
)
def test_a_required_setting_left_out_is_one_line_naming_it_and_leaves_no_folder(tmp_path, module, args, missing):
    done = run_cli([*args, f"hydra.run.dir={tmp_path / 'out'}"], check=False, module=module)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("Error: ") == 1 and "Traceback" not in done.stderr
    assert f"Error: {missing}: required and not given; add {missing}=... to the command line." in done.stderr
    assert not (tmp_path / "out").exists()


# --- progress in logs -----------------------------------------------------------------------------------------------


def test_a_run_without_a_terminal_logs_one_line_per_epoch(tmp_path, tiny_folder):
    out = tmp_path / "run"
    args = [*without(tiny_overrides(tiny_folder, out), "paths.output_dir"), f"hydra.run.dir={out}"]
    done = run_cli([*args, "trainer.max_epochs=3", "trainer.enable_progress_bar=true"])  # stdout is a pipe
    lines = [
        line for line in (out / "train.log").read_text().splitlines() if "EpochSummary" in line or " epoch " in line
    ]
    summaries = [line for line in lines if "val/acc" in line and "ETA" in line]
    assert [line.split("epoch ")[1].split()[0] for line in summaries] == ["1/3", "2/3", "3/3"]
    assert all("train/loss" in line and "val/loss" in line and "best val/acc" in line for line in summaries)
    assert sum("ETA" in line for line in done.stdout.splitlines()) == 3
    assert f"output folder:   {out}" in done.stdout and f"output folder:   {out}" in (out / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "args", "said"),
    [
        ("finetune.evaluate", ["data=folder", "data.root={root}", "data.num_workers=0"], "{ckpt}: test/acc "),
        ("finetune.predict", ["inputs={root}/test", "num_workers=0"], "Predicted 8 image(s) with {ckpt}: "),
        ("finetune.export", ["format=torchscript"], "Exported {ckpt} to "),
    ],
    ids=["evaluate", "predict", "export"],
)
def test_a_command_says_its_results_in_its_log_file_too(run, tmp_path, module, args, said):
    out = tmp_path / "out"
    filled = [a.format(root=run["root"]) for a in args]
    done = run_cli([f"ckpt_path={run['best_checkpoint']}", *filled, f"hydra.run.dir={out}"], module=module)
    said = said.format(ckpt=run["best_checkpoint"])
    printed = [line for line in done.stdout.splitlines() if line.startswith((said, "Wrote "))]
    assert printed and printed[0].startswith(said), done.stdout[-2000:]
    log = (out / f"{module.split('.')[1]}.log").read_text()  # evaluate.log, predict.log, export.log
    assert all(line in log for line in printed), log


class StopAtStep(pl.Callback):
    """Test-only: fails the fit at the end of training step ``step``, as a crash in the middle of an epoch would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped by the test")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory) -> dict:
    """A run stopped at step 6 of 8 (epoch 2 of 2, 4 steps an epoch), then resumed in-process; what each logged."""
    data = make_image_folder(tmp_path_factory.mktemp("data"), n_train=10)  # 16 training images: batch 4
    tmp = tmp_path_factory.mktemp("runs")
    recipe = ["trainer.max_epochs=2", "callbacks.epoch_summary.when=always", "test_after_fit=false", "calibrate=false"]
    records = Records()
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "finetune")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(records)
        logger.setLevel(logging.INFO)
    try:
        stop = [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=6"]
        with pytest.raises(RuntimeError, match="stopped by the test"):
            train(compose_config([*recipe, *stop, *tiny_overrides(data, tmp / "stopped")]))
        stopping = list(records.lines)
        records.lines.clear()
        start = time.perf_counter()
        resumed = train(compose_config([*recipe, f"resume={tmp / 'stopped'}", *tiny_overrides(data, tmp / "resumed")]))
        seconds = time.perf_counter() - start
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(records)
            logger.setLevel(level)
    return {
        "stopped": tmp / "stopped",
        "stopping": stopping,
        "resuming": records.lines,
        "resumed": resumed,
        "seconds": seconds,
    }


def test_an_interrupted_run_saves_its_whole_state_without_a_weights_only_notice(stopped_and_resumed):
    saved = RunFolder(stopped_and_resumed["stopped"]).interrupted_checkpoint
    state = torch.load(saved, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and state["optimizer_states"] and state["callbacks"]  # enough to resume
    lines = stopped_and_resumed["stopping"]
    assert any("saved" in line and str(saved) in line for line in lines), lines  # the records were captured
    assert not [line for line in lines if "weights_only" in line]


def test_an_epoch_resumed_from_its_middle_is_timed_from_the_resume(stopped_and_resumed):
    assert stopped_and_resumed["resumed"]["resumed_from"].endswith("interrupted.ckpt")
    lines = [line for line in stopped_and_resumed["resuming"] if line.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("epoch 2/2 ") and "(resumed mid-epoch)" in lines[0], lines
    seconds = float(lines[0].split(" s (resumed mid-epoch)")[0].split()[-1])
    assert 0 <= seconds <= stopped_and_resumed["seconds"]  # this process's time, not the clock's origin
    assert "ETA" not in lines[0]  # no whole epoch was timed in this process


def test_the_epoch_line_says_the_best_so_far_and_the_eta():
    from finetune.harness.epoch_log import EpochSummary

    summary = EpochSummary(when="always")
    summary.best, summary._seconds = 0.9, [30.0, 30.0]
    line = summary.line(2, 20, {"train/loss": 0.5, "val/loss": 0.25, "val/acc": 0.875}, 30.0)
    assert (
        line == "epoch 2/20  train/loss 0.5000  val/loss 0.2500  val/acc 0.8750  best val/acc 0.9000  30.0 s  ETA 9m00s"
    )
    with pytest.raises(ValueError, match="callbacks.epoch_summary.when"):
        EpochSummary(when="sometimes")


def test_a_quoted_data_root_under_home_written_with_a_tilde_is_found(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    copy_test_images(run["root"], tmp_path / "photos", plain=True)
    # quoted, as Hydra's override grammar needs for a leading ~
    results = evaluate(eval_config(run["best_checkpoint"], "'~/photos'", tmp_path / "eval"))
    assert sum(map(sum, results["test/confusion_matrix"]["matrix"])) == 8


# --- settings that Lightning would take without naming them ----------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_a_seed_in_lightnings_range_is_used_as_given(seed):
    assert check_seed(seed) == seed


@pytest.mark.parametrize("seed", ["abc", -1, 2**32, 1.5, True, None])
def test_a_seed_lightning_would_fail_on_or_replace_by_a_random_one_is_refused(seed):
    with pytest.raises(SettingError, match=r"^seed must be an integer from 0 to 4294967295, got "):
        check_seed(seed)


@pytest.mark.parametrize("devices", ["auto", 1, 2, -1, [0], [0, 1], "0,1", "2"])
def test_device_settings_lightning_reads_are_accepted(devices):
    check_devices(devices, 1)


@pytest.mark.parametrize("devices", [0, -2, [], "", "abc", "0,x", True, [-1]])
def test_device_settings_that_use_no_device_are_refused_by_name(devices):
    with pytest.raises(SettingError, match=r"^trainer.devices must be auto, a number of devices >= 1"):
        check_devices(devices, 1)
    with pytest.raises(SettingError, match=r"^trainer.num_nodes must be an integer >= 1"):
        check_devices(1, 0)


@pytest.mark.parametrize(("setting", "named"), [("seed=abc", "seed must be"), ("trainer.devices=0", "trainer.devices")])
def test_a_bad_seed_or_device_count_on_the_command_line_is_one_error_line(tmp_path, tiny_folder, setting, named):
    done = run_cli([*tiny_overrides(tiny_folder, tmp_path / "run"), "trainer.max_epochs=1", setting], check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {named}") and "Traceback" not in done.stderr


def test_a_read_only_log_dir_is_named_before_the_run_starts(tmp_path, tiny_folder):
    """As a user without root's override of permissions (``nobody`` when the tests run as root)."""
    import tempfile

    with tempfile.TemporaryDirectory() as name:
        shared = Path(name)
        shared.chmod(0o777)
        data = shutil.copytree(tiny_folder, shared / "data")
        read_only = shared / "logs"
        read_only.mkdir()
        read_only.chmod(0o555)
        args = [*without(tiny_overrides(data, shared), "paths."), f"paths.log_dir={read_only}", "trainer.max_epochs=1"]
        command = as_unprivileged(cli_command(args))
        env = {**cli_env(), "HOME": str(shared)}
        done = subprocess.run(command, cwd=shared, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "not writable" in errors[0] and "paths.log_dir" in errors[0], done.stderr
        assert str(read_only) in errors[0] and not any(read_only.iterdir())
