"""The data folder as a user fills it: phone photos' EXIF orientation, run folders inside the data, duplicate and
leaked images, training without a test split, and the folds advice for a tiny class."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import ImageFolderDataModule, folders, verify
from finetune.data.images import load_rgb
from finetune.errors import DataError, PathError, SettingError
from finetune.export import export
from finetune.predict import predict
from finetune.run import check_output_outside_data
from finetune.train import train

from .conftest import compose_config, make_image_folder, tiny_overrides
from .inference import predict_config, trained_run
from .test_export import SANDBOX, export_config, needs_onnx, onnx_snippet

ORIENTATION = 0x0112


def save_sideways(upright: Path, target: Path) -> None:
    """``upright``'s pixels as a phone stores a portrait shot: turned 90 degrees, with EXIF Orientation=6 (rotate
    90 degrees clockwise to show)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    with Image.open(upright) as image:
        image.transpose(Image.Transpose.ROTATE_90).save(target, exif=exif)
    with Image.open(target) as check:
        assert check.getexif()[ORIENTATION] == 6 and check.size == image.size[::-1]


def sideways_copy(root: Path, target: Path, images: list[str]) -> Path:
    """A copy of the image folder ``root`` whose ``images`` (relative paths) are stored sideways with EXIF."""
    shutil.copytree(root, target)
    for relative in images:
        save_sideways(root / relative, target / relative)
    return target


def _datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "val_fraction": 0.2, "image_size": 32, "resize_size": 36, **kwargs}
    dm = ImageFolderDataModule(root, **kwargs)
    dm.setup("fit")
    dm.setup("test")
    return dm


# --- EXIF orientation --------------------------------------------------------------------------------------------
def test_the_loader_turns_an_orientation_6_photo_upright(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, size=(30, 44, 3), dtype=np.uint8)  # landscape, asymmetric
    Image.fromarray(pixels).save(tmp_path / "upright.png")
    save_sideways(tmp_path / "upright.png", tmp_path / "phone.png")
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "phone.png"))), pixels)
    # a JPEG, as phones write them: upright size, also when only checked (decoded at 1/8 scale)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert load_rgb(str(tmp_path / "phone.jpg")).size == (44, 30)
    assert load_rgb(str(tmp_path / "phone.jpg"), draft=True).size == (6, 4)


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_train_val_and_test_see_a_sideways_photo_as_its_upright_pixels(tmp_path, cache):
    upright = make_image_folder(tmp_path / "upright", n_train=5, n_test=2)
    phone = sideways_copy(
        upright, tmp_path / "phone", [f"train/{n}/{n}_{i:03d}.png" for n in ("cat", "dog") for i in range(5)]
    )
    save_sideways(upright / "test/cat/cat_000.png", phone / "test/cat/cat_000.png")
    a = _datamodule(upright, augmentation=None, cache=cache)
    b = _datamodule(phone, augmentation=None, cache=cache)
    for split in ("train_set", "val_set", "test_set"):
        first, second = getattr(a, split), getattr(b, split)
        assert len(first) == len(second) > 0
        for i in range(len(first)):
            assert torch.equal(first[i][0], second[i][0]), (split, i)


