"""Every file appears whole or not at all, and a full disk is one error naming the folder.

The full disk is real, never simulated: a small tmpfs mounted in a private mount namespace (``unshare``; skipped
where the machine does not allow it), or a file size limit (``RLIMIT_FSIZE``: a write past it fails with ``EFBIG``,
on any Linux, without privileges).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from finetune import atomic
from finetune.errors import DiskFullError, UserError
from finetune.harness.checkpointing import AtomicCheckpointIO
from finetune.run import build_trainer

from .conftest import REPO, cli_command, cli_env, compose_config, make_image_folder, tiny_overrides
from .inference import trained_run

MiB = 1 << 20


def leftovers(folder: Path) -> list[str]:
    """Temporary files of this module's writers left in ``folder`` (and below)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


# --- the writer itself ---------------------------------------------------------------------------------------------
def test_a_write_that_fails_midway_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    atomic.write_json(target, {"status": "completed"})
    with pytest.raises(ZeroDivisionError), atomic.atomic_write(target, "w") as file:
        file.write('{"status": "fai')
        raise ZeroDivisionError("the writer's own bug, half-way through")
    assert json.loads(target.read_text()) == {"status": "completed"}
    assert leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # a value JSON cannot hold: refused before anything is written
        atomic.write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"status": "completed"}
    assert leftovers(tmp_path) == []


def test_a_new_file_is_created_with_its_folder_and_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "deep" / "er" / "table.csv"
    atomic.write_text(target, "a,b\n1,2\n")
    atomic.write_text(target, "a,b\n3,4\n")
    assert target.read_text() == "a,b\n3,4\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_staged_files_move_together_or_not_at_all(tmp_path):
    (tmp_path / "model.pt").write_text("old model")
    (tmp_path / "model.pt.json").write_text("old description")
    with pytest.raises(RuntimeError), atomic.staged_files(tmp_path, last="model.pt.json") as staging:
        (staging / "model.pt").write_text("new model")
        raise RuntimeError("the parity check failed")
    assert (tmp_path / "model.pt").read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]
    with atomic.staged_files(tmp_path, last="model.pt.json") as staging:
        (staging / "model.pt").write_text("new model")
        (staging / "model.pt.json").write_text("new description")
    assert (tmp_path / "model.pt").read_text() == "new model"
    assert (tmp_path / "model.pt.json").read_text() == "new description"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]
    with pytest.raises(UserError, match="appeared while this command ran"):  # overwrite=false: the other one's stay
        with atomic.staged_files(tmp_path, last="model.pt.json", replace=False) as staging:
            (staging / "model.pt").write_text("third model")
            (staging / "model.pt.json").write_text("third description")
    assert (tmp_path / "model.pt").read_text() == "new model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


