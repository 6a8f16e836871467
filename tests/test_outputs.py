"""No command writes over its own input or inside the data it reads, with overwrite=true or not, through links too.

Each command is refused before it reads or writes anything; the inputs are left byte for byte as they were.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.calibrate import calibrate
from finetune.errors import SettingError
from finetune.export import export
from finetune.harness.writable import check_apart, overlap
from finetune.predict import predict
from finetune.robustness import robustness
from finetune.shards import shards
from finetune.soup import soup
from finetune.train import train

from .conftest import REPO, compose_config, make_image_folder, run_cli, start_cli, tiny_overrides
from .inference import predict_config, trained_run

spec = importlib.util.spec_from_file_location("val_split_folder", REPO / "scripts" / "val_split_folder.py")
val_split_folder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(val_split_folder)

CHECKPOINT_BYTES = b"a checkpoint's bytes: refused before anything reads them"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "runs" / "best.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(CHECKPOINT_BYTES)
    return path


# --- the rule -----------------------------------------------------------------------------------------------------
def test_overlap_sees_through_links_and_hard_links(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=1, n_test=1)
    (tmp_path / "link").symlink_to(data / "train")
    os.link(data / "test" / "cat" / "cat_000.png", tmp_path / "hard.png")
    assert overlap(data, data) == "is"
    assert overlap(tmp_path / "link", data / "train") == "is"
    assert overlap(tmp_path / "hard.png", data / "test" / "cat" / "cat_000.png") == "is"
    assert overlap(tmp_path / "link" / "shards", data) == "inside"  # not there yet: the existing part is followed
    assert overlap(data / "train" / "new" / "deeper", data) == "inside"
    assert overlap(tmp_path, data / "train") == "holds"
    assert overlap(tmp_path / "elsewhere", data) is None
    assert overlap(tmp_path / "data2", data) is None  # a name that starts like the data's is not inside it


def test_check_apart_names_both_settings(tmp_path):
    with pytest.raises(SettingError) as refused:
        check_apart({"output=A": tmp_path / "a" / "b"}, {"data.root=A": tmp_path / "a"})
    assert str(refused.value).startswith("output=A is inside data.root=A, which this command reads")
    check_apart({"output=B": tmp_path / "b"}, {"data.root=A": tmp_path / "a", "ckpts": [tmp_path / "c"]})


# --- each command -------------------------------------------------------------------------------------------------
def export_config(ckpt: Path, output: Path, *extra: str):
    overrides = [f"ckpt_path={ckpt}", f"output={output}", "format=torchscript", *extra]
    return compose_config(overrides, config_name="export")


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_export_never_writes_over_its_checkpoint(tmp_path, checkpoint, overwrite):
    link = tmp_path / "model.pt"
    link.symlink_to(checkpoint)
    os.link(checkpoint, tmp_path / "hard.pt")
    described = tmp_path / "model2.pt.json"  # a checkpoint where the export's description would go
    described.write_bytes(CHECKPOINT_BYTES)
    for ckpt, output in [
        (checkpoint, checkpoint),
        (checkpoint, link),
        (checkpoint, tmp_path / "hard.pt"),
        (described, tmp_path / "model2.pt"),
    ]:
        with pytest.raises(SettingError) as refused:
            export(export_config(ckpt, output, f"overwrite={overwrite}"))
        message = str(refused.value)
        assert f"output={output}" in message and f"ckpt_path={ckpt}" in message, message
        assert "itself" in message
    assert checkpoint.read_bytes() == described.read_bytes() == CHECKPOINT_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.pt", "model.pt", "model2.pt.json", "runs"]


def test_export_to_a_folder_is_refused_before_the_work(tmp_path, checkpoint):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder: pass output= a file name"):
        export(export_config(checkpoint, tmp_path / "out", "overwrite=true"))


def test_predict_never_writes_into_its_inputs_or_over_its_checkpoint(tmp_path, checkpoint):
    photos = make_image_folder(tmp_path / "photos", n_train=1, n_test=1)
    before = snapshot(photos)
    for output in (photos / "test" / "predictions.csv", photos / "predictions.json"):
        with pytest.raises(SettingError) as refused:
            predict(predict_config(checkpoint, photos, tmp_path / "out", f"output={output}"))
        assert f"output={output} is inside inputs={photos}" in str(refused.value)
    link = tmp_path / "predictions.csv"
    link.symlink_to(checkpoint)  # an output name that is the checkpoint through a link
    with pytest.raises(SettingError, match=f"is ckpt_path={checkpoint} itself"):
        predict(predict_config(checkpoint, photos, tmp_path / "out", f"output={link}", "overwrite=true"))
    assert snapshot(photos) == before and checkpoint.read_bytes() == CHECKPOINT_BYTES


def test_soup_and_calibrate_never_write_over_a_checkpoint_they_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("soup.ckpt", "calibrated.ckpt", "other.ckpt"):
        (out / name).write_bytes(CHECKPOINT_BYTES)
    with pytest.raises(SettingError, match=r"\(its soup.ckpt\) is ckpts \(.*soup.ckpt\) itself"):
        soup(
            compose_config(
                ["method=uniform", f"ckpts=[{out}/soup.ckpt,{out}/other.ckpt]", f"paths.output_dir={out}"], "soup"
            )
        )
    with pytest.raises(SettingError, match=rf"\(its calibrated.ckpt\) is ckpt_path={out}/calibrated.ckpt itself"):
        calibrate(compose_config([f"ckpt_path={out}/calibrated.ckpt", f"paths.output_dir={out}"], "calibrate"))
    assert all((out / name).read_bytes() == CHECKPOINT_BYTES for name in ("soup.ckpt", "calibrated.ckpt"))
    assert sorted(p.name for p in out.iterdir()) == ["calibrated.ckpt", "other.ckpt", "soup.ckpt"]  # no claim


def shards_config(root: Path, output: Path, *extra: str):
    return compose_config(["data=folder", f"data.root={root}", f"output={output}", *extra], config_name="shards")


def test_shards_are_never_written_into_the_image_folder_they_read(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=2, n_test=1)
    (tmp_path / "link").symlink_to(root / "train")
    before = snapshot(root)
    for output, relation in [
        (root / "train" / "shards", "is inside"),
        (tmp_path / "link" / "shards", "is inside"),
        (root, "is data.root"),
        (tmp_path, "holds data.root"),
    ]:
        with pytest.raises(SettingError) as refused:
            shards(shards_config(root, output, "overwrite=true"))
        assert str(refused.value).startswith(f"output={output} {relation}"), str(refused.value)
        assert f"data.root={root}" in str(refused.value)
    assert snapshot(root) == before and not (tmp_path / "link" / "shards").exists()


@pytest.mark.slow
def test_the_shards_command_refuses_an_output_inside_the_data_in_one_line(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=2, n_test=1)
    before = snapshot(root)
    done = run_cli(
        ["data=folder", f"data.root={root}", f"output={root}/train/shards", f"hydra.run.dir={tmp_path}/run"],
        module="finetune.shards",
        check=False,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: output={root}/train/shards is inside data.root")
    assert "Traceback" not in done.stderr and snapshot(root) == before


def test_the_validation_folder_is_never_written_into_the_data(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=1)
    before = snapshot(root)
    with pytest.raises(SettingError, match=f"is inside data.root={root}"):
        val_split_folder.write_val_folder(root / "train" / "val", ["data=folder", f"data.root={root}"])
    with pytest.raises(SystemExit) as ended:
        val_split_folder.main([str(root / "val"), "data=folder", f"data.root={root}"])
    assert ended.value.code == 2 and "Error: the output folder" in capsys.readouterr().err
    assert snapshot(root) == before


def test_a_disk_cache_inside_the_class_folders_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=2)
    cache = root / "train" / "cache"
    cfg = compose_config([*tiny_overrides(root, tmp_path / "run"), "data.cache=disk", f"data.cache_dir={cache}"])
    with pytest.raises(SettingError, match=rf"data.cache_dir={cache} is inside '{root}/train'"):
        train(cfg)
    assert not cache.exists()


@pytest.mark.slow
def test_robustness_keeps_its_shifted_copies_and_results_out_of_the_test_folder(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    root = run["root"]
    before = snapshot(root)
    base = [
        f"ckpt_path={run['best_checkpoint']}",
        "data=folder",
        f"data.root={root}",
        "shifts=[jpeg]",
        "severities=[1]",
    ]
    cases = [
        ([f"shift_cache={root}/test/shifted", f"paths.output_dir={tmp_path}/rob1"], "shift_cache="),
        ([f"paths.output_dir={root}/test/rob2"], "paths.output_dir="),
    ]
    for extra, named in cases:
        with pytest.raises(SettingError) as refused:
            robustness(compose_config([*base, *extra], config_name="robustness"))
        assert str(refused.value).startswith(named) and f"data.root={root} (its test/)" in str(refused.value)
    assert (
        snapshot(root) == before and not (root / "test" / "shifted").exists() and not (root / "test" / "rob2").exists()
    )


# --- odd outputs ----------------------------------------------------------------------------------------------------
def test_shards_under_a_file_are_refused_by_name_before_the_work(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=2, n_test=1)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match=r"output=.*a_file/shards: '.*a_file' is a file, not a folder"):
        shards(shards_config(root, tmp_path / "a_file" / "shards"))


def wait_for(path_glob: str, folder: Path, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if list(folder.glob(path_glob)):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_ctrl_c_while_shards_are_written_leaves_nothing_and_exits_130(tmp_path):
    pytest.importorskip("litdata", reason="finetune.shards needs litdata: pip install -e '.[shards]'")
    # 3,000 training images: the write takes seconds (its writers fork), time for the signal to arrive inside it
    root = make_image_folder(tmp_path / "data", n_train=1500, n_test=50)
    output = tmp_path / "shards"
    args = ["data=folder", f"data.root={root}", f"output={output}", "chunk_bytes=100KB", "num_workers=1"]
    args.append("data.verify_images=false")  # the images are known good: straight to the write
    process = start_cli([*args, f"hydra.run.dir={tmp_path}/run"], module="finetune.shards")
    assert wait_for(".writing.*/train", output), "the shards never started"
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the shards were written before the signal arrived")
    assert process.returncode == 130, out[-3000:]
    assert f"Interrupted: nothing was written to {output}" in out
    assert sorted(p.name for p in output.iterdir()) == []  # no staging folder, no half-written split
    done = run_cli([*args, f"hydra.run.dir={tmp_path}/again"], module="finetune.shards")  # the same command works
    assert (output / "manifest.json").is_file(), done.stdout[-2000:]


@pytest.mark.slow
def test_the_staging_folder_of_a_killed_shards_write_is_removed_by_the_next_one(tmp_path):
    pytest.importorskip("litdata", reason="finetune.shards needs litdata: pip install -e '.[shards]'")
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=1)
    output = tmp_path / "shards"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = output / f".writing.{socket.gethostname()}.{int(ended.stdout)}.tmp"  # a writer that is gone (kill -9)
    (dead / "train").mkdir(parents=True)
    (dead / "train" / "chunk-0-0.bin").write_bytes(b"half a chunk")
    shards(shards_config(root, output, "num_workers=1", "data.val_fraction=0.4"))
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "test", "train", "val"]
