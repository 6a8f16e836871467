"""Reading images: 16-bit, palette, alpha and CMYK files reach the model as the right 8-bit RGB; odd modes and
odd file names are reported by name."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import ImageFolderDataModule, load_rgb
from finetune.data.images import printable

from .conftest import make_image_folder

RAMP = (np.arange(32 * 32, dtype=np.uint32) * 64 + 7).astype(np.uint16).reshape(32, 32)  # 7 .. 65479


def _save_16_bit_png(path: Path, pixels: np.ndarray = RAMP, big_endian: bool = False) -> Path:
    image = Image.fromarray(pixels.astype(">u2") if big_endian else pixels)
    assert image.mode == ("I;16B" if big_endian else "I;16")
    image.save(path)
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, big_endian):
    path = _save_16_bit_png(tmp_path / "gray16.png", big_endian=big_endian)
    assert Image.open(path).mode == "I;16"  # what PNG decodes to; PIL's convert("RGB") makes it almost all white
    pixels = np.asarray(load_rgb(str(path))).astype(int)
    assert pixels.shape == (32, 32, 3)
    expected = (RAMP >> 8).astype(int)
    for channel in range(3):
        assert np.abs(pixels[..., channel] - expected).max() <= 1
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200


def test_mode_i_16_bit_grayscale_is_scaled_and_32_bit_values_are_refused(tmp_path):
    Image.fromarray(RAMP.astype(np.int32)).save(tmp_path / "gray_i.tif")  # mode "I", as older Pillow opens PNGs
    assert Image.open(tmp_path / "gray_i.tif").mode == "I"
    pixels = np.asarray(load_rgb(str(tmp_path / "gray_i.tif"))).astype(int)
    assert np.abs(pixels[..., 0] - (RAMP >> 8)).max() <= 1
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"wide.tif: PIL mode 'I' with values 70000..70000 is not 16-bit"):
        load_rgb(str(tmp_path / "wide.tif"))


def test_a_float_image_is_refused_naming_the_file_and_mode(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=r"depth.tif: cannot read PIL image mode 'F' as 8-bit RGB"):
        load_rgb(str(tmp_path / "depth.tif"))


def test_palette_transparency_alpha_and_cmyk_become_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    Image.new("LA", (4, 4), (90, 0)).save(tmp_path / "gray_alpha.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert tuple(np.asarray(load_rgb(str(tmp_path / "palette.png")))[0, 0]) == (200, 10, 30)
    assert tuple(np.asarray(load_rgb(str(tmp_path / "gray_alpha.png")))[0, 0]) == (90, 90, 90)
    red = np.asarray(load_rgb(str(tmp_path / "cmyk.jpg"))).astype(int)[0, 0]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_16_bit_images_reach_the_model_scaled_with_and_without_the_cache(tmp_path, cache):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=1)
    for split, n in (("train", 5), ("test", 1)):
        for i in range(n):
            (root / split / "cat" / f"cat_{i:03d}.png").unlink()
            _save_16_bit_png(root / split / "cat" / f"cat_{i:03d}.png")
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.2, image_size=32, resize_size=32, cache=cache)
    dm.setup("test")
    image, target = dm.test_set[0]
    assert dm.classes[target] == "cat"
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (image * std[:, None, None] + mean[:, None, None]) * 255
    expected = torch.from_numpy((RAMP >> 8).astype(np.float32))
    assert (pixels - expected).abs().max() <= 1.5  # the 32 px resize of a 32 px image leaves the pixels alone


def test_a_float_image_in_the_folder_stops_setup_naming_file_and_mode(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=1)
    Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(root / "train" / "dog" / "depth.tif")
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.2, image_size=32)
    with pytest.raises(ValueError, match=r"1 corrupt or truncated image\(s\).*depth.tif.*mode 'F'"):
        dm.setup("fit")


def test_file_names_that_are_not_utf8_are_logged_with_escapes(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", n_train=5, n_test=1)
    cat, dog = os.fsencode(root / "train" / "cat"), os.fsencode(root / "train" / "dog")
    with open(cat + b"/notes-caf\xe9.txt", "wb") as file:
        file.write(b"not an image")
    with open(dog + b"/broken-caf\xe9.png", "wb") as file:
        file.write(b"not a png either")
    with open(dog + b"/good-caf\xe9.png", "wb") as file:
        file.write((root / "train" / "dog" / "dog_000.png").read_bytes())
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.2, image_size=32, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        dm.setup("fit")
    messages = [record.getMessage() for record in caplog.records]
    ignored = [m for m in messages if "not images" in m]
    skipped = [m for m in messages if "Skipping 1 corrupt" in m]
    assert len(ignored) == 1 and "notes-caf\\xe9.txt" in ignored[0]
    assert len(skipped) == 1 and "broken-caf\\xe9.png" in skipped[0]
    for message in ignored + skipped:
        message.encode("utf-8")  # what a log file handler does; a raw undecodable name raises here
    names = {os.path.basename(path) for path, _ in dm.train_set.dataset.samples}
    assert "good-caf\udce9.png" in names and "broken-caf\udce9.png" not in names
    assert len(dm.train_set) + len(dm.val_set) == 11


def test_printable_escapes_only_what_is_not_utf8():
    assert printable("caf\udce9.png") == "caf\\xe9.png"
    assert printable(b"caf\xe9.png") == "caf\\xe9.png"
    assert printable("café.png") == "café.png"