# --- a real full disk ---------------------------------------------------------------------------------------------
# A script that writes GOOD into TARGET, then tries to replace it with a bigger payload through WRITER, and reports.
FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from finetune import atomic
    target, writer = Path(sys.argv[1]), sys.argv[2]
    good = b"good" * 1000
    atomic.write_bytes(target, good)
    limit = int(sys.argv[3])
    if limit:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    big = b"x" * (8 << 20)
    try:
        if writer == "bytes":
            atomic.write_bytes(target, big)
        elif writer == "torch":
            atomic.torch_save({"weights": torch.zeros(2 << 20)}, target)
        else:
            from finetune.harness.checkpointing import AtomicCheckpointIO
            AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2 << 20)}}, target)
        error = None
    except BaseException as err:
        error = {"type": type(err).__name__, "message": str(err), "user_error": isinstance(err, atomic.DiskFullError)}
    print(json.dumps({"error": error, "intact": target.read_bytes() == good,
                      "files": sorted(p.name for p in target.parent.iterdir())}))
    """
)


def tmpfs_available() -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()[:200]}"
    return None


def on_small_disk(folder: Path, size: str, command: list[str], keep: Path | None = None, setup: str = "") -> list[str]:
    """``command`` run where ``folder`` is a fresh tmpfs of ``size`` (private to the command); ``setup``: shell
    commands run there first; ``keep``: what was left there is copied to this folder afterwards, for the test to
    look at."""
    reason = tmpfs_available()
    if reason:
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    copy = f'rm -f "$0/filler"; cp -a "$0/." "{keep}/"; ' if keep else ""
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" || exit 99; {setup}"$@"; rc=$?; {copy}exit $rc'
    return ["unshare", "-rm", "sh", "-c", script, str(folder), *command]


@pytest.mark.parametrize("writer", ["bytes", "torch", "checkpoint_io"])
@pytest.mark.parametrize("limit", ["tmpfs", "file_size"])
def test_a_full_disk_keeps_the_earlier_file_whole_and_names_the_folder(tmp_path, writer, limit):
    folder = tmp_path / "disk"
    command = [sys.executable, "-c", FULL_DISK_SCRIPT, str(folder / "last.ckpt"), writer]
    if limit == "tmpfs":
        command = on_small_disk(folder, "2m", [*command, "0"])
    else:
        folder.mkdir()
        command = [*command, str(1 * MiB)]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] is not None, "the write should not fit"
    assert report["error"]["type"] == "DiskFullError" and report["error"]["user_error"], report
    assert str(folder) in report["error"]["message"] and "last.ckpt" in report["error"]["message"]
    expected = "File too large" if limit == "file_size" else "No space left on the disk holding"
    assert report["error"]["message"].startswith(expected), report["error"]["message"]
    assert report["intact"], "the earlier last.ckpt was damaged"
    assert report["files"] == ["last.ckpt"], "a temporary or partial file was left behind"


def test_disk_full_error_is_recognised_through_chained_errors_and_is_a_user_error(tmp_path):
    try:
        try:
            raise OSError(28, "No space left on device", str(tmp_path / "metrics.csv"))
        except OSError as err:
            raise RuntimeError("the logger failed") from err
    except RuntimeError as err:
        full = atomic.disk_full_error(err, whole=False)
    assert isinstance(full, DiskFullError) and isinstance(full, UserError) and isinstance(full, OSError)
    assert repr(str(tmp_path)) in str(full) and "nothing incomplete" not in str(full)
    assert atomic.disk_full_error(ValueError("a bug"), tmp_path / "x") is None
    assert atomic.disk_full_error(OSError(13, "Permission denied", "x")) is None


# --- Lightning's checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "trainer_overrides",
    [
        [],
        ["trainer.strategy=ddp", "trainer.devices=1"],
        ["trainer.precision=bf16-mixed"],
        ["trainer.precision=16-true"],
    ],
)
def test_every_trainer_saves_checkpoints_atomically_whatever_the_strategy_and_precision(tmp_path, trainer_overrides):
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "out"), *trainer_overrides])
    trainer = build_trainer(cfg)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    if trainer_overrides and "precision" in trainer_overrides[0]:
        assert trainer.precision == trainer_overrides[0].split("=")[1]  # the precision plugin is untouched


def test_a_checkpoint_io_the_config_chose_is_kept(tmp_path):
    class Mine(TorchCheckpointIO):
        pass

    trainer = pl.Trainer(accelerator="cpu", logger=False, plugins=[Mine()], enable_progress_bar=False)
    from finetune.harness.checkpointing import use_atomic_checkpoints

    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is Mine


class FillTheDisk(pl.Callback):
    """Test-only: after the first epoch's checkpoints, leave ``leave_bytes`` of room for the files the run writes:
    ``how=tmpfs`` fills the (small) disk of the run folder, ``how=file_size`` sets the process's file size limit."""

    def __init__(self, how: str, leave_bytes: int) -> None:
        self.how, self.leave = how, int(leave_bytes)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 1:
            return
        folder = Path(trainer.default_root_dir)
        if self.how == "file_size":
            resource.setrlimit(resource.RLIMIT_FSIZE, (max(self.leave, 1), resource.RLIM_INFINITY))
            return
        free = shutil.disk_usage(folder).free
        fd = os.open(folder.parent / "filler", os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, max(free - self.leave, 1))
        finally:
            os.close(fd)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["file_size", "tmpfs"])
