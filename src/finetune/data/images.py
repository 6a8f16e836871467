"""How an image file is read: as 8-bit RGB, upright (its EXIF orientation applied), or refused naming the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

# 16-bit grayscale, as PNG decodes it ("I" in Pillow versions before 10.x, "I;16" after).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF Orientation values that turn or mirror the stored pixels (1 is upright; 2-8 per the EXIF standard);
# 5-8 also swap width and height.
_ORIENTATION_TAG = 0x0112
_TURNING_ORIENTATIONS = range(2, 9)
_SWAPPING_ORIENTATIONS = range(5, 9)
# Modes whose 8-bit meaning is clear: PIL's own conversion to RGB (alpha is dropped, as ImageFolder does).
_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def is_image_file(path: str) -> bool:
    """Images are recognised by extension, as torchvision's ``ImageFolder`` does."""
    return path.lower().endswith(IMG_EXTENSIONS)


def load_rgb(path: str, draft: bool = False) -> Image.Image:
    """Open ``path`` as 8-bit RGB: the one way images are read (ImageFolder, the image check, the image cache).

    PIL's ``convert("RGB")`` clips 16-bit grayscale (PNG's ``I;16``/``I``) at 255, so such photos turned white;
    here 16-bit values are scaled to 8 bits (``value >> 8``). Palette, alpha, CMYK and the like go through PIL's
    conversion; modes without a clear 8-bit reading (32-bit float ``F``, ...) are refused naming the file.
    The EXIF Orientation tag is applied (a phone photo stored sideways with Orientation=6 is read upright), as
    every photo viewer shows it: train, evaluate, predict, the caches and the shift benchmark all read through here.
    ``draft`` decodes JPEGs at 1/8 scale (still reading the whole file): enough to check that it decodes.
    """
    with open(path, "rb") as file:
        return decode_rgb(file, path, draft)


def decode_rgb(file: BinaryIO, name: str | os.PathLike, draft: bool = False) -> Image.Image:
    """:func:`load_rgb` of an open binary file (an image file's bytes, e.g. from a shard); ``name`` for messages."""
    path = name
    image = Image.open(file)
    if draft and image.format == "JPEG":
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()
    if exif_orientation(image) in _TURNING_ORIENTATIONS:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 0xFFFF):
            raise ValueError(
                f"{printable(path)}: PIL mode {image.mode!r} with values {pixels.min()}..{pixels.max()} is not 16-bit "
                "grayscale, and there is no single way to read it as 8 bits. Convert it to 8-bit RGB."
            )
        return Image.fromarray((pixels >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency, resolved before the alpha is dropped
    if image.mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    raise ValueError(
        f"{printable(path)}: cannot read PIL image mode {image.mode!r} as 8-bit RGB (readable: 8-bit modes "
        f"{', '.join(_EIGHT_BIT_MODES)}, and 16-bit grayscale). Convert the file to 8-bit RGB."
    )


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF Orientation (1, upright, when absent or unreadable)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels are read as stored, as before
        return 1
    return value if isinstance(value, int) else 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as the image is shown (and loaded by :func:`load_rgb`): swapped for EXIF Orientation 5-8."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def printable(path: str | bytes | os.PathLike) -> str:
    """``path`` as text any log handler or JSON file can take: bytes that are not UTF-8 become ``\\xe9`` escapes."""
    text = os.fsdecode(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # the name's bytes
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def preview(items: Sequence[str], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` items, ``sep``-separated, and how many more (for messages about long lists of files)."""
    shown = sep.join(printable(item) for item in items[:limit])
    return (shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")) or "nothing"
