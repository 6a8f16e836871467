"""The robustness levers: augmentation policies, random erasing, label smoothing, mixup/cutmix, and their refusals."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.data.transforms import AUGMENT_POLICIES, train_transform
from finetune.errors import SettingError
from finetune.harness.settings import check_model_settings
from finetune.module import FineTuneModule
from finetune.run import compose_config
from finetune.train import train

from .conftest import make_image_folder, tiny_overrides


def striped_photo(size: int = 64) -> Image.Image:
    pixels = torch.zeros(size, size, 3, dtype=torch.uint8)
    pixels[:, : size // 2, 0] = 200
    pixels[:, size // 2 :, 2] = 200
    pixels[::8] = 90
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_a_policy_adds_its_torchvision_transform_after_the_crop_and_flip(policy):
    plain = train_transform(32, crop_scale=(1.0, 1.0))
    with_policy = train_transform(32, crop_scale=(1.0, 1.0), policy=policy)
    names = [type(t).__name__ for t in with_policy.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert len(with_policy.transforms) == len(plain.transforms) + 1
    assert (
        names[2]
        == {"trivial": "TrivialAugmentWide", "randaugment": "RandAugment", "autoaugment": "AutoAugment"}[policy]
    )
    photo = striped_photo()
    torch.manual_seed(0)
    outputs = [with_policy(photo) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    torch.manual_seed(0)
    flips_only = [plain(photo) for _ in range(8)]
    # The crop is the whole photo: without a policy only the flip varies, so at most two distinct outputs.
    distinct = lambda images: len({tuple(i.flatten()[::97].tolist()) for i in images})  # noqa: E731
    assert distinct(flips_only) <= 2 < distinct(outputs)


def test_random_erasing_zeroes_a_rectangle_of_the_normalised_image():
    transform = train_transform(32, crop_scale=(1.0, 1.0), random_erasing=1.0)
    assert type(transform.transforms[-1]).__name__ == "RandomErasing"
    torch.manual_seed(0)
    erased = transform(striped_photo())
    assert (erased == 0).all(dim=0).sum() >= 0.02 * 32 * 32  # the rectangle (value 0 after normalisation)
    untouched = train_transform(32, crop_scale=(1.0, 1.0))(striped_photo())
    assert (untouched == 0).all(dim=0).sum() == 0


@pytest.mark.parametrize(
    "model, message",
    [
        ({"label_smoothing": 1.0}, r"model.label_smoothing must be in \[0, 1\), got 1.0"),
        ({"mixup_alpha": -0.2}, r"model.mixup_alpha must be >= 0, got -0.2"),
        ({"cutmix_alpha": "x"}, r"model.cutmix_alpha must be >= 0, got 'x'"),
        (
            {"mixup_alpha": 0.2, "freeze": "backbone", "cache_features": True},
            r"model.mixup_alpha=0.2 mixes training images, but model.cache_features=true",
        ),
    ],
)
def test_bad_lever_settings_are_refused_by_name(model, message):
    with pytest.raises(SettingError, match=message):
        check_model_settings(model)


def test_mixup_with_cached_features_is_refused_before_any_work(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=4, n_test=2)
    overrides = ["experiment=frozen", "model.cache_features=true", "model.cutmix_alpha=1.0"]
    results = None
    with pytest.raises(SettingError, match=r"model.cutmix_alpha=1.0 mixes training images"):
        results = train(compose_config(overrides + tiny_overrides(root, tmp_path / "run")))
    assert results is None and not (tmp_path / "run" / "checkpoints").exists()


def test_label_smoothing_changes_the_training_loss_only():
    torch.manual_seed(0)
    model = FineTuneModule(2, backbone="resnet18", weights=None, label_smoothing=0.2)
    logits = torch.tensor([[4.0, -4.0], [-1.0, 1.0]])
    targets = torch.tensor([0, 1])
    smoothed = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.2)
    assert model.train_loss_fn(logits, targets) == pytest.approx(smoothed.item())
    assert model.loss(logits, targets) == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    assert smoothed.item() > torch.nn.functional.cross_entropy(logits, targets).item()


def test_mixup_trains_on_soft_targets_that_sum_to_one(tmp_path):
    torch.manual_seed(0)
    model = FineTuneModule(3, backbone="resnet18", weights=None, mixup_alpha=0.4, cutmix_alpha=1.0)
    images = torch.rand(6, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, soft = model.batch_mix(images, targets)
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed, images) and (soft.max(dim=1).values < 1).any()


def test_a_run_with_every_lever_trains_and_records_them(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=8, n_test=2)
    levers = [
        "data.augment=trivial",
        "data.random_erasing=0.25",
        "model.label_smoothing=0.1",
        "model.mixup_alpha=0.2",
        "model.cutmix_alpha=1.0",
        "trainer.max_epochs=2",
    ]
    results = train(compose_config(levers + tiny_overrides(root, tmp_path / "run")))
    assert results["status"] == "completed", results.get("error")
    checkpoint = torch.load(results["best_checkpoint"], weights_only=True)
    hp, data = checkpoint["hyper_parameters"], checkpoint["datamodule_hyper_parameters"]
    assert (hp["label_smoothing"], hp["mixup_alpha"], hp["cutmix_alpha"]) == (0.1, 0.2, 1.0)
    assert (data["augment"], data["random_erasing"]) == ("trivial", 0.25)
    assert all(0 <= e["train/acc"] <= 1 and e["train/loss"] > 0 for e in results["history"])
