"""Decoded-image cache: decode (and shrink) every image once, keep the uint8 pixels in memory or on disk.

Decoding a JPEG and resampling it through PIL costs more CPU than the random crop and flip that follow, and on a
small data set the same few hundred files are decoded again every epoch. With ``data.cache=memory`` (or ``disk``)
each image is decoded once into a uint8 ``CxHxW`` tensor and the per-epoch transforms run on that tensor:

- training images are stored at their decoded size (``data.cache_short_side=null``, the default) and
  ``RandomResizedCrop`` + flip are applied to the stored tensor every epoch, so the crops come from the same pixels
  as without the cache. ``cache_short_side=N`` (>= ``image_size``) shrinks the shorter side to N to save memory: the
  crop's *content* distribution is unchanged (its scale and ratio are fractions of the image) but its source
  resolution is capped, so most crops are upsampled from fewer pixels and training images get blurrier than the
  test images (measured on the hot dog photos: see docs/performance.md).
- evaluation images (val, test, and train when ``data.augmentation=null``) go through the deterministic part of the eval
  transform (square ``Resize`` then ``CenterCrop``) before they are stored, so they are bit-identical to the
  uncached path and only the float conversion and normalisation run per epoch.

Everything lives in one flat uint8 buffer per split: a tensor (``memory``) or a file mapped with ``np.memmap``
(``disk``, reused by later runs and shared by loader workers through the page cache). A disk cache is keyed by the
files' paths, sizes and modification times and by the preprocessing settings, so a changed file or setting builds
a new cache instead of serving stale pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from finetune import atomic
from finetune.atomic import remove_stale
from finetune.data.images import load_rgb
from finetune.errors import SettingError
from finetune.progress import track
from finetune.workers import worker_context

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")
_FORMAT_VERSION = 2  # 2: EXIF orientation applied (a cache of version 1 holds photos as stored)


class ShrinkShorterSide:
    """Resize a PIL image so that its shorter side is at most ``size`` (never enlarges; ``None`` keeps it)."""

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.size is None or min(image.size) <= self.size:
            return image
        return F.resize(image, self.size, antialias=True)

    def __repr__(self) -> str:
        return f"ShrinkShorterSide({self.size})"


class PackedImages:
    """uint8 ``CxHxW`` images stored back to back in one flat buffer (a tensor, or a read-only ``np.memmap``)."""

    def __init__(self, buffer: torch.Tensor | np.memmap, offsets: Sequence[int], shapes: Sequence[Sequence[int]]):
        if len(offsets) != len(shapes):
            raise SettingError(f"PackedImages needs one offset per shape, got {len(offsets)} and {len(shapes)}.")
        self.buffer = buffer
        self.offsets = list(offsets)
        self.shapes = [tuple(shape) for shape in shapes]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        shape = self.shapes[index]
        start, size = self.offsets[index], int(np.prod(shape))
        if isinstance(self.buffer, torch.Tensor):
            return self.buffer[start : start + size].view(shape)
        return torch.from_numpy(np.array(self.buffer[start : start + size])).view(shape)  # copy out of the map

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes)


class CachedImageDataset(Dataset):
    """``(transform(image), target)`` pairs over cached uint8 images, like ``ImageFolder`` over files."""

    def __init__(self, images: PackedImages, targets: Sequence[int], transform: Callable | None = None) -> None:
        if len(images) != len(targets):
            raise SettingError(f"{len(images)} cached images but {len(targets)} targets.")
        self.images = images
        self.targets = list(targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


class _Decode(Dataset):
    """Open each file with ImageFolder's loader (8-bit RGB), apply ``prepare`` (PIL -> PIL), return uint8 CxHxW."""

    def __init__(self, paths: Sequence[str], prepare: Callable) -> None:
        self.paths = list(paths)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return F.pil_to_tensor(self.prepare(load_rgb(self.paths[index]))).contiguous()


def _decoded(paths: Sequence[str], prepare: Callable, num_workers: int) -> Iterator[torch.Tensor]:
    """Decoded images in order, decoded in ``num_workers`` processes (0: in this one).

    The loader draws its worker seed from torch's global generator; the draw is undone so that a cached run
    shuffles, crops and flips exactly as the uncached run with the same seed.
    """
    with torch.random.fork_rng(devices=[]):
        loader = DataLoader(
            _Decode(paths, prepare),
            batch_size=None,
            num_workers=num_workers,
            multiprocessing_context=worker_context(num_workers),
        )
        yield from track(loader, total=len(paths), description="Caching images", unit="images")


