"""Cached backbone features (features=cached) give the uncached frozen run's result, dropout included."""

import json
import logging

import pytest
import torch

from finetune.backbones import build_backbone
from finetune.errors import SettingError
from finetune.evaluate import evaluate
from finetune.features import dropouts_before_head, head_input, random_layers_inside_backbone
from finetune.module import FineTuneModule
from finetune.run import check_settings
from finetune.train import train

from .conftest import assert_counted_accuracy, compose_config, count_correct, tiny_overrides


def _frozen_run(tmp_path, tiny_folder, cache_features: bool, augment: bool = False) -> tuple[dict, dict]:
    overrides = [
        "experiment=frozen",
        "model.backbone=mobilenet_v2",
        *(["features=cached"] if cache_features else []),
        *([] if augment else ["data.augmentation=null"]),
        "trainer.max_epochs=2",
        "optimizer.lr=0.05",
        "seed=3",
        *count_correct(tmp_path / "counts.json"),
    ] + tiny_overrides(tiny_folder, tmp_path)
    results = train(compose_config(overrides))
    state = torch.load(results["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    return results, state


def test_cached_features_reproduce_the_uncached_frozen_run_with_its_dropout(tmp_path, tiny_folder):
    # MobileNetV2's classifier is Dropout(0.2) -> Linear: the uncached run drops head inputs at train time, so
    # equal head weights after two epochs mean the cached path drew the same masks at the same place.
    assert dropouts_before_head(build_backbone("mobilenet_v2", 2, None).model, "classifier.1") == ["classifier.0"]
    plain, plain_state = _frozen_run(tmp_path / "plain", tiny_folder, cache_features=False)
    cached, cached_state = _frozen_run(tmp_path / "cached", tiny_folder, cache_features=True)

    for key in ("net.classifier.1.weight", "net.classifier.1.bias"):
        assert not torch.equal(plain_state[key], torch.zeros_like(plain_state[key]))
        torch.testing.assert_close(cached_state[key], plain_state[key], rtol=1e-4, atol=1e-5)
    assert {k for k in plain_state if not torch.equal(plain_state[k], cached_state[k])} <= {
        "net.classifier.1.weight",
        "net.classifier.1.bias",
    }  # the frozen backbone, BatchNorm statistics included, is identical
    for a, b in zip(plain["history"], cached["history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert cached["test/acc"] == pytest.approx(plain["test/acc"])
    assert cached["test/loss"] == pytest.approx(plain["test/loss"], rel=1e-4)


def test_cached_features_drop_augmentation_with_a_warning_and_the_checkpoint_evaluates_on_images(
    tmp_path, tiny_folder, caplog
):
    with caplog.at_level(logging.WARNING):
        results, _ = _frozen_run(tmp_path, tiny_folder, cache_features=True, augment=True)
    assert "train-time augmentation is dropped" in caplog.text
    assert results["epochs"] == 2
    # the head's predictions on the cached test features, counted: all 8 test images of tiny_folder
    assert_counted_accuracy(results["test/acc"], json.loads((tmp_path / "counts.json").read_text())["test"], 8)

    overrides = [o for o in tiny_overrides(tiny_folder, tmp_path / "eval") if o.split("=")[0].startswith("data")]
    cfg = compose_config(
        overrides
        + ["trainer.accelerator=cpu", f"ckpt_path={results['best_checkpoint']}"]
        + [f"paths.output_dir={tmp_path / 'eval'}"],
        config_name="eval",
    )
    evaluated = evaluate(cfg)  # a plain image checkpoint: the test images go through the whole network
    assert evaluated["test/acc"] == pytest.approx(results["test/acc"])
    assert evaluated["test/loss"] == pytest.approx(results["test/loss"], rel=1e-4)


def test_cached_features_need_a_frozen_backbone(tmp_path, tiny_folder):
    cfg = compose_config(["experiment=finetune", "features=cached"] + tiny_overrides(tiny_folder, tmp_path))
    with pytest.raises(SettingError, match="features=cached needs model.freeze=backbone"):
        check_settings(cfg)
    with pytest.raises(SettingError, match="features=cached needs model.freeze=backbone"):
        train(cfg)


def test_head_inputs_are_what_the_head_sees_and_random_backbone_layers_are_named():
    torch.manual_seed(0)
    module = FineTuneModule(num_classes=2, backbone="resnet18", weights=None, freeze="backbone").eval()
    images = torch.randn(2, 3, 32, 32)
    features = head_input(module.net, module.head_name, images)
    assert features.shape == (2, 512)
    torch.testing.assert_close(module(features), module(images))
    assert dropouts_before_head(module.net, "fc") == []
    efficientnet = build_backbone("efficientnet_b0", 2, None).model
    skipped = random_layers_inside_backbone(efficientnet, "classifier.1")
    assert dropouts_before_head(efficientnet, "classifier.1") == ["classifier.0"]
    # one StochasticDepth per MBConv block but the first, whose drop rate is 0
    assert "classifier.0" not in skipped and len(skipped) == 15 and skipped[0] == "features.2.0.stochastic_depth"
