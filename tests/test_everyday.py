"""The everyday loop as a new user meets it: score any folder of labelled photos, clean errors, progress in logs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from finetune.errors import SettingError
from finetune.evaluate import evaluate
from finetune.harness.run_settings import check_devices, check_seed
from finetune.predict import predict

from .conftest import REPO, as_unprivileged, cli_command, cli_env, make_image_folder, run_cli, tiny_overrides, without
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


def test_a_user_error_is_one_line_on_stderr_with_exit_code_2_and_is_recorded(tmp_path):
    a_file = tmp_path / "photos.zip"
    a_file.write_bytes(b"not a folder")
    out = tmp_path / "run"
    args = [*without(tiny_overrides(a_file, out), "paths.output_dir"), f"hydra.run.dir={out}", "trainer.max_epochs=1"]
    done = run_cli(args, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "is a file, not a folder" in errors[0] and "data.root" in errors[0]
    assert errors[0] in (out / "train.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "is a file, not a folder" in results["error"]


def test_hydra_full_error_shows_the_stack_of_a_user_error(tmp_path):
    env = {**cli_env(), "HYDRA_FULL_ERROR": "1"}
    args = [*tiny_overrides(tmp_path / "missing", tmp_path / "run"), "trainer.max_epochs=1"]
    done = subprocess.run(cli_command(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
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