def cache_key(paths: Sequence[str], prepare: Callable) -> str:
    """What a disk cache entry depends on: each file's path, size and mtime, and the preprocessing."""
    files = []
    for path in paths:
        stat = os.stat(path)
        files.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    payload = json.dumps({"version": _FORMAT_VERSION, "prepare": repr(prepare), "files": files})
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def build_cache(
    paths: Sequence[str],
    prepare: Callable,
    mode: str,
    name: str,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> PackedImages:
    """Decode ``paths`` once through ``prepare`` into a :class:`PackedImages` held in memory or on disk.

    ``mode="disk"`` reuses ``cache_dir/<name>-<key>.u8`` when a previous run built it for the same files and
    preprocessing, and its size and index agree (otherwise it is rebuilt, with a warning); a new one is written to
    a temporary file and renamed into place, so a crash or a concurrent run never leaves a half-written cache
    behind, and the temporary files of killed runs are removed by the next one.
    """
    if mode not in ("memory", "disk"):
        raise SettingError(f"Unknown cache mode {mode!r}: data.cache must be one of {CACHE_MODES}.")
    start = time.perf_counter()
    if mode == "memory":
        images = list(_decoded(paths, prepare, num_workers))
        offsets = np.cumsum([0] + [image.numel() for image in images[:-1]]).tolist() if images else []
        buffer = torch.cat([image.flatten() for image in images]) if images else torch.empty(0, dtype=torch.uint8)
        packed = PackedImages(buffer, offsets, [image.shape for image in images])
        seconds = time.perf_counter() - start
        log.info("Cached %d %s images in memory (%.0f MB) in %.1fs.", len(packed), name, packed.nbytes / 2**20, seconds)
        return packed

    if cache_dir is None:
        raise SettingError("data.cache=disk needs data.cache_dir: a writable folder for the decoded images.")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(cache_dir, ".*.", ".tmp")  # half-written caches of runs that were killed
    stem = cache_dir / f"{name}-{cache_key(paths, prepare)}"
    data_file, index_file = stem.with_suffix(".u8"), stem.with_suffix(".json")
    index, problem = _read_disk_cache(paths, data_file, index_file)
    if index is None:
        if problem:
            log.warning("Rebuilding the image cache %s: %s", data_file, problem)
        index = _write_disk_cache(paths, prepare, data_file, index_file, num_workers)
        seconds = time.perf_counter() - start
        log.info("Cached %d %s images on disk at %s in %.1fs.", len(paths), name, data_file, seconds)
    total = _packed_size(index["shapes"])
    buffer = np.memmap(data_file, dtype=np.uint8, mode="r", shape=(total,)) if total else np.zeros(0, np.uint8)
    return PackedImages(buffer, index["offsets"], index["shapes"])


def _packed_size(shapes: Sequence[Sequence[int]]) -> int:
    return sum(int(np.prod(shape)) for shape in shapes)


def _read_disk_cache(paths: Sequence[str], data_file: Path, index_file: Path) -> tuple[dict | None, str | None]:
    """``(index, None)`` for a complete cache of ``paths``; ``(None, why not)`` otherwise (``why`` is None if absent).

    The key in the name already covers the files and settings; this catches what the key cannot: a data file
    truncated or overwritten (full disk, a copy cut short) and an index that does not describe it.
    """
    if not data_file.is_file() and not index_file.is_file():
        return None, None
    if not (data_file.is_file() and index_file.is_file()):
        return None, f"{(index_file if data_file.is_file() else data_file).name} is missing"
    try:
        index = json.loads(index_file.read_text())
        offsets, shapes, files = index["offsets"], index["shapes"], index["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"its index {index_file.name} is unreadable ({type(err).__name__}: {err})"
    if files != list(paths):
        return None, f"its index lists {len(files)} files that are not the {len(paths)} images of this split"
    sizes = [int(np.prod(shape)) for shape in shapes]
    if len(offsets) != len(sizes) or offsets != np.cumsum([0, *sizes[:-1]]).tolist()[: len(sizes)]:
        return None, f"its index {index_file.name} has inconsistent offsets and shapes"
    actual, expected = data_file.stat().st_size, sum(sizes)
    if actual != expected:
        return None, f"the file holds {actual} bytes but its index describes {expected} (truncated or overwritten)"
    return index, None


def _write_disk_cache(paths, prepare, data_file: Path, index_file: Path, num_workers: int) -> dict:
    """Each file whole or not at all (:mod:`finetune.atomic`); the data first: the index's presence says the entry
    is complete."""
    offsets, shapes, offset = [], [], 0
    with atomic.atomic_write(data_file, "wb") as out:
        for image in _decoded(paths, prepare, num_workers):
            out.write(image.numpy().tobytes())
            offsets.append(offset)
            shapes.append(list(image.shape))
            offset += image.numel()
    index = {"offsets": offsets, "shapes": shapes, "files": list(paths)}
    atomic.write_json(index_file, index, indent=None)
    return index
