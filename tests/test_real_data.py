"""Integration on the real photos in ../shared: genuine ImageNet MobileNetV2 weights on hot dogs."""

import itertools
import json

import torch

from finetune.backbones import build_backbone
from finetune.data import ImageFolderDataModule
from finetune.train import train

from .conftest import KAGGLE_HOTDOG, MOBILENET_V2_WEIGHTS, compose_config, needs_shared

pytestmark = needs_shared(KAGGLE_HOTDOG, MOBILENET_V2_WEIGHTS)


def _features(model, loader, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    with torch.no_grad():
        for images, targets in itertools.islice(loader, batches):
            feats.append(model.features(images).mean(dim=(2, 3)))
            labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def test_pretrained_features_separate_hot_dogs_far_better_than_chance():
    """A nearest-class-mean probe on 64 train photos; random weights sit near 0.5-0.6 here."""
    torch.manual_seed(0)
    dm = ImageFolderDataModule(KAGGLE_HOTDOG, batch_size=32, num_workers=0, val_fraction=0.1, image_size=160)
    dm.setup("fit")
    dm.setup("test")
    dm.train_set.dataset.transform = dm.test_set.transform  # probe on un-augmented images
    model = build_backbone("mobilenet_v2", 2, weights=MOBILENET_V2_WEIGHTS).model.eval()
    train_x, train_y = _features(model, dm.train_dataloader(), 2)
    test_x, test_y = _features(model, torch.utils.data.DataLoader(dm.test_set, batch_size=32, shuffle=True), 2)
    means = torch.stack([train_x[train_y == c].mean(0) for c in (0, 1)])
    predictions = torch.cdist(test_x, means).argmin(dim=1)
    accuracy = (predictions == test_y).float().mean().item()
    assert accuracy >= 0.7, f"nearest-mean probe accuracy {accuracy:.3f}"


def test_finetune_a_few_steps_on_real_photos(tmp_path):
    overrides = [
        "experiment=finetune",
        "data=folder",
        f"data.root={KAGGLE_HOTDOG}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.image_size=160",
        "data.resize_size=182",
        "model.backbone=mobilenet_v2",
        f"model.weights={MOBILENET_V2_WEIGHTS}",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={tmp_path}",
    ]
    results = train(compose_config(overrides))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["backbone"] == "mobilenet_v2" and written["weights"] == str(MOBILENET_V2_WEIGHTS)
    assert written["epochs"] == 1 and len(written["history"]) == 1
    entry = written["history"][0]
    assert 0 < entry["train/loss"] < 5 and 0 <= entry["val/acc"] <= 1
    assert 0 <= results["test/acc"] <= 1 and results["best_checkpoint"].endswith(".ckpt")
