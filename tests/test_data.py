from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule, eval_transform, train_transform
from finetune.data.splits import stratified_split
from finetune.data.transforms import Preprocessing

from .conftest import make_image_folder


def test_stratified_split_keeps_class_proportions_and_is_disjoint():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    train, val = stratified_split(targets, val_fraction=0.1, seed=0)
    assert sorted(train + val) == list(range(100))
    assert Counter(targets[i] for i in val) == {0: 5, 1: 3, 2: 2}
    assert Counter(targets[i] for i in train) == {0: 45, 1: 27, 2: 18}


def test_stratified_split_is_seeded():
    targets = [0] * 40 + [1] * 40
    assert stratified_split(targets, 0.25, seed=3) == stratified_split(targets, 0.25, seed=3)
    assert stratified_split(targets, 0.25, seed=3)[1] != stratified_split(targets, 0.25, seed=4)[1]


def test_stratified_split_zero_fraction_and_bad_fraction():
    assert stratified_split([0, 1, 0, 1], 0.0, seed=0) == ([0, 1, 2, 3], [])
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        stratified_split([0, 1], 1.0, seed=0)


def test_train_transform_crops_flips_and_normalises():
    image = Image.new("RGB", (300, 200), color=(124, 116, 104))  # ~ the ImageNet mean colour
    out = train_transform(224)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip((124, 116, 104), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    )
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-3)


def test_eval_transform_is_square_resize_then_center_crop():
    # Left half black, right half white: a square resize keeps the edge in the middle of the crop,
    # whereas an aspect-preserving resize of this wide image would crop most of the black half away.
    image = Image.new("RGB", (400, 100), color=(0, 0, 0))
    image.paste((255, 255, 255), (200, 0, 400, 100))
    out = eval_transform(224)(image)
    assert out.shape == (3, 224, 224)
    row = out[0, 112]
    black, white = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(row[:100], torch.full((100,), black), atol=1e-3)
    assert torch.allclose(row[-100:], torch.full((100,), white), atol=1e-3)
    assert eval_transform(32)(image).shape == (3, 32, 32)


def test_datamodule_splits_train_into_train_and_val_and_keeps_test_apart(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), n_train=10, n_test=3)
    dm = ImageFolderDataModule(root, batch_size=4, num_workers=0, val_fraction=0.2, image_size=32)
    assert dm.num_classes == 3
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.classes == ["a", "b", "c"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 9)
    train_files = {dm.train_set.dataset.samples[i][0] for i in dm.train_set.indices}
    val_files = {dm.val_set.dataset.samples[i][0] for i in dm.val_set.indices}
    assert not train_files & val_files
    assert all("/train/" in f for f in train_files | val_files)
    assert Counter(dm.val_set.dataset.targets[i] for i in dm.val_set.indices) == {0: 2, 1: 2, 2: 2}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape[1:] == (3, 32, 32)


def test_val_images_use_the_deterministic_eval_transform(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=2)
    dm = ImageFolderDataModule(root, batch_size=8, num_workers=0, val_fraction=0.4, image_size=32)
    dm.setup("fit")
    first, _ = next(iter(dm.val_dataloader()))
    second, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(first, second)


def test_missing_dataset_folder_says_what_to_do(tmp_path):
    dm = ImageFolderDataModule(tmp_path / "nowhere", num_workers=0)
    with pytest.raises(FileNotFoundError, match="does not exist.*data.root"):
        dm.prepare_data()


def test_folder_without_test_split_is_rejected(tmp_path):
    root = make_image_folder(tmp_path / "data")
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    dm = ImageFolderDataModule(root, num_workers=0)
    with pytest.raises(FileNotFoundError, match="has no test/ folder"):
        dm.setup("test")


def test_train_and_test_classes_must_match(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("a", "b"))
    (root / "test" / "b").rename(root / "test" / "z")
    dm = ImageFolderDataModule(root, num_workers=0)
    with pytest.raises(ValueError, match="Train and test classes differ"):
        dm.setup("test")