def test_predict_and_the_onnx_snippet_score_a_sideways_photo_as_its_upright_pixels(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    upright = tmp_path / "photos"
    upright.mkdir()
    shutil.copy(run["root"] / "test/cat/cat_000.png", upright / "a.png")
    save_sideways(upright / "a.png", upright / "b.png")
    rows = predict(predict_config(run["best_checkpoint"], upright, tmp_path / "predict"))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png"]
    assert [r["cat"] for r in rows] == pytest.approx([rows[0]["cat"]] * 2, abs=1e-6)

    needs_onnx()

    model = export(export_config(run["best_checkpoint"], tmp_path / "onnx", "format=onnx"))
    assert (
        "EXIF orientation applied"
        in json.loads(model.with_name(model.name + ".json").read_text())["input"]["preprocessing"]
    )
    snippet = tmp_path / "use_onnx.py"
    snippet.write_text(onnx_snippet())
    command = [
        sys.executable,
        "-I",
        "-c",
        SANDBOX,
        str(snippet),
        str(model),
        str(upright / "a.png"),
        str(upright / "b.png"),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    assert printed[0]["probabilities"]["cat"] == pytest.approx(printed[1]["probabilities"]["cat"], abs=1e-5)
    assert printed[0]["probabilities"]["cat"] == pytest.approx(rows[0]["cat"], abs=1e-4)


# --- run folders inside the data -----------------------------------------------------------------------------------
def fake_run_folder(folder: Path, marker: str = "results.json") -> Path:
    """What a run leaves: its marker file (or .hydra/), and figures that look like images."""
    folder.mkdir(parents=True)
    if marker == ".hydra":
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("[]\n")
    else:
        (folder / marker).write_text("{}")
    Image.new("RGB", (40, 30), "white").save(folder / "confusion_matrix.png")
    (folder / "checkpoints").mkdir()
    Image.new("RGB", (40, 30), "black").save(folder / "checkpoints" / "looks_like_an_image.png")
    return folder


def test_a_run_folder_inside_the_data_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=2)
    clean = _datamodule(root)
    inside = fake_run_folder(root / "train" / "cat" / "run1")
    beside = fake_run_folder(root / "train" / "run2", marker=".hydra")  # hydra.run.dir=D/train/run2
    tested = fake_run_folder(root / "test" / "dog" / "eval", marker="eval_results.json")
    with caplog.at_level("WARNING", logger="finetune.data.folders"):
        dm = _datamodule(root)
    assert dm.classes == ["cat", "dog"]
    for split in ("train_set", "val_set", "test_set"):
        assert len(getattr(dm, split)) == len(getattr(clean, split))
    samples = dm.test_set.samples + dm.train_set.dataset.samples
    assert not [path for path, _ in samples if Path(path).name in ("confusion_matrix.png", "looks_like_an_image.png")]
    warned = " ".join(r.getMessage() for r in caplog.records if "run folder" in r.getMessage())
    for folder in (inside, beside, tested):
        assert str(folder) in warned


def test_the_run_folder_markers_are_the_names_run_folders_use():
    from finetune.data.folders import RUN_FOLDER_MARKERS
    from finetune.harness import run_folder

    assert set(RUN_FOLDER_MARKERS) == {run_folder.HYDRA, run_folder.CLAIM, run_folder.RESULTS, run_folder.EVAL_RESULTS}


@pytest.mark.parametrize("where", ["train/cat/run1", "test/run1", "train"])
def test_a_run_whose_folder_is_inside_the_data_is_refused_naming_the_settings(tmp_path, where):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=2)
    output = root / where
    cfg = compose_config(["trainer.max_epochs=1", *tiny_overrides(root, output)])
    with pytest.raises(SettingError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "hydra.run.dir / paths.output_dir" in message and f"data.root={str(root)!r}" in message
    assert str(output) in message
    # beside train/ and test/ is fine, as is a relative data.root resolved to the same folder
    check_output_outside_data(compose_config(tiny_overrides(root, root / "runs" / "one")), _datamodule(root))


def test_evaluating_a_plain_class_folder_refuses_a_run_folder_inside_it(tmp_path):
    root = make_image_folder(tmp_path / "photos", n_train=0, n_test=2) / "test"
    dm = ImageFolderDataModule(root, num_workers=0, image_size=32, resize_size=36, test_only=True)
    with pytest.raises(SettingError, match="inside"):
        check_output_outside_data(compose_config(tiny_overrides(root, root / "cat" / "eval")), dm)


# --- duplicate and leaked images ---------------------------------------------------------------------------------
def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_test_image_copied_into_train_and_an_image_in_two_classes_are_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=2)
    shutil.copy(root / "test/cat/cat_000.png", root / "train/cat/leaked.png")
    shutil.copy(root / "train/cat/cat_001.png", root / "train/dog/mislabelled.png")
    shutil.copy(root / "train/dog/dog_002.png", root / "train/dog/again.png")
    with caplog.at_level("WARNING", logger="finetune.data.folders"):
        _datamodule(root)  # data.duplicates=warn: the run goes on
    said = warnings_of(caplog)
    assert "1 test image(s) are byte-identical copies of training images" in said
    assert "test/cat/cat_000.png == train/cat/leaked.png" in said
    assert "1 image(s) are in more than one class" in said
    assert "train/cat/cat_001.png == train/dog/mislabelled.png" in said
    assert "stored more than once in the same class" in said and "train/dog/again.png == train/dog/dog_002.png" in said

    with pytest.raises(DataError) as refused:
        _datamodule(root, duplicates="refuse")
    for listing in (
        "test/cat/cat_000.png == train/cat/leaked.png",
        "train/cat/cat_001.png == train/dog/mislabelled.png",
    ):
        assert listing in str(refused.value)
    assert "data.duplicates=warn" in str(refused.value)

    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune.data.folders"):
        _datamodule(root, duplicates="ignore")
    assert "byte-identical" not in warnings_of(caplog)


