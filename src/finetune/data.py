"""The image-classification data: download and verify, split, transform, load.

One ``LightningDataModule`` serves the d2l hot dog set (downloaded from the d2l data server and checked against
its sha1) and any folder laid out as ``train/<class>/*`` and ``test/<class>/*``. A validation split is carved
from train, stratified by class and seeded; the test split is touched only by ``trainer.test``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from finetune.cache import CACHE_MODES, CachedImageDataset, ShrinkShorterSide, build_cache
from finetune.workers import worker_context

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# d2l's DATA_HUB["hotdog"]: DATA_URL + "hotdog.zip" and its sha1.
HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"


def train_transform(image_size: int = 224) -> v2.Compose:
    """The book's training augmentation: random resized crop, horizontal flip, ImageNet normalisation."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int = 224, resize_size: int | None = None) -> v2.Compose:
    """The book's evaluation transform: a *square* resize (256x256 for 224 crops), then a centre crop."""
    return v2.Compose([*eval_geometry(image_size, resize_size).transforms, *to_normalized_tensor().transforms])


def eval_geometry(image_size: int = 224, resize_size: int | None = None) -> v2.Compose:
    """The deterministic, pixel-changing part of :func:`eval_transform` (what the image cache stores)."""
    resize_size = resize_size or round(image_size * 256 / 224)
    return v2.Compose([v2.Resize([resize_size, resize_size], antialias=True), v2.CenterCrop(image_size)])


def to_normalized_tensor() -> v2.Compose:
    """uint8 image (PIL or tensor) -> float tensor in [0, 1] -> ImageNet-normalised."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) so that each class gives ``round(val_fraction * n_class)`` to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(seed)
    train, val = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        n_val = round(val_fraction * len(indices))
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def sha1_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_and_extract(url: str, sha1: str, root: Path, timeout: float = 60.0) -> Path:
    """Make ``root`` hold the archive's extracted folder, downloading and verifying it only if needed.

    The archive is downloaded to a ``.part`` file, checked against ``sha1`` and only then renamed; a file that
    fails the check is deleted and never extracted. Extraction goes to a temporary folder that is renamed into
    place, so an existing ``root`` is always complete.
    """
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = root.parent / Path(urllib.parse.urlparse(url).path).name
    if archive.exists() and sha1_of(archive) != sha1:
        log.warning("Existing %s does not match sha1 %s (partial or corrupt); downloading it again.", archive, sha1)
        archive.unlink()
    if not archive.exists():
        _download_verified(url, sha1, archive, root, timeout)

    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.extracting-") as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        extracted = Path(tmp) / root.name
        if not extracted.is_dir():
            top = sorted(p.name for p in Path(tmp).iterdir())
            raise ValueError(f"{archive} does not contain a top-level folder {root.name!r} (it holds {top}).")
        try:
            extracted.rename(root)
        except OSError:
            if not root.is_dir():  # another process (a rank on another node) may have won the race
                raise
    return root


def _download_verified(url: str, sha1: str, archive: Path, root: Path, timeout: float) -> None:
    part = archive.with_name(f"{archive.name}.{os.getpid()}.part")  # per process: ranks may race
    log.info("Downloading %s to %s", url, archive)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            expected_size = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, length=1 << 20)
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused or cut connections
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"Could not download {url} ({err}). Offline, put the extracted dataset at {root} yourself, "
            "or point the run at a local copy: data=folder data.root=PATH (a folder with train/<class>/ and "
            "test/<class>/). Pretrained weights need the same care offline: model.weights=PATH to a local "
            "state_dict, or a pre-filled $TORCH_HOME/hub/checkpoints (see README, 'Working offline')."
        ) from err
    actual = sha1_of(part)
    if actual != sha1:
        size = part.stat().st_size
        part.unlink()
        raise RuntimeError(
            f"Downloaded {url} is corrupt or incomplete: sha1 {actual} ({size} bytes"
            + (f" of {expected_size} announced" if expected_size else "")
            + f"), expected {sha1}. The file was deleted; run again to retry the download."
        )
    os.replace(part, archive)


def is_image_file(path: str) -> bool:
    """Images are recognised by extension, as torchvision's ``ImageFolder`` does."""
    return path.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: Path) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """``{split: {class: [image paths]}}`` for ``train`` and ``test``, and the non-image files found beside them.

    Raises with the folder to fix when a split is missing, holds no class folders, has a class folder without
    images, or when train and test do not have the same classes.
    """
    found: dict[str, dict[str, list[str]]] = {}
    others: list[str] = []
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"{str(root)!r} has no {split}/ folder. The dataset folder must hold train/<class>/ and "
                f"test/<class>/ image folders; found {sorted(p.name for p in root.iterdir())}."
            )
        classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
        if not classes:
            loose = sorted(entry.name for entry in os.scandir(split_dir))
            raise ValueError(
                f"{str(split_dir)!r} holds no class folders (it holds {_preview(loose)}). Put each class's images "
                f"in a folder of its own: {split}/<class>/<image>, e.g. {split}/hot_dog/1.jpg."
            )
        found[split] = {}
        for name in classes:
            images = []
            for folder, _, files in sorted(os.walk(os.path.join(split_dir, name), followlinks=True)):
                for file in sorted(files):
                    path = os.path.join(folder, file)  # the same string ImageFolder builds
                    (images if is_image_file(path) else others).append(path)
            if not images:
                raise ValueError(
                    f"Class folder {os.path.join(split_dir, name)!r} holds no images (files ending in "
                    f"{', '.join(IMG_EXTENSIONS)}). Add its images, or delete the folder from both train/ and test/."
                )
            found[split][name] = images
    if sorted(found["train"]) != sorted(found["test"]):
        raise ValueError(
            f"Train and test classes differ in {str(root)!r}: train {sorted(found['train'])}, "
            f"test {sorted(found['test'])}. Both splits need the same class folders."
        )
    return found, others


