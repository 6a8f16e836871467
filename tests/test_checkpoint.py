"""Checkpoints know their data (classes, eval preprocessing); user checkpoint files are loaded safely."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from finetune.data.transforms import CLASSES, IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING, Preprocessing
from finetune.errors import ResumeError
from finetune.evaluate import evaluate
from finetune.harness.checkpoint_io import CheckpointError, load_checkpoint
from finetune.harness.checkpointing import FORMAT_KEY
from finetune.train import train

from .conftest import compose_config, make_image_folder, tiny_overrides
from .inference import eval_config, evil_checkpoint, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def test_every_checkpoint_stores_class_names_and_eval_preprocessing(run):
    folder = Path(run["best_checkpoint"]).parent
    checkpoints = sorted(folder.glob("*.ckpt"))
    assert len(checkpoints) == 2  # the best one and last.ckpt
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint[CLASSES] == ["cat", "dog"]
        assert checkpoint[PREPROCESSING] == {
            "image_size": 32,
            "resize_size": 36,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
            "eval_resize": "square",
        }


def test_a_cached_features_checkpoint_stores_them_too(tmp_path_factory):
    run = trained_run(tmp_path_factory, cache_features=True)
    checkpoint = load_checkpoint(run["last_checkpoint"])
    assert checkpoint["recipe"]["features"] == {"_target_": "finetune.features.FeatureCacheDataModule", "store": None}
    assert checkpoint[CLASSES] == ["cat", "dog"] and checkpoint[PREPROCESSING]["image_size"] == 32


def test_preprocessing_fills_the_books_values():
    assert Preprocessing.of(224) == Preprocessing(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    assert Preprocessing.of(32, 40).resize_size == 40


def test_evaluate_refuses_a_folder_with_other_classes_naming_both(run, tmp_path):
    other = make_image_folder(tmp_path / "hotdogs", classes=("hot_dog", "not_hot_dog"))
    with pytest.raises(ValueError) as err:
        evaluate(eval_config(run["best_checkpoint"], other, tmp_path / "eval"))
    assert "['cat', 'dog']" in str(err.value) and "['hot_dog', 'not_hot_dog']" in str(err.value)
    assert not (tmp_path / "eval" / "eval_results.json").exists()


def test_evaluate_uses_the_checkpoints_geometry_unless_given_on_the_command_line(run, tmp_path):
    # eval.yaml's data defaults are 224/256: without overrides the checkpoint's 32/36 must win.
    results = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp_path / "a"))
    assert (results["image_size"], results["resize_size"]) == (32, 36)
    assert results["test/acc"] == pytest.approx(run["test/acc"]) and results["test/loss"] == pytest.approx(
        run["test/loss"], rel=1e-5
    )
    overridden = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp_path / "b", "data.image_size=40"))
    assert (overridden["image_size"], overridden["resize_size"]) == (40, 46)  # the config's resize: null, 40*256/224


def truncated_copy(checkpoint: Path, into: Path) -> Path:
    """The run's checkpoints copied into ``into``, the copy of ``checkpoint`` cut in half."""
    into.mkdir()
    for path in checkpoint.parent.glob("*.ckpt"):
        shutil.copy(path, into / path.name)
    broken = into / checkpoint.name
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    return broken


def test_a_truncated_checkpoint_is_named_with_the_other_one_to_try(run, tmp_path):
    broken = truncated_copy(Path(run["best_checkpoint"]), tmp_path / "checkpoints")
    with pytest.raises(CheckpointError) as err:
        evaluate(eval_config(broken, run["root"], tmp_path / "eval"))
    message = str(err.value)
    assert str(broken) in message and "truncated or corrupt" in message
    assert str(tmp_path / "checkpoints" / "last.ckpt") in message


def test_a_truncated_last_ckpt_given_to_train_points_at_the_best_one(run, tmp_path):
    best = Path(run["best_checkpoint"])
    last = truncated_copy(Path(run["last_checkpoint"]), tmp_path / "checkpoints")
    copies = last.parent
    overrides = [f"ckpt_path={last}", "trainer.max_epochs=2"] + tiny_overrides(run["root"], tmp_path / "resumed")
    with pytest.raises(CheckpointError) as err:
        train(compose_config(overrides))
    assert str(last) in str(err.value) and str(copies / best.name) in str(err.value)


def test_a_pickle_that_would_run_code_is_refused_by_evaluate_naming_the_file(run, tmp_path):
    marker = tmp_path / "MARKER"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError) as err:
        evaluate(eval_config(evil, run["root"], tmp_path / "eval"))
    assert str(evil) in str(err.value) and "pickled Python objects" in str(err.value)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_without_class_names_or_preprocessing_is_refused_saying_why(run, tmp_path):
    checkpoint = torch.load(run["best_checkpoint"], map_location="cpu", weights_only=True)
    del checkpoint[CLASSES], checkpoint[PREPROCESSING]
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    with pytest.raises(CheckpointError, match=r"records no class names or eval preprocessing.*early version"):
        evaluate(eval_config(older, run["root"], tmp_path / "eval"))


def previous_format(checkpoint_path: Path, into: Path) -> Path:
    """The checkpoint as the previous version wrote it: the recipe's extras among the model's hyper-parameters,
    the temperature always present, no format version and no recipe record."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    del checkpoint[FORMAT_KEY], checkpoint["recipe"]
    checkpoint["hyper_parameters"] = {
        **checkpoint["hyper_parameters"],
        **{"channels_last": False, "cache_features": False, "unfreeze_at_epoch": 0, "ema_decay": None},
        **{"label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0},
    }
    checkpoint.setdefault("temperature", 1.0)
    torch.save(checkpoint, into)
    return into


def test_a_checkpoint_of_the_previous_format_scores_identically_and_is_refused_for_resuming(run, tmp_path):
    previous = previous_format(Path(run["best_checkpoint"]), tmp_path / "previous.ckpt")
    now = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp_path / "now"))
    then = evaluate(eval_config(previous, run["root"], tmp_path / "then"))
    assert (then["test/acc"], then["test/loss"], then["temperature"]) == (
        now["test/acc"],
        now["test/loss"],
        now["temperature"],
    )
    overrides = [f"ckpt_path={previous}", "trainer.max_epochs=3"] + tiny_overrides(run["root"], tmp_path / "resumed")
    with pytest.raises(ResumeError, match=r"written by another version of finetune.*Evaluate, predict or export it"):
        train(compose_config(overrides))