def test_a_clean_folder_says_nothing_and_only_files_of_a_shared_size_are_read(tmp_path, caplog, monkeypatch):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=2)
    with caplog.at_level("WARNING", logger="finetune.data.folders"):
        _datamodule(root, duplicates="refuse")
    assert "byte-identical" not in warnings_of(caplog) and "more than once" not in warnings_of(caplog)

    (root / "train/cat/big.png").write_bytes((root / "train/cat/cat_000.png").read_bytes() + b"\0" * 100_000)
    same_size = bytearray((root / "train/cat/cat_000.png").read_bytes())
    same_size[-1] ^= 1  # the same size, other bytes: read, and not a duplicate
    (root / "test/dog/same_size.png").write_bytes(bytes(same_size))
    hashed = []
    real = verify.file_digest
    monkeypatch.setattr(verify, "file_digest", lambda path, algorithm: hashed.append(path) or real(path, algorithm))
    layout, _ = folders.scan_image_folder(root)
    assert verify.find_duplicates(layout) == []
    sizes = [p.stat().st_size for p in root.rglob("*.png")]
    assert all(sizes.count(os.path.getsize(path)) > 1 for path in hashed)
    assert str(root / "train/cat/big.png") not in hashed
    assert {str(root / "train/cat/cat_000.png"), str(root / "test/dog/same_size.png")} <= set(hashed)


def test_an_unknown_duplicates_setting_is_refused():
    with pytest.raises(SettingError, match=r"data.duplicates must be one of warn, refuse, ignore"):
        ImageFolderDataModule.check_settings({"root": "x", "duplicates": "maybe"})


# --- training without a test split -------------------------------------------------------------------------------
def test_a_run_that_never_tests_trains_on_a_folder_without_test(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=1)
    shutil.rmtree(root / "test")
    overrides = ["trainer.max_epochs=1", *tiny_overrides(root, tmp_path / "run")]
    results = train(compose_config(["test_after_fit=false", *overrides]))
    assert results["status"] == "completed", results.get("error")
    assert results["best_checkpoint"] and "test/acc" not in {k for k, v in results.items() if v is not None}

    with pytest.raises(PathError, match=r"has no test/ folder .*test_after_fit=false"):
        train(compose_config(tiny_overrides(root, tmp_path / "tested")))
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.2, image_size=32, require_test=False)
    dm.setup("fit")
    with pytest.raises(PathError, match="has no test/ folder to test on"):
        dm.setup("test")


# --- the folds advice ------------------------------------------------------------------------------------------
def test_the_folds_advice_for_a_small_class_is_one_that_works(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=4, n_test=1)
    for extra in ("cat_001.png", "cat_002.png", "cat_003.png"):
        (root / "train/cat" / extra).unlink()  # cat: 1 training image
    with pytest.raises(DataError) as refused:
        _datamodule(root, folds=3, fold=0)
    message = str(refused.value)
    assert "('cat': 1 training image(s))" in message and "data.folds <=" not in message
    assert "at least 2 images in each class" in message and "add images to 'cat'" in message
    with pytest.raises(SettingError, match="data.folds must be an integer >= 2"):
        ImageFolderDataModule.check_settings(
            {"root": str(root), "folds": 1, "fold": 0}
        )  # what "folds <= 1" would have led to

    Image.new("RGB", (40, 36), (200, 20, 20)).save(root / "train/cat/cat_001.png")  # cat: 2 training images
    with pytest.raises(DataError, match=r"Use data.folds between 2 and 2, or add images"):
        _datamodule(root, folds=3, fold=0)
    assert len(_datamodule(root, folds=2, fold=1).val_set) > 0  # the advice works
