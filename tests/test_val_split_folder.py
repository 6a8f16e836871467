"""scripts/val_split_folder.py: the validation split, as a folder evaluation scores."""

import importlib.util

import pytest

from .conftest import REPO, make_image_folder

spec = importlib.util.spec_from_file_location("val_split_folder", REPO / "scripts" / "val_split_folder.py")
val_split_folder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(val_split_folder)


def test_the_folder_holds_exactly_the_runs_validation_photos(tmp_path):
    from finetune.run import build_datamodule, compose_config

    root = make_image_folder(tmp_path / "data", n_train=10, n_test=2)
    overrides = ["data=folder", f"data.root={root}", "data.val_fraction=0.3", "data.split_seed=3"]
    count = val_split_folder.write_val_folder(tmp_path / "val", overrides)

    images = build_datamodule(compose_config(overrides))
    images.setup("fit")
    expected = {
        (images.val_set.dataset.classes[t], p.split("/")[-1])
        for p, t in (images.val_set.dataset.samples[i] for i in images.val_set.indices)
    }
    written = {(p.parent.name, p.name) for p in (tmp_path / "val" / "test").glob("*/*")}
    assert written == expected and count == len(expected) == 6  # 30% of 10 photos in each of 2 classes
    for cls, name in written:  # byte for byte the training folder's photo
        assert (tmp_path / "val" / "test" / cls / name).read_bytes() == (root / "train" / cls / name).read_bytes()


def test_an_existing_output_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "kept.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="already exists"):
        val_split_folder.write_val_folder(tmp_path / "val", ["data=folder", f"data.root={root}"])
    assert (tmp_path / "val" / "kept.txt").read_text() == "a user's file"


def test_a_missing_data_root_is_one_error_line_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        val_split_folder.main([str(tmp_path / "val"), "data=folder", f"data.root={tmp_path / 'nothing'}"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("Error: Dataset folder") and not (tmp_path / "val").exists()
