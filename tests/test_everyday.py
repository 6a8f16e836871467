"""The everyday loop as a new user meets it: score any folder of labelled photos, clean errors, progress in logs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune.evaluate import evaluate
from finetune.predict import predict

from .conftest import make_image_folder
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