@pytest.mark.parametrize("room", ["half a checkpoint", "nothing"])
def test_a_run_that_fills_the_disk_ends_in_one_error_and_keeps_its_last_good_checkpoint(tmp_path, how, room):
    root = make_image_folder(tmp_path / "data", n_train=6, n_test=2)
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    kept.mkdir()
    run = disk / "run" if how == "tmpfs" else kept / "run"
    checkpoint_bytes = 6 * MiB  # mobilenet_v3_small with a 2-class head: about 6 MB
    leave = checkpoint_bytes // 2 if room == "half a checkpoint" else (0 if how == "tmpfs" else 1)
    overrides = [
        *tiny_overrides(root, run),
        "model.backbone=mobilenet_v3_small",
        "trainer.max_epochs=3",
        "calibrate=false",
        f"+callbacks.fill._target_={__name__}.FillTheDisk",
        f"+callbacks.fill.how={how}",
        f"+callbacks.fill.leave_bytes={leave}",
    ]
    command = cli_command(overrides)
    if how == "tmpfs":
        command = on_small_disk(disk, "40m", command, keep=kept)
    done = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    out = kept / "run"
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-4000:]
    message = errors[0]
    assert str(run / "checkpoints") in message or str(run) in message, message
    assert ("No space left" if how == "tmpfs" else "File too large") in message
    assert leftovers(out) == [], "a temporary file was left behind"
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0, "last.ckpt is not the first epoch's whole checkpoint"
    for ckpt in (out / "checkpoints").glob("*.ckpt"):  # every checkpoint there is whole
        torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not (out / "checkpoints" / "interrupted.ckpt").exists()
    if room == "half a checkpoint":
        results = json.loads((out / "results.json").read_text())
        assert results["status"] == "failed" and "DiskFullError" in results["error"]
    else:
        log = (out / "train.log").read_text() if (out / "train.log").is_file() else ""
        said = done.stdout + done.stderr + log
        assert not (out / "results.json").exists() or json.loads((out / "results.json").read_text())
        if not (out / "results.json").exists():
            assert "results.json either" in said, said[-3000:]


@pytest.mark.slow
def test_an_export_that_does_not_fit_keeps_the_earlier_model_and_its_description(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)  # resnet18: a TorchScript file of about 45 MB
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    kept.mkdir()
    setup = 'echo "earlier model" > "$0/model.pt"; echo "its description" > "$0/model.pt.json"; '
    args = [f"ckpt_path={run['best_checkpoint']}", "format=torchscript", f"output={disk}/model.pt", "overwrite=true"]
    command = on_small_disk(
        disk, "8m", cli_command([*args, f"hydra.run.dir={tmp_path}/run"], "finetune.export"), kept, setup
    )
    done = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        done.stderr.strip().splitlines()[-1].startswith(f"Error: No space left on the disk holding '{disk}': model.pt")
    )
    assert "Traceback" not in done.stderr
    assert (kept / "model.pt").read_text() == "earlier model\n"
    assert (kept / "model.pt.json").read_text() == "its description\n"
    assert sorted(p.name for p in kept.iterdir()) == ["model.pt", "model.pt.json"]


@pytest.mark.slow
def test_shards_that_do_not_fit_leave_an_empty_output_and_one_error(tmp_path):
    pytest.importorskip("litdata", reason="finetune.shards needs litdata: pip install -e '.[shards]'")
    root = make_image_folder(tmp_path / "data", n_train=150, n_test=50)  # about 3 MB of images
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    kept.mkdir()
    args = ["data=folder", f"data.root={root}", f"output={disk}/shards", "chunk_bytes=100KB", "num_workers=1"]
    command = on_small_disk(disk, "1m", cli_command([*args, f"hydra.run.dir={tmp_path}/run"], "finetune.shards"), kept)
    done = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line[line.index("Error: ") :] for line in done.stderr.splitlines() if "Error: " in line]
    assert errors == [errors[0]] and errors[0].startswith(f"Error: No space left on the disk holding '{disk}/shards'")
    assert list((kept / "shards").iterdir()) == []  # no manifest, no split, no staging folder