AUG = {"_target_": "finetune.data.transforms.train_transform", "_partial_": True}  # conf/data/folder.yaml's node


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, r"data.image_size must be an integer >= 1 \(the side of the square crop .*\), got 0\."),
        ({"image_size": -32}, r"data.image_size must be an integer >= 1 .*got -32\."),
        ({"image_size": 22.5}, r"data.image_size must be an integer >= 1 .*got 22.5\."),
        (
            {"image_size": 224, "resize_size": 200},
            r"data.resize_size=200 is smaller than data.image_size=224: the centre crop would pad .* black borders\. "
            r"Use data.resize_size >= data.image_size, or null .* = 256\)\.",
        ),
        ({"resize_size": 0}, r"data.resize_size must be an integer >= 1 .*got 0\."),
        ({"batch_size": 0}, r"data.batch_size must be an integer >= 1 \(images per device and step\), got 0\."),
        ({"batch_size": -4}, r"data.batch_size must be an integer >= 1 .*got -4\."),
        ({"num_workers": -1}, r"data.num_workers must be an integer >= 0 .*got -1\."),
        ({"split_seed": "a"}, r"data.split_seed must be an integer .*got 'a'\."),
        ({"val_fraction": 0.0}, r"data.val_fraction must be strictly between 0 and 1, got 0.0: the validation split"),
        ({"val_fraction": 0}, r"data.val_fraction must be strictly between 0 and 1, got 0: .*selects the checkpoint"),
        ({"val_fraction": 1.0}, r"data.val_fraction must be strictly between 0 and 1, got 1.0"),
        ({"val_fraction": -0.1}, r"data.val_fraction must be strictly between 0 and 1, got -0.1"),
        ({"val_fraction": "0.1"}, r"data.val_fraction must be a number, got '0.1'\."),
        ({"augmentation": AUG | {"policy": "no"}}, r"data.augmentation.policy must be null or one of trivial, .*'no'"),
        ({"augmentation": AUG | {"random_erasing": 1.5}}, r"data.augmentation.random_erasing must be in \[0, 1\]"),
        (
            {"augmentation": AUG | {"policy": "trivial"}, "augment_on": "device"},
            r"data.augmentation.policy=trivial run in the loader: data.augment_on=device",
        ),
        ({"augmentation": AUG | {"zoom_out": 1.0}}, r"zoom_out must be a number > 1 or null, got 1\.0"),
        ({"augmentation": AUG | {"zoom_out": "big"}}, r"data.augmentation.zoom_out must be a number > 1 .*'big'"),
        (
            {"augmentation": AUG | {"zoom_out": 2}, "augment_on": "device"},
            r"data.augmentation.zoom_out=2 run in the loader: data.augment_on=device",
        ),
        ({"skip_corrupt": 1}, r"data.skip_corrupt must be true or false, got 1\."),
        ({"download": {"url": "http://x/a.zip"}}, r"data.download must be null or a mapping with a url and .*sha1"),
        ({"cache_short_side": 0}, r"data.cache_short_side must be an integer >= 1 .*got 0\."),
        ({"augmentation": AUG | {"crop_scale": [0, 1]}}, r"crop_scale must be \[min, max\] with 0 < min <= max <= 1"),
        ({"augmentation": AUG | {"crop_scale": [0.5, 0.2]}}, r"data.augmentation.crop_scale must be .*\[0.5, 0.2\]"),
        ({"augmentation": AUG | {"crop_scale": [0.5, 1.5]}}, r"data.augmentation.crop_scale must be .*\[0.5, 1.5\]"),
        ({"augmentation": AUG | {"crop_scale": [0.5]}}, r"data.augmentation.crop_scale must be .*got \[0.5\]\."),
        ({"augmentation": AUG | {"crop_scale": "0.5"}}, r"data.augmentation.crop_scale must be .*got '0.5'\."),
    ],
)
def test_out_of_range_values_are_rejected_by_their_config_name(tmp_path: Path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule.check_settings({"root": tmp_path, **kwargs})


def test_resize_defaults_to_the_book_ratio_so_a_large_crop_gets_no_black_border(tmp_path):
    assert ImageFolderDataModule(tmp_path).resize_size == 256
    assert ImageFolderDataModule(tmp_path, image_size=32, resize_size=36).resize_size == 36
    dm = ImageFolderDataModule(tmp_path, image_size=384)
    assert dm.resize_size == 439
    white = Image.new("RGB", (500, 375), color=(255, 255, 255))
    out = eval_transform(384, dm.resize_size)(white)
    assert out.shape == (3, 384, 384)
    assert torch.allclose(out[0].min(), torch.tensor((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]), atol=1e-3)


def _halves_image(root: Path) -> Path:
    """A square training image whose left half is red and right half blue, in both classes of a folder."""
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_crop_scale_sets_the_area_of_the_training_crop(tmp_path):
    """crop_scale=[1, 1] crops the whole (square) photo, so both halves show; the book's range often cuts one off."""
    root = _halves_image(tmp_path / "data")

    def red_fractions(crop_scale) -> list[float]:
        torch.manual_seed(0)
        augmentation = partial(train_transform, crop_scale=crop_scale)
        dm = ImageFolderDataModule(root, num_workers=0, image_size=16, augmentation=augmentation, val_fraction=0.2)
        dm.setup("fit")
        unnormalised = [
            dm.train_set[i % len(dm.train_set)][0][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0] for i in range(40)
        ]
        return [float((red > 0.5).float().mean()) for red in unnormalised]

    whole = red_fractions([1.0, 1.0])
    assert all(abs(fraction - 0.5) <= 1 / 16 for fraction in whole)  # half the columns red, up to the boundary
    book = red_fractions([0.08, 1.0])
    assert sum(fraction in (0.0, 1.0) for fraction in book) >= 5  # crops inside one half
    augmentation = partial(train_transform, crop_scale=[0.35, 1])
    dm = ImageFolderDataModule(
        root, num_workers=0, image_size=16, augmentation=augmentation, augment_on="device", val_fraction=0.2
    )
    dm.setup("fit")
    assert dm.device_augment.scale == (0.35, 1) and dm.hparams.augmentation == {"crop_scale": [0.35, 1]}


def test_a_class_without_validation_images_names_val_fraction_and_the_counts(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog"), n_train=10, n_test=2)
    for image in sorted((root / "train" / "dog").iterdir())[2:]:
        image.unlink()  # dog keeps 2 training images: round(0.2 * 2) = 0 go to val
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.2, image_size=32)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith("data.val_fraction=0.2 leaves 1 class(es) without training or validation images")
    assert "class 'dog': 2 train, 0 val" in message and "'cat'" not in message
    assert "selects the checkpoint that is tested" in message


def test_a_class_without_training_images_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog"), n_train=10, n_test=2)
    for image in sorted((root / "train" / "cat").iterdir())[1:]:
        image.unlink()  # cat keeps 1 training image: round(0.9 * 1) = 1 goes to val
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.9, image_size=32)
    with pytest.raises(ValueError, match=r"data.val_fraction=0.9 leaves .*class 'cat': 0 train, 1 val"):
        dm.setup("fit")


