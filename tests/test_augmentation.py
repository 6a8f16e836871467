"""Training augmentation and regularisation: torchvision policies, random erasing, label smoothing (the criterion's
setting), mixup/cutmix (a callback), and their refusals."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.callbacks.mixup import MixUpCutMix
from finetune.data.transforms import AUGMENT_POLICIES, train_transform
from finetune.errors import SettingError
from finetune.module import FineTuneModule
from finetune.run import assemble, check_settings, compose_config
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


def test_zoom_out_puts_half_the_photos_on_a_mean_colour_canvas_before_the_crop():
    transform = train_transform(32, crop_scale=(1.0, 1.0), zoom_out=3.0)
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:3] == ["RandomZoomOut", "RandomResizedCrop", "RandomHorizontalFlip"]
    white = Image.new("RGB", (48, 48), (255, 255, 255))
    torch.manual_seed(0)
    outputs = [transform(white) for _ in range(40)]
    # The canvas is the normalisation's mean colour: exactly 0 in every channel after normalising.
    canvas = [(o.abs() < 1e-2).all(dim=0).float().mean().item() for o in outputs]
    zoomed = [share for share in canvas if share > 0]
    assert 10 <= len(zoomed) <= 30  # about half (p=0.5)
    assert max(canvas) > 0.5  # up to 3x the side: the photo then fills as little as a ninth of the crop
    assert min(train_transform(32, crop_scale=(1.0, 1.0))(white).abs().min(dim=0).values.flatten()) > 1
    timm_like = train_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), zoom_out=2.0)
    assert timm_like.transforms[0].fill == (128, 128, 128)  # timm's mean 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.criterion.label_smoothing=1.5"], r"model.criterion.label_smoothing must be in \[0, 1\), got 1.5"),
        (
            ["+callbacks=mixup", "callbacks.mixup.mixup_alpha=-0.2"],
            r"callbacks.mixup.mixup_alpha must be >= 0, got -0.2",
        ),
        (["+callbacks=mixup", "callbacks.mixup.cutmix_alpha=x"], r"callbacks.mixup.cutmix_alpha must be >= 0, got 'x'"),
        (
            ["+callbacks=mixup", "callbacks.mixup.mixup_alpha=0"],
            r"callbacks.mixup has mixup_alpha=0 and cutmix_alpha=0",
        ),
        (
            ["experiment=frozen", "features=cached", "+callbacks=mixup"],
            r"callbacks.mixup mixes training images, but features=cached",
        ),
    ],
)
def test_bad_lever_settings_are_refused_by_name_before_any_work(tmp_path, overrides, message):
    root = make_image_folder(tmp_path / "data", n_train=4, n_test=2)
    cfg = compose_config(overrides + tiny_overrides(root, tmp_path / "run"))
    with pytest.raises(SettingError, match=message):
        check_settings(cfg)
        assemble(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_label_smoothing_changes_the_training_loss_only(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=4, n_test=2)
    cfg = compose_config(["model.criterion.label_smoothing=0.2"] + tiny_overrides(root, tmp_path / "run"))
    model = assemble(cfg).model
    logits = torch.tensor([[4.0, -4.0], [-1.0, 1.0]])
    targets = torch.tensor([0, 1])
    smoothed = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.2)
    assert model.criterion(logits, targets) == pytest.approx(smoothed.item())
    assert smoothed.item() > torch.nn.functional.cross_entropy(logits, targets).item()  # val/test: the plain NLL


def test_mixup_writes_mixed_images_and_soft_targets_that_sum_to_one_into_the_batch():
    torch.manual_seed(0)
    mixup = MixUpCutMix(mixup_alpha=0.4, cutmix_alpha=1.0)
    mixup.setup(None, FineTuneModule(3, backbone="resnet18", weights=None), "fit")
    images, targets = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    batch = [images.clone(), targets]
    mixup.on_train_batch_start(None, None, batch, 0)
    mixed, soft = batch
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed, images) and (soft.max(dim=1).values < 1).any()


def test_a_run_with_every_lever_trains_and_records_them(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=8, n_test=2)
    levers = [
        "data.augmentation.policy=trivial",
        "data.augmentation.random_erasing=0.25",
        "data.augmentation.zoom_out=2",
        "model.criterion.label_smoothing=0.1",
        "+callbacks=mixup",
        "callbacks.mixup.mixup_alpha=0.2",
        "callbacks.mixup.cutmix_alpha=1.0",
        "trainer.max_epochs=2",
    ]
    results = train(compose_config(levers + tiny_overrides(root, tmp_path / "run")))
    assert results["status"] == "completed", results.get("error")
    checkpoint = torch.load(results["best_checkpoint"], weights_only=True)
    recipe, data = checkpoint["recipe"], checkpoint["datamodule_hyper_parameters"]
    assert recipe["model.criterion"]["label_smoothing"] == 0.1
    assert (recipe["callbacks.mixup"]["mixup_alpha"], recipe["callbacks.mixup"]["cutmix_alpha"]) == (0.2, 1.0)
    assert (data["augmentation"]["policy"], data["augmentation"]["random_erasing"]) == ("trivial", 0.25)
    assert data["augmentation"]["zoom_out"] == 2
    assert all(0 <= e["train/acc"] <= 1 and e["train/loss"] > 0 for e in results["history"])