def find_corrupt_images(paths: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """``{path: reason}`` for the images that cannot be decoded (corrupt, truncated, not really an image).

    Every image is decoded once; JPEGs at 1/8 scale (``draft``), which still reads the whole file, so a
    truncated one is caught. Decoding releases the GIL, so a few threads share the work.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_image_problem, paths))
    return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason}


def _image_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(err).__name__}: {err}"
    return None


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return (shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")) or "nothing"


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val/test loaders over ``root/train/<class>/*`` and ``root/test/<class>/*``.

    ``batch_size`` is per device (Lightning's convention: under DDP each process loads its own batch).
    With ``download`` (a mapping with ``url`` and ``sha1``) the folder is fetched and verified first.
    A corrupt image stops ``setup()`` naming the file; ``skip_corrupt=True`` leaves such images out with a warning.
    ``verify_images=False`` skips decoding every image up front (for very large, known-good folders).
    ``augment=False`` trains on the eval transform. ``cache="memory"|"disk"`` decodes every image once (see
    :mod:`finetune.cache`; ``cache_short_side=N`` shrinks cached training images to a shorter side of N).
    """

    def __init__(
        self,
        root: str | Path,
        download: dict | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 224,
        resize_size: int | None = None,
        skip_corrupt: bool = False,
        verify_images: bool = True,
        augment: bool = True,
        cache: str = "none",
        cache_short_side: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        if cache not in CACHE_MODES:
            raise ValueError(f"Unknown data.cache={cache!r}: choose one of {CACHE_MODES}.")
        if cache_short_side is not None and cache_short_side < image_size:
            raise ValueError(
                f"data.cache_short_side={cache_short_side} is below data.image_size={image_size}: cached images "
                "would be upsampled for every crop. Use a value >= image_size, or null to keep the original size."
            )
        if cache == "disk" and cache_dir is None:
            raise ValueError("data.cache=disk needs data.cache_dir: a writable folder for the decoded images.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = dict(download) if download else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.image_size = image_size
        self.resize_size = resize_size
        self.skip_corrupt = skip_corrupt
        self.verify_images = verify_images
        self._layout: dict[str, dict[str, list[str]]] | None = None
        self._corrupt: dict[str, dict[str, str]] = {}  # per split: {path: reason}
        self.augment = augment
        self.cache = cache
        self.cache_short_side = cache_short_side
        self.cache_dir = cache_dir
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.classes: list[str] = []

    def prepare_data(self) -> None:
        if self.download:
            download_and_extract(self.download["url"], self.download["sha1"], self.root)
        elif not self.root.is_dir():
            raise FileNotFoundError(
                f"Dataset folder {str(self.root)!r} does not exist. Set data.root to a folder holding "
                "train/<class>/ and test/<class>/ image folders (for example data.root=../shared/data/hotdog-kaggle)."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes, read from the class folders of ``root/train`` (available before ``setup``)."""
        if not self.classes:
            self.classes = sorted(self._scan()["train"])
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        eval_tf = eval_transform(self.image_size, self.resize_size)
        train_tf = train_transform(self.image_size) if self.augment else eval_tf
        if stage in ("fit", "validate", None) and self.train_set is None:
            keep = self._usable_images("train")
            self._usable_images("test")  # a corrupt test image must stop the run now, not after training
            augmented = ImageFolder(self._split_dir("train"), transform=train_tf, is_valid_file=keep)
            plain = ImageFolder(self._split_dir("train"), transform=eval_tf, is_valid_file=keep)
            self.classes = augmented.classes
            train_idx, val_idx = stratified_split(augmented.targets, self.val_fraction, self.split_seed)
            self.train_set = Subset(augmented, train_idx)
            self.val_set = Subset(plain, val_idx)
            if self.cache != "none":
                self.train_set = self._cached(self.train_set, "train", augmented=self.augment)
                self.val_set = self._cached(self.val_set, "val", augmented=False)
        if stage in ("test", "predict", None) and self.test_set is None:
            keep = self._usable_images("test")
            self.test_set = ImageFolder(self._split_dir("test"), transform=eval_tf, is_valid_file=keep)
            self.classes = self.test_set.classes
            if self.cache != "none":
                self.test_set = self._cached(self.test_set, "test", augmented=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _loader(self, dataset: Dataset | None, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() before asking for a data loader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else self._unrepeated_sampler(dataset),
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=worker_context(self.num_workers),
        )

    def _cached(self, dataset: ImageFolder | Subset, name: str, augmented: bool) -> CachedImageDataset:
        """The same samples, decoded once: whole (or shrunk) for the random crop, or through the eval geometry."""
        folder, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
        samples = folder.samples if indices is None else [folder.samples[i] for i in indices]
        if augmented:
            prepare, transform = ShrinkShorterSide(self.cache_short_side), train_transform(self.image_size)
        else:
            prepare, transform = eval_geometry(self.image_size, self.resize_size), to_normalized_tensor()
        images = build_cache(
            [path for path, _ in samples], prepare, self.cache, name, self.cache_dir, num_workers=self.num_workers
        )
        return CachedImageDataset(images, [target for _, target in samples], transform)

    def _unrepeated_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, shard val/test without padding, so that every sample is evaluated exactly once.

        Lightning's default ``DistributedSampler`` repeats samples until every rank has as many, which biases
        val/test metrics (50 images on 8 GPUs: 6 of them count twice). Evaluation never syncs per step, so
        uneven shards are safe as long as every rank gets at least one sample; otherwise keep the default.
        """
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not shards or shards["num_replicas"] < 2 or len(dataset) < shards["num_replicas"]:
            return None
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **shards)

    def _split_dir(self, split: str) -> Path:
        self._scan()
        return self.root / split

    def _scan(self) -> dict[str, dict[str, list[str]]]:
        """Check the layout once; warn about files that are not images (ImageFolder ignores them)."""
        if self._layout is None:
            self._layout, others = scan_image_folder(self.root)
            if others:
                log.warning(
                    "Ignoring %d file(s) in %s that are not images (by extension: %s): %s",
                    len(others),
                    self.root,
                    ", ".join(IMG_EXTENSIONS),
                    _preview([os.path.relpath(p, self.root) for p in others]),
                )
        return self._layout

    def _usable_images(self, split: str):
        """The ``is_valid_file`` test for ``split``: an image file that decodes, checked once for the whole split."""
        by_class = self._scan()[split]
        if split not in self._corrupt:
            paths = [path for images in by_class.values() for path in images]
            corrupt = find_corrupt_images(paths) if self.verify_images else {}
            if corrupt:
                listing = _preview([f"{path} ({reason})" for path, reason in sorted(corrupt.items())], limit=10)
                if not self.skip_corrupt:
                    raise ValueError(
                        f"{len(corrupt)} corrupt or truncated image(s) in {str(self.root / split)!r}: {listing}. "
                        "Replace or delete them, or pass data.skip_corrupt=true to train without them."
                    )
                emptied = [name for name, images in by_class.items() if all(path in corrupt for path in images)]
                if emptied:
                    raise ValueError(f"Every image of class(es) {emptied} in {str(self.root / split)!r} is corrupt.")
                log.warning(
                    "Skipping %d corrupt or truncated image(s) (data.skip_corrupt=true): %s", len(corrupt), listing
                )
            self._corrupt[split] = corrupt
        corrupt = self._corrupt[split]
        return lambda path: is_image_file(path) and path not in corrupt
