"""The decoded-image cache (data.cache): exact eval images, shrunk training images, reuse, and clear errors."""

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data import ImageFolderDataModule
from finetune.data.cache import ShrinkShorterSide, build_cache
from finetune.train import train

from .conftest import compose_config, make_image_folder, tiny_overrides


def _datamodule(root, **kwargs) -> ImageFolderDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "val_fraction": 0.2, "image_size": 32, "resize_size": 36, **kwargs}
    dm = ImageFolderDataModule(root, **kwargs)
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_eval_images_are_bit_identical_and_train_images_keep_their_labels(tmp_path, tiny_folder, mode):
    plain = _datamodule(tiny_folder)
    cached = _datamodule(tiny_folder, cache=mode, cache_short_side=38, cache_dir=tmp_path / "cache")
    for split in ("val_set", "test_set"):
        a, b = getattr(plain, split), getattr(cached, split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    train_targets = [plain.train_set.dataset.targets[i] for i in plain.train_set.indices]
    assert cached.train_set.targets == train_targets
    image, target = cached.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == train_targets[0]
    # the generated images are 36-40 px high and 40 wide: shrunk to a 38 px shorter side, never enlarged
    assert {min(shape[1:]) for shape in cached.train_set.images.shapes} == {36, 37, 38}
    images, labels = next(iter(cached.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_train_without_augmentation_uses_the_eval_transform_cached_or_not(tiny_folder):
    plain = _datamodule(tiny_folder, augmentation=None)
    cached = _datamodule(tiny_folder, augmentation=None, cache="memory")
    for i in (0, len(plain.train_set) - 1):
        assert torch.equal(plain.train_set[i][0], cached.train_set[i][0])
        assert torch.equal(plain.train_set[i][0], plain.train_set[i][0])  # deterministic: no random crop/flip


def test_disk_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=3, n_test=1)
    paths = sorted(str(p) for p in (root / "train").rglob("*.png"))
    first = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".json", ".u8"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").iterdir())] == mtimes  # reused, not rewritten
    assert all(torch.equal(first[i], again[i]) for i in range(len(paths)))

    Image.new("RGB", (20, 30), (255, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a different size and mtime
    rebuilt = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    assert rebuilt[0].shape == (3, 30, 20) and (rebuilt[0][0] == 255).all()
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "gpu"}, r"Unknown data.cache='gpu'"),
        ({"cache": "memory", "cache_short_side": 16}, r"cache_short_side=16 is below data.image_size=32"),
        ({"cache": "disk", "cache_dir": None}, r"data.cache=disk needs data.cache_dir"),
    ],
)
def test_bad_cache_settings_are_rejected(tiny_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule.check_settings({"root": tiny_folder, "image_size": 32, **kwargs})


def test_a_run_trains_from_the_disk_cache(tmp_path, tiny_folder):
    overrides = ["data.cache=disk", "data.cache_short_side=36", f"paths.data_dir={tmp_path}", "trainer.max_epochs=1"]
    results = train(compose_config(overrides + tiny_overrides(tiny_folder, tmp_path)))
    assert results["epochs"] == 1
    # accuracies counted over the cached splits: 8 test images, 4 validation images (2 of 10 per class)
    assert round(results["test/acc"] * 8, 4) in range(9) and round(results["val/acc"] * 4, 4) in range(5)
    assert sorted(f.name.split("-")[0] for f in (tmp_path / "cache").glob("*.u8")) == ["test", "train", "val"]


def test_full_size_cache_crops_like_the_uncached_path_and_leaves_the_random_stream_alone(tiny_folder):
    torch.manual_seed(0)
    plain = _datamodule(tiny_folder)
    expected_next_draw = torch.rand(3)
    torch.manual_seed(0)
    cached = _datamodule(tiny_folder, cache="memory", num_workers=1)  # decoding in a worker draws a seed
    assert torch.equal(torch.rand(3), expected_next_draw)
    for i in range(len(plain.train_set)):
        torch.manual_seed(i)
        a = plain.train_set[i][0]
        torch.manual_seed(i)
        b = cached.train_set[i][0]  # same crop box and flip; only PIL's and torch's resampling differ
        assert (a - b).abs().mean() < 0.05, i


def _dead_pid() -> int:
    """A pid no process can have: Linux hands out pids below pid_max only."""
    pid_max = Path("/proc/sys/kernel/pid_max")
    return int(pid_max.read_text()) + 1 if pid_max.exists() else 2**22 + 1


def _disk_cache(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=3, n_test=1)
    paths = sorted(str(p) for p in (root / "train").rglob("*.png"))
    first = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    (data_file,) = (tmp_path / "cache").glob("*.u8")
    return paths, [first[i].clone() for i in range(len(paths))], data_file


def test_a_truncated_disk_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    paths, expected, data_file = _disk_cache(tmp_path)
    size = data_file.stat().st_size
    data_file.write_bytes(data_file.read_bytes()[: size // 2])  # a copy cut short, a full disk
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        images = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    assert [r.getMessage() for r in caplog.records] == [
        f"Rebuilding the image cache {data_file}: the file holds {size // 2} bytes but its index describes {size} "
        "(truncated or overwritten)"
    ]
    assert data_file.stat().st_size == size
    assert all(torch.equal(images[i], expected[i]) for i in range(len(paths)))


def test_a_disk_cache_whose_index_lists_other_files_is_rebuilt(tmp_path, caplog):
    paths, expected, data_file = _disk_cache(tmp_path)
    index_file = data_file.with_suffix(".json")
    index = json.loads(index_file.read_text())
    index["files"] = index["files"][::-1]
    index_file.write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        images = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        f"Rebuilding the image cache {data_file}: its index lists 6 files that are not the 6 images of this split"
    )
    assert json.loads(index_file.read_text())["files"] == paths
    assert all(torch.equal(images[i], expected[i]) for i in range(len(paths)))


def test_a_disk_cache_with_an_unreadable_index_is_rebuilt(tmp_path, caplog):
    paths, expected, data_file = _disk_cache(tmp_path)
    data_file.with_suffix(".json").write_text('{"offsets": [0')
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        images = build_cache(paths, ShrinkShorterSide(None), "disk", "train", tmp_path / "cache")
    assert "index train-" in caplog.records[0].getMessage() and "is unreadable (JSONDecodeError" in caplog.text
    assert all(torch.equal(images[i], expected[i]) for i in range(len(paths)))


def test_temporary_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    host = socket.gethostname()
    dead = cache / f".train-abc.u8.{host}.{_dead_pid()}.tmp"
    dead_index = cache / f".train-abc.json.{host}.{_dead_pid()}.tmp"
    live = cache / f".val-abc.u8.{host}.{os.getppid()}.tmp"  # the process that started pytest
    own = cache / f".val-abc.json.{host}.{os.getpid()}.tmp"
    elsewhere = cache / f".test-abc.u8.other-node.{_dead_pid()}.tmp"  # another host's pid cannot be checked here
    for path in (dead, dead_index, live, own, elsewhere):
        path.write_bytes(b"half written")
    _disk_cache(tmp_path)
    left = sorted(p.name for p in cache.iterdir() if p.name.startswith("."))
    assert left == sorted([live.name, own.name, elsewhere.name])
