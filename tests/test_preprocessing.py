"""The data transforms follow the backbone's pretrained preprocessing (null data.* settings), explicit values win,
and checkpoints carry it to evaluate and predict. timm with random weights: nothing is downloaded."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.backbones import preprocessing
from finetune.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from finetune.data.transforms import PREPROCESSING
from finetune.evaluate import evaluate
from finetune.harness.checkpoint_io import load_checkpoint
from finetune.predict import predict
from finetune.run import build_datamodule
from finetune.train import train

from .conftest import compose_config, tiny_overrides
from .inference import eval_config, predict_config, trained_run


def _datamodule(tiny_folder, *overrides: str) -> ImageFolderDataModule:
    return build_datamodule(compose_config(["data=folder", f"data.root={tiny_folder}", *overrides]))


def _steps(transform: v2.Compose, kind: type) -> list:
    return [step for step in transform.transforms if isinstance(step, kind)]


def test_torchvision_backbones_keep_the_books_transforms(tiny_folder):
    dm = _datamodule(tiny_folder)
    steps = dm.eval_transform().transforms
    assert isinstance(steps[0], v2.Resize) and list(steps[0].size) == [256, 256]
    assert steps[0].interpolation == InterpolationMode.BILINEAR
    assert isinstance(steps[1], v2.CenterCrop) and list(steps[1].size) == [224, 224]
    (normalize,) = _steps(dm.eval_transform(), v2.Normalize)
    assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD
    crop = dm.train_transform().transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.interpolation == InterpolationMode.BILINEAR
    assert list(crop.size) == [224, 224]
    # An explicit crop keeps the book's ratio for torchvision backbones.
    assert _datamodule(tiny_folder, "data.image_size=384").resize_size == 439


def test_a_timm_vit_gets_its_pretrained_normalisation_and_interpolation(tiny_folder):
    pytest.importorskip("timm")
    expected = preprocessing("timm/vit_tiny_patch16_224")
    assert expected["mean"] == expected["std"] == (0.5, 0.5, 0.5) and expected["interpolation"] == "bicubic"
    dm = _datamodule(tiny_folder, "model.backbone=timm/vit_tiny_patch16_224")
    (normalize,) = _steps(dm.eval_transform(), v2.Normalize)
    assert tuple(normalize.mean) == tuple(normalize.std) == (0.5, 0.5, 0.5) == expected["mean"]
    (resize,) = _steps(dm.eval_transform(), v2.Resize)
    assert list(resize.size) == [expected["resize_size"]] * 2 == [math.floor(224 / 0.9)] * 2
    assert resize.interpolation == InterpolationMode.BICUBIC
    crop = dm.train_transform().transforms[0]
    assert crop.interpolation == InterpolationMode.BICUBIC and list(crop.size) == [224, 224]
    (normalize,) = _steps(dm.train_transform(), v2.Normalize)
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5)
    # A given crop keeps timm's crop fraction: floor(image_size / crop_pct).
    assert _datamodule(tiny_folder, "model.backbone=timm/resnet18", "data.image_size=64").resize_size == 67


def test_explicit_values_win(tiny_folder):
    pytest.importorskip("timm")
    dm = _datamodule(
        tiny_folder,
        "model.backbone=timm/vit_tiny_patch16_224",
        "data.mean=[0.1,0.2,0.3]",
        "data.std=[0.5,0.5,0.5]",
        "data.interpolation=nearest",
        "data.resize_size=240",
    )
    (normalize,) = _steps(dm.eval_transform(), v2.Normalize)
    assert tuple(normalize.mean) == pytest.approx((0.1, 0.2, 0.3)) and tuple(normalize.std) == (0.5, 0.5, 0.5)
    (resize,) = _steps(dm.eval_transform(), v2.Resize)
    assert resize.interpolation == InterpolationMode.NEAREST and list(resize.size) == [240, 240]
    (normalize,) = _steps(_datamodule(tiny_folder, "data.mean=[0.5,0.5,0.5]").eval_transform(), v2.Normalize)
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == IMAGENET_STD


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"std": [0.2, 0.0, 0.2]}, "data.std"),
        ({"mean": [0.5, 0.5]}, "data.mean"),
        ({"mean": "imagenet"}, "data.mean"),
        ({"interpolation": "lanczos2"}, "data.interpolation"),
    ],
)
def test_bad_normalisation_settings_are_named(tiny_folder, setting, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ImageFolderDataModule.check_settings({"root": tiny_folder, **setting})


def test_cache_and_device_augmentation_use_the_normalisation(tiny_folder):
    dm = ImageFolderDataModule(
        tiny_folder, image_size=32, num_workers=0, cache="memory", augment_on="device", mean=[0.5] * 3, std=[0.25] * 3
    )
    dm.setup("fit")
    assert dm.device_augment.mean == (0.5, 0.5, 0.5) and dm.device_augment.std == (0.25, 0.25, 0.25)
    image, _ = dm.val_set[0]
    reference = ImageFolderDataModule(tiny_folder, image_size=32, num_workers=0, mean=[0.5] * 3, std=[0.25] * 3)
    reference.setup("fit")
    assert torch.allclose(image, reference.val_set[0][0], atol=1e-5)


def test_a_timm_checkpoint_stores_its_preprocessing_and_predict_matches_evaluate(tmp_path_factory, tiny_folder):
    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("timm_run")
    overrides = ["model.backbone=timm/resnet18", "trainer.max_epochs=1", "optimizer.lr=0.002", "data.std=[0.5,0.5,0.5]"]
    results = train(compose_config(overrides + tiny_overrides(tiny_folder, out)))
    assert results["status"] == "completed", results.get("error")
    stored = load_checkpoint(results["best_checkpoint"])[PREPROCESSING]
    expected = preprocessing("timm/resnet18")
    assert stored["interpolation"] == expected["interpolation"] == "bicubic"
    assert stored["mean"] == pytest.approx(list(expected["mean"])) and stored["std"] == [0.5, 0.5, 0.5]
    assert (stored["image_size"], stored["resize_size"]) == (32, 36)

    tmp = tmp_path_factory.mktemp("timm_use")
    evaluated = evaluate(eval_config(results["best_checkpoint"], tiny_folder, tmp / "eval"))
    rows = {r["path"]: r for r in predict(predict_config(results["best_checkpoint"], tiny_folder / "test", tmp))}
    assert evaluated["test/top_losses"] and len(rows) >= len(evaluated["test/top_losses"])
    for entry in evaluated["test/top_losses"]:
        row = rows[entry["path"]]
        assert row["label"] == entry["predicted"] and row["score"] == pytest.approx(entry["probability"], abs=1e-5)
    # A new crop given to evaluate keeps timm's crop fraction (the checkpoint's backbone), and its normalisation.
    bigger = evaluate(eval_config(results["best_checkpoint"], tiny_folder, tmp / "eval40", "data.image_size=40"))
    crop_pct = expected["image_size"] / expected["resize_size"]  # the pretrained crop fraction, 224 / 235
    assert (bigger["image_size"], bigger["resize_size"]) == (40, math.floor(40 / 0.95)) == (40, 42)
    assert crop_pct == pytest.approx(0.95, abs=0.01)


def test_an_aspect_keeping_checkpoint_is_evaluated_and_predicted_the_way_it_was_trained(tmp_path_factory):
    run = trained_run(tmp_path_factory, eval_resize="shorter_side")
    assert load_checkpoint(run["best_checkpoint"])[PREPROCESSING]["eval_resize"] == "shorter_side"
    tmp = tmp_path_factory.mktemp("shorter_use")
    evaluated = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp / "eval"))
    assert evaluated["eval_resize"] == "shorter_side"  # from the checkpoint, not the config's default
    rows = {r["path"]: r for r in predict(predict_config(run["best_checkpoint"], run["root"] / "test", tmp))}
    assert evaluated["test/top_losses"]
    for entry in evaluated["test/top_losses"]:
        row = rows[entry["path"]]
        assert row["label"] == entry["predicted"] and row["score"] == pytest.approx(entry["probability"], abs=1e-5)
    squashed = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp / "square", "data.eval_resize=square"))
    assert squashed["eval_resize"] == "square"  # an explicit override wins, with a warning
    assert squashed["test/loss"] != pytest.approx(evaluated["test/loss"], abs=1e-6)  # and does change the pixels