def test_shorter_side_keeps_the_aspect_ratio_that_square_squashes():
    """A 2:1 photo whose red channel is its x coordinate: square keeps nearly all columns (squashed), shorter_side
    keeps the middle half of them at their own proportions."""
    columns = np.linspace(0, 255, 80).astype(np.uint8)
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[..., 0] = columns
    photo = Image.fromarray(pixels)

    def red_range(transform) -> float:
        red = transform(photo)[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        return float(red.max() - red.min())

    square = red_range(eval_transform(32, 36))
    kept = red_range(eval_transform(32, 36, eval_resize="shorter_side"))
    assert square > 0.85  # 32 of 36 squashed columns: ~89% of the photo's width
    assert 0.38 < kept < 0.50  # 32 of 72 columns: 44% of its width
    with pytest.raises(ValueError, match=r"data.eval_resize must be one of square, shorter_side .*got 'crop'"):
        ImageFolderDataModule.check_settings({"root": ".", "eval_resize": "crop"})


def test_the_checkpoint_preprocessing_records_the_resize_mode():
    kept = Preprocessing.of(32, 36, eval_resize="shorter_side")
    assert kept.eval_resize == "shorter_side" and Preprocessing.of(32, 36).eval_resize == "square"
    assert Preprocessing.from_dict(kept.to_dict()) == kept
    resize, crop = kept.transform().transforms[:2]  # the transform is built from the record
    assert list(resize.size) == [36] and list(crop.size) == [32, 32]  # one number: the shorter side goes to 36
    assert list(Preprocessing.of(32, 36).transform().transforms[0].size) == [36, 36]
    old = {k: v for k, v in Preprocessing.of(32, 36).to_dict().items() if k != "eval_resize"}
    assert Preprocessing.from_dict(old).eval_resize == "square"  # checkpoints from before the choice
