"""Checkpoint, resume and predict advice that is true: folders and non-checkpoint files named as what they are,
outputs checked before the work, resumes from another folder, evaluate on the data a checkpoint was trained on."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from finetune.calibrate import calibrate
from finetune.data.transforms import CLASSES
from finetune.errors import PathError, UserError
from finetune.evaluate import evaluate
from finetune.export import export
from finetune.harness.checkpoint_io import CheckpointError, CheckpointFolderError, load_checkpoint
from finetune.predict import predict
from finetune.robustness import robustness
from finetune.soup import soup
from finetune.train import train

from .conftest import (
    REPO,
    as_unprivileged,
    cli_command,
    cli_env,
    compose_config,
    make_image_folder,
    run_cli,
    tiny_overrides,
    without,
)
from .inference import eval_config, evil_checkpoint, predict_config, trained_run

BEST = "epoch01-val_acc0.9000.ckpt"


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder's layout with two (tiny) checkpoints: the best one and last.ckpt."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in (BEST, "last.ckpt"):
        torch.save({"state_dict": {}}, run / "checkpoints" / name)
    return run


def _entry_points(ckpt: Path, data: Path, out: Path) -> dict:
    """Each command that takes a checkpoint, as the function its entry point runs and the config it composes."""
    data_args = ["data=folder", f"data.root={data}", "data.num_workers=0", "trainer.accelerator=cpu"]
    common = [f"paths.output_dir={out}"]
    return {
        "evaluate": (evaluate, compose_config([f"ckpt_path={ckpt}", *data_args, *common], "eval")),
        "calibrate": (calibrate, compose_config([f"ckpt_path={ckpt}", *data_args, *common], "calibrate")),
        "robustness": (robustness, compose_config([f"ckpt_path={ckpt}", *data_args[:3], *common], "robustness")),
        "predict": (predict, compose_config([f"ckpt_path={ckpt}", f"inputs={data}", *common], "predict")),
        "export": (export, compose_config([f"ckpt_path={ckpt}", "format=torchscript", *common], "export")),
        "soup": (
            soup,
            compose_config(["method=uniform", f"ckpts=[{ckpt},{ckpt}/x.ckpt]", *data_args, *common], "soup"),
        ),
        "train ckpt_path=": (train, compose_config([f"ckpt_path={ckpt}", *tiny_overrides(data, out)])),
    }


ENTRY_POINTS = ["evaluate", "calibrate", "robustness", "predict", "export", "soup", "train ckpt_path="]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("which", ["run folder", "checkpoints folder"])
def test_a_folder_as_checkpoint_lists_its_checkpoints_in_every_entry_point(tmp_path, run_folder, entry, which):
    data = make_image_folder(tmp_path / "data", n_train=2, n_test=1)
    given = run_folder if which == "run folder" else run_folder / "checkpoints"
    function, cfg = _entry_points(given, data, tmp_path / "out")[entry]
    with pytest.raises(CheckpointFolderError) as err:
        function(cfg)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "does not exist" not in message
    assert "is a folder" in message
    best, last = run_folder / "checkpoints" / BEST, run_folder / "checkpoints" / "last.ckpt"
    assert f"{best} (best on validation)" in message and f"{last} (the last epoch)" in message
    setting = "ckpts" if entry == "soup" else "ckpt_path"
    assert f"{setting}={best}" in message  # the command to use
    if entry.startswith("train"):
        assert f"resume={given}" in message  # continuing the run is what a training ckpt_path= folder may mean


def test_resume_accepts_a_run_folder_or_its_checkpoints_folder(run_folder):
    from finetune.harness.resume import find_checkpoint

    last = run_folder / "checkpoints" / "last.ckpt"
    assert find_checkpoint(run_folder) == find_checkpoint(run_folder / "checkpoints") == last


def test_a_missing_checkpoint_and_an_empty_folder_say_what_is_there(tmp_path):
    with pytest.raises(PathError, match=r"ckpt_path=.*nothing.ckpt: does not exist"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFolderError, match=r"is a folder.*holds no .ckpt files"):
        load_checkpoint(tmp_path / "empty")


# --- files of other kinds --------------------------------------------------------------------------------------


def _onnx(path: Path) -> Path:
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),), str(path), dynamo=False)
    return path


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")
def test_an_onnx_model_is_named_as_such_with_the_checkpoint_it_came_from(tmp_path):
    model = _onnx(tmp_path / "model.onnx")
    (tmp_path / "model.onnx.json").write_text(json.dumps({"checkpoint": "/runs/a/checkpoints/best.ckpt"}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model)
    message = str(err.value)
    assert "pickled Python objects" not in message and "could run code" not in message
    assert "an exported ONNX model" in message and "ckpt_path=/runs/a/checkpoints/best.ckpt" in message
    renamed = tmp_path / "renamed.ckpt"  # recognised by its content, not only its name
    renamed.write_bytes(model.read_bytes())
    with pytest.raises(CheckpointError, match="an exported ONNX model"):
        load_checkpoint(renamed)
    with pytest.raises(CheckpointError, match="the description of an exported model"):
        load_checkpoint(tmp_path / "model.onnx.json")


def test_a_torchscript_model_a_safetensors_file_and_bare_weights_are_named(tmp_path):
    traced = tmp_path / "model.torchscript.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated upstream
        torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)).save(str(traced))
    with pytest.raises(CheckpointError, match="an exported TorchScript model") as err:
        load_checkpoint(traced)
    assert "pickled Python objects" not in str(err.value)
    bare = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bare network weights.*pretrained_weights="):
        load_checkpoint(bare)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="this is not a checkpoint"):
        load_checkpoint(text)
    if importlib.util.find_spec("safetensors"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        with pytest.raises(CheckpointError, match="a safetensors file"):
            load_checkpoint(tmp_path / "w.safetensors")


def test_a_malicious_pickle_is_still_refused_as_one_whatever_its_name(tmp_path):
    marker = tmp_path / "MARKER"
    for name in ("evil.ckpt", "evil.bin", "evil.data"):
        evil = evil_checkpoint(tmp_path / name, marker)
        with pytest.raises(CheckpointError, match="pickled Python objects"):
            load_checkpoint(evil)
    (tmp_path / "evil.onnx").write_bytes((tmp_path / "evil.ckpt").read_bytes())
    with pytest.raises(CheckpointError):  # never loaded at all
        load_checkpoint(tmp_path / "evil.onnx")
    assert not marker.exists()


def test_resume_of_an_exported_model_says_what_it_is(tmp_path):
    from finetune.harness.resume import find_checkpoint

    traced = tmp_path / "model.torchscript.pt"
    with pytest.warns(FutureWarning):
        torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)).save(str(traced))
    with pytest.raises(CheckpointError, match=r"resume=.*an exported TorchScript model"):
        find_checkpoint(traced)


# --- outputs checked before the work ---------------------------------------------------------------------------

needs_permissions = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@needs_permissions
@pytest.mark.parametrize("how", ["output", "paths.output_dir"])
def test_predict_into_a_read_only_folder_is_refused_before_anything_is_loaded(tmp_path, read_only, how):
    # The checkpoint does not exist: an error about it would mean the output was checked too late.
    images = make_image_folder(tmp_path / "photos", n_train=1, n_test=1)
    extra = [f"output={read_only / 'preds.csv'}"] if how == "output" else []
    out = read_only / "predict" if how == "paths.output_dir" else tmp_path / "out"
    with pytest.raises(PathError) as err:
        predict(predict_config(tmp_path / "missing.ckpt", images, out, *extra))
    message = str(err.value)
    assert message.startswith(f"{how}=") and "not writable" in message and str(read_only) in message
    if how == "output":
        assert message.startswith(f"output={read_only / 'preds.csv'}: ")
    assert "missing.ckpt" not in message and not any(read_only.iterdir())


@needs_permissions
def test_evaluate_and_export_into_a_read_only_folder_are_refused_first(tmp_path, read_only):
    data = make_image_folder(tmp_path / "data", n_train=1, n_test=1)
    with pytest.raises(PathError, match=r"paths.output_dir=.*not writable"):
        evaluate(eval_config(tmp_path / "missing.ckpt", data, read_only / "eval"))
    cfg = compose_config([f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output={read_only / 'm.pt'}"], "export")
    with pytest.raises(PathError, match=r"output=.*not writable"):
        export(cfg)
    assert not any(read_only.iterdir())


def test_an_output_below_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    images = make_image_folder(tmp_path / "photos", n_train=1, n_test=1)
    cfg = predict_config(tmp_path / "missing.ckpt", images, tmp_path / "out", f"output={tmp_path}/notes.txt/p.csv")
    with pytest.raises(PathError, match=r"output=.*notes.txt.* is a file, not a folder"):
        predict(cfg)


COMMANDS = {  # entry point: (its extra arguments, the setting it names) for a read-only folder R
    "finetune.predict": (lambda r, images: [f"inputs={images}", f"output={r / 'preds.csv'}"], "output={r}/preds.csv"),
    "finetune.export": (lambda r, images: ["format=torchscript", f"output={r / 'm.pt'}"], "output={r}/m.pt"),
    "finetune.evaluate": (
        lambda r, images: ["data=folder", f"data.root={images}", f"paths.output_dir={r / 'eval'}"],
        "paths.output_dir={r}/eval",
    ),
}


@pytest.mark.parametrize("module", list(COMMANDS))
def test_a_command_into_a_read_only_folder_stops_before_loading_anything(module):
    """On the command line, as a user without root's override of permissions (``nobody`` when the tests run as
    root). The checkpoint does not exist: an error about it would mean the output was checked too late."""
    with tempfile.TemporaryDirectory() as name:
        shared = Path(name)
        shared.chmod(0o777)  # reachable by nobody
        images = make_image_folder(shared / "photos", n_train=1, n_test=1)
        read_only = shared / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        extra, named = COMMANDS[module]
        args = [f"ckpt_path={shared / 'missing.ckpt'}", *extra(read_only, images), f"paths.log_dir={shared / 'logs'}"]
        command = as_unprivileged(cli_command(args, module))
        (shared / "logs").mkdir()
        (shared / "logs").chmod(0o777)
        env = {**cli_env(), "HOME": str(shared)}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert f"{named.format(r=read_only)}: " in done.stderr and "not writable" in done.stderr, done.stderr
        assert "missing.ckpt: does not exist" not in done.stderr  # refused before the checkpoint was looked at
        assert not any(read_only.iterdir())


# --- an interruption before the first checkpoint -----------------------------------------------------------------


class SlowCaching(pl.Callback):
    """Test-only: each batch of feature extraction lasts ``seconds``, and ``started_file`` appears when it begins."""

    def __init__(self, seconds: float, started_file: str) -> None:
        self.seconds, self.started_file = seconds, Path(started_file)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        def slow(module: torch.nn.Module, args: tuple) -> None:  # the head's input is what the cache extracts
            self.started_file.touch()
            time.sleep(self.seconds)

        pl_module.net.get_submodule(pl_module.head_name).register_forward_pre_hook(slow)


def test_ctrl_c_while_caching_features_says_to_start_again_not_to_resume(tmp_path):
    from finetune.harness.resume import find_checkpoint

    from .test_resume import _popen_training

    data = make_image_folder(tmp_path / "data", n_train=6, n_test=2)
    started = tmp_path / "caching"
    overrides = without(tiny_overrides(data, tmp_path), "paths.output_dir") + [
        "experiment=frozen",
        "features=cached",
        "+callbacks.slow._target_=tests.test_checkpoint_paths.SlowCaching",
        "+callbacks.slow.seconds=0.5",
        f"+callbacks.slow.started_file={started}",
    ]
    process = _popen_training(overrides)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not started.exists():
        time.sleep(0.05)
    assert started.exists(), "feature caching never started"
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 130, output[-3000:]
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    assert json.loads((run / "results.json").read_text())["status"] == "interrupted"
    assert "resume=" not in output and "before its first checkpoint" in output and "start the run again" in output
    with pytest.raises(PathError, match="holds no checkpoints/interrupted.ckpt"):
        find_checkpoint(run)  # what resume= would have said: the advice not to resume is true


def test_the_advice_after_an_interruption_names_what_can_be_resumed(tmp_path):
    from finetune.train import how_to_continue

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert "start the run again" in how_to_continue(run, None) and "resume=" not in how_to_continue(run, None)
    earlier = tmp_path / "earlier" / "checkpoints" / "last.ckpt"
    assert how_to_continue(run, earlier).endswith(f"resume={earlier}")  # a resumed run stopped before saving
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert how_to_continue(run, earlier) == f"Continue with: python -m finetune.train resume={run}"


# --- resume from another working directory ----------------------------------------------------------------------


def _train_in(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return run_cli(args, cwd=cwd)


def test_resume_from_another_folder_reads_the_data_the_run_started_with(tmp_path):
    first_cwd, other_cwd, logs = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "logs"
    make_image_folder(first_cwd / "photos", n_train=4, n_test=2)
    other_cwd.mkdir()
    make_image_folder(other_cwd / "photos", classes=("ant", "bee"), n_train=4, n_test=2)  # same name, other data
    overrides = without(tiny_overrides(Path("photos"), logs), "paths.output_dir", "paths.log_dir", "data.root")
    _train_in(first_cwd, ["data.root=photos", f"paths.log_dir={logs}", "trainer.max_epochs=1", *overrides])
    (run,) = (logs / "runs").iterdir()
    recorded = load_checkpoint(run / "checkpoints" / "last.ckpt")["datamodule_hyper_parameters"]["root"]
    assert recorded == str(first_cwd / "photos")  # the checkpoint says where its data was

    done = _train_in(other_cwd, [f"resume={run}", "trainer.max_epochs=2"])
    assert f"data.root={first_cwd / 'photos'}" in done.stdout  # the inherited override, anchored
    (resumed,) = (p for p in (logs / "runs").iterdir() if p != run)
    results = json.loads((resumed / "results.json").read_text())
    assert results["status"] == "completed" and results["epochs"] == 2
    last = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert last[CLASSES] == ["cat", "dog"]  # not elsewhere/photos' ant and bee
    assert last["datamodule_hyper_parameters"]["root"] == str(first_cwd / "photos")


def test_resume_anchors_relative_path_settings_of_the_config_too(tmp_path):
    from finetune.harness.resume import with_run_overrides

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    (run / ".hydra" / "overrides.yaml").write_text("- data.root=photos\n- model.backbone=resnet18\n")
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    cwd: /started/here\n")
    (run / ".hydra" / "config.yaml").write_text(
        "paths:\n  data_dir: data\n  log_dir: logs\ndata:\n  root: photos\n  cache_dir: ${paths.data_dir}/cache\n"
        "pretrained_weights: imagenet\n"
    )
    argv = with_run_overrides(["train.py", f"resume={run}"])
    assert argv == [
        "train.py",
        "data.root=/started/here/photos",
        "model.backbone=resnet18",
        "paths.data_dir=/started/here/data",  # the d2l set's default data.root is ${paths.data_dir}/hotdog
        f"resume={run}",
    ]


# --- evaluate without data settings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def _bare_eval(ckpt: Path, out: Path, *extra: str):
    """``finetune.evaluate ckpt_path=CKPT`` with no data= and no data.root=: only CPU and loader settings."""
    args = [f"ckpt_path={ckpt}", f"paths.output_dir={out}", "trainer.accelerator=cpu", "data.num_workers=0", *extra]
    return compose_config(args, "eval")


def test_evaluate_without_data_settings_uses_the_data_the_checkpoint_was_trained_on(trained, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.harness.checkpoint_data"):
        results = evaluate(_bare_eval(trained["best_checkpoint"], tmp_path / "eval"))
    assert results["classes"] == ["cat", "dog"]  # the tiny folder's, not the d2l hot dogs (no download tried)
    assert results["test/acc"] == pytest.approx(trained["test/acc"])
    assert f"No data settings given: using the data {trained['best_checkpoint']} was trained on" in caplog.text
    assert f"data.root={trained['root']}" in caplog.text


def test_evaluate_data_root_on_the_command_line_wins_over_the_recorded_one(trained, tmp_path):
    other = make_image_folder(tmp_path / "hotdogs", n_train=1, n_test=1, classes=("hot_dog", "not_hot_dog"))
    with pytest.raises(UserError, match=r"has \['hot_dog', 'not_hot_dog'\]"):
        evaluate(_bare_eval(trained["best_checkpoint"], tmp_path / "eval", f"data.root={other}"))


def test_evaluate_without_data_settings_when_the_recorded_data_is_gone_says_so(trained, tmp_path):
    checkpoint = torch.load(trained["best_checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["root"] = str(tmp_path / "moved")
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    with pytest.raises(PathError, match=r"No data.root given.*data.root=.*moved, is nothing now.*data=folder"):
        evaluate(_bare_eval(moved, tmp_path / "eval"))
