"""data.augment_on=device: per-sample crops drawn like RandomResizedCrop's, resampled faithfully, seeded, resumable."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.data import ImageFolderDataModule
from finetune.data.device_augment import (
    CROP_RATIO,
    CROP_SCALE,
    DeviceAugment,
    RawBatch,
    crop_boxes,
    pad_collate,
    resized_crops,
    resized_crops_per_sample,
)
from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from finetune.train import train

from .conftest import compose_config, tiny_overrides

SAMPLES = 2000
# Two-sample Kolmogorov-Smirnov critical value at alpha = 0.001 for n = m = SAMPLES:
# sqrt(-ln(alpha / 2) / 2) * sqrt((n + m) / (n * m)) = 1.949 * 0.0316 = 0.0616. Two samples of one distribution
# exceed it with probability 0.1% (and the seeds are fixed, so a pass is not luck that changes between runs); a
# distribution off by as little as scale=(0.16, 1) instead of (0.08, 1) exceeds it (checked below).
KS_CRITICAL = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt(2 / SAMPLES)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def loader_path_boxes(height: int, width: int, n: int, seed: int) -> torch.Tensor:
    """(top, left, height, width) as the loader path draws them: v2.RandomResizedCrop.get_params, one at a time."""
    torch.manual_seed(seed)
    image = torch.empty(3, height, width)
    return torch.tensor([v2.RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(n)])


def features(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(1)
    return {
        "area fraction": h * w / (height * width),
        "log aspect ratio": torch.log(w / h),
        "top": top / height,
        "left": left / width,
    }


@pytest.mark.parametrize("height,width", [(300, 400), (60, 400)])  # (60, 400): the centre-crop fallback is common
def test_crop_distribution_matches_random_resized_crop(height, width):
    reference = loader_path_boxes(height, width, SAMPLES, seed=0)
    sizes = torch.tensor([[height, width]] * SAMPLES)
    drawn = crop_boxes(sizes, torch.Generator().manual_seed(1))
    wrong = crop_boxes(sizes, torch.Generator().manual_seed(1), scale=(0.16, 1.0))
    ref, ours, off = features(reference, height, width), features(drawn, height, width), features(wrong, height, width)
    for name in ref:
        assert ks_statistic(ours[name], ref[name]) < KS_CRITICAL, name
    # The test can tell: a crop scale of (0.16, 1) is detected.
    assert ks_statistic(off["area fraction"], ref["area fraction"]) > KS_CRITICAL
    # Every box lies inside its image, like the loader path's.
    top, left, h, w = drawn.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h > 0).all() and (w > 0).all()


def test_fallback_is_the_centre_crop_clamped_to_the_ratio():
    # 1 x 400: no attempt fits (a box needs h >= 1 and w <= 4/3 h), so every box is the fallback.
    boxes = crop_boxes(torch.tensor([[1, 400]] * 5), torch.Generator().manual_seed(0))
    reference = loader_path_boxes(1, 400, 1, seed=0)
    assert boxes.tolist() == reference.tolist() * 5 == [[0, 199, 1, 1]] * 5


def test_crops_differ_within_a_batch_and_flips_are_per_sample():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    batch = pad_collate([(image, 0)] * 32)
    drawn = DeviceAugment(24, seed=0).draw(batch)
    crops, targets = DeviceAugment(24, seed=0)(batch)
    assert crops.shape == (32, 3, 24, 24) and crops.dtype == torch.float32 and targets.tolist() == [0] * 32
    assert len({tuple(r) for r in drawn.boxes.tolist()}) == 32  # 32 different boxes
    for resampled in (crops, DeviceAugment(24, seed=0, resampling="roi_align")(batch)[0]):
        flat = resampled.flatten(1)
        distinct = torch.cdist(flat, flat) + torch.eye(32) * 1e9
        assert distinct.min() > 1.0  # no two crops of the same image are alike
    assert 4 <= int(drawn.flips.sum()) <= 28  # flips are drawn per sample, not once for the batch


def test_on_a_cpu_the_crops_are_the_loader_paths_pixels():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 40 + 3 * k, 50 - 2 * k), dtype=torch.uint8) for k in range(6)]
    batch = DeviceAugment(24, seed=0).draw(pad_collate([(image, k) for k, image in enumerate(images)]))
    crops, targets = DeviceAugment(24).apply(batch)
    assert targets.tolist() == list(range(6)) and batch.flips.any() and not batch.flips.all()
    for k, image in enumerate(images):
        top, left, h, w = batch.boxes[k].tolist()
        expected = F.resized_crop(image, top, left, h, w, [24, 24], antialias=True)  # what the loader path does
        expected = expected.flip(-1) if batch.flips[k] else expected
        expected = F.normalize(F.to_dtype(expected, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(crops[k], expected, atol=1e-5), k


def test_resampling_matches_the_loader_paths_crop_and_resize():
    torch.manual_seed(0)
    # A smooth image (so that the two antialiasing filters, box and triangle, agree closely) plus a little noise.
    y, x = torch.meshgrid(torch.linspace(0, 6, 120), torch.linspace(0, 9, 160), indexing="ij")
    smooth = torch.stack([torch.sin(x) + torch.cos(y), torch.sin(x + y), torch.cos(x - y)]) * 60 + 128
    image = (smooth + torch.randn_like(smooth) * 3).clamp(0, 255).to(torch.uint8)
    boxes = torch.tensor([[10, 20, 100, 120], [0, 0, 120, 160], [50, 70, 30, 40], [3, 5, 40, 30]])  # down and up
    crops = resized_crops(image[None].expand(4, -1, -1, -1), boxes, 48)  # roi_align: what accelerators run
    per_sample = resized_crops_per_sample(image[None].expand(4, -1, -1, -1), boxes, torch.zeros(4, dtype=bool), 48)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = F.resized_crop(image, top, left, h, w, [48, 48], antialias=True).float()
        assert torch.equal(per_sample[k].float(), expected), k
        assert (crops[k] - expected).abs().mean() < 2.0, k  # of 255: the filters differ, the pixels hardly
        other = F.resized_crop(image, *boxes[(k + 1) % 4].tolist(), [48, 48], antialias=True).float()
        assert (crops[k] - other).abs().mean() > 10.0  # a different crop is far off: the comparison can fail


def test_padding_never_reaches_a_crop():
    torch.manual_seed(0)
    small = torch.randint(0, 256, (3, 30, 20), dtype=torch.uint8)
    large = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    padded = pad_collate([(small, 1), (large, 0)])
    assert padded.images.shape == (2, 3, 50, 60) and padded.sizes.tolist() == [[30, 20], [50, 60]]
    alone = pad_collate([(small, 1)]).images
    # Boxes that touch the small image's bottom-right corner, where bilinear sampling reads one pixel further.
    for box in ([10, 5, 20, 15], [0, 0, 30, 20], [29, 19, 1, 1]):
        boxes = torch.tensor([box])
        from_padded = resized_crops(padded.images, boxes, 16)  # box 0 on image 0: the small image
        from_alone = resized_crops(alone, boxes, 16)
        assert torch.allclose(from_padded, from_alone, atol=1e-4), box
    # Without the replicated border the result would differ: the check above can fail.
    zero_padded = torch.zeros(1, 3, 50, 60, dtype=torch.uint8)
    zero_padded[0, :, :30, :20] = small
    boxes = torch.tensor([[10, 5, 20, 15]])
    assert not torch.allclose(resized_crops(zero_padded, boxes, 16), resized_crops(alone, boxes, 16), atol=1e-4)


def test_normalisation_is_the_loader_paths():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    batch = pad_collate([(image, 0)])
    whole = batch._replace(boxes=torch.tensor([[0, 0, 16, 16]]), flips=torch.tensor([False]))
    expected = F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    for resampling in ("per_sample", "roi_align"):
        crops, _ = DeviceAugment(16, resampling=resampling).apply(whole)
        assert torch.allclose(crops[0], expected, atol=1e-5), resampling
        flipped, _ = DeviceAugment(16, resampling=resampling).apply(whole._replace(flips=torch.tensor([True])))
        assert torch.allclose(flipped[0], expected.flip(-1), atol=1e-5), resampling


def test_same_seed_same_crops_and_a_restored_state_continues_the_stream():
    torch.manual_seed(0)
    batch = pad_collate([(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8), 0)] * 8)

    def stream(augment: DeviceAugment, n: int, rank: int = 0) -> list[list[float]]:
        return [augment.draw(batch, rank).boxes.tolist() for _ in range(n)]

    first = DeviceAugment(32, seed=7)
    assert stream(first, 3) == stream(DeviceAugment(32, seed=7), 3)
    assert stream(DeviceAugment(32, seed=8), 3) != stream(DeviceAugment(32, seed=7), 3)
    assert stream(DeviceAugment(32, seed=7), 1, rank=1) != stream(DeviceAugment(32, seed=7), 1, rank=0)
    straight = stream(DeviceAugment(32, seed=7), 3)
    resumed = DeviceAugment(32, seed=0)
    saved = DeviceAugment(32, seed=7)
    stream(saved, 1)
    resumed.load_state_dict(saved.state_dict())
    assert stream(resumed, 2) == straight[1:]
    # The seed is the run's (torch.initial_seed, as set by seed_everything) unless given.
    torch.manual_seed(1234)
    assert DeviceAugment(32).seed == 1234


def test_datamodule_yields_uint8_batches_and_its_hooks_augment_them(tiny_folder):
    dm = ImageFolderDataModule(tiny_folder, batch_size=4, num_workers=0, image_size=32, augment_on="device")
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert isinstance(raw, RawBatch) and raw.images.dtype == torch.uint8 and raw.images.shape[:2] == (4, 3)
    images, targets = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.shape == (4,)
    val_images, _ = next(iter(dm.val_dataloader()))  # evaluation keeps the loader's deterministic transform
    assert val_images.dtype == torch.float32 and val_images.shape[1:] == (3, 32, 32)
    assert dm.on_after_batch_transfer((val_images, targets), 0)[0] is val_images
    assert dm.state_dict() == {"device_augment": {"seed": dm.device_augment.seed, "batches": 1}}

    cached = ImageFolderDataModule(tiny_folder, num_workers=0, image_size=32, augment_on="device", cache="memory")
    cached.setup("fit")
    image, _ = cached.train_set[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3  # the decoded image, not a crop

    with pytest.raises(ValueError, match="data.augment_on"):
        ImageFolderDataModule.check_settings({"root": tiny_folder, "augment_on": "gpu"})
    with pytest.raises(ValueError, match="data.device_resampling"):
        ImageFolderDataModule.check_settings(
            {"root": tiny_folder, "augment_on": "device", "device_resampling": "bicubic"}
        )
    forced = ImageFolderDataModule(tiny_folder, num_workers=0, augment_on="device", device_resampling="roi_align")
    forced.setup("fit")
    assert forced.device_augment.resampling == "roi_align"


def test_device_augmented_run_trains_warns_once_on_cpu_and_saves_its_stream(tmp_path, tiny_folder, caplog):
    overrides = tiny_overrides(tiny_folder, tmp_path / "run") + [
        "data.augment_on=device",
        "data.cache=memory",
        "trainer.max_epochs=2",
    ]
    with caplog.at_level(logging.WARNING):
        results = train(compose_config(overrides))
    assert results["status"] == "completed" and 0.0 <= results["test/acc"] <= 1.0
    assert math.isfinite(results["history"][-1]["train/loss"])
    warned = [r for r in caplog.records if "data.augment_on=device without an accelerator" in r.getMessage()]
    assert len(warned) == 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["ImageFolderDataModule"]["device_augment"]
    assert state == {"seed": 0, "batches": 2 * 4}  # 16 training images in batches of 4, two epochs


def test_device_augmented_resume_equals_two_epochs_straight(tmp_path, tiny_folder):
    def run(out: str, *extra: str) -> dict:
        overrides = tiny_overrides(tiny_folder, tmp_path / out) + [
            "data.augment_on=device",
            "trainer.deterministic=true",
            "seed=3",
            *extra,
        ]
        return train(compose_config(overrides))

    straight = run("straight", "trainer.max_epochs=2")
    run("first", "trainer.max_epochs=1", "test_after_fit=false")
    resumed = run("resumed", "trainer.max_epochs=2", f"resume={tmp_path / 'first'}")
    for key in ("val/acc", "test/acc", "test/loss"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-7), key
    assert resumed["history"][-1]["train/loss"] == pytest.approx(straight["history"][-1]["train/loss"], rel=1e-6)
    other = run("other-seed", "trainer.max_epochs=2", "seed=4")
    assert other["history"][-1]["train/loss"] != pytest.approx(straight["history"][-1]["train/loss"], rel=1e-6)
