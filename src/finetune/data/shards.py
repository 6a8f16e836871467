"""Streaming shards: an image folder's train/val/test splits written as LitData chunks, read back as a stream.

:func:`write_shards` takes the split of :class:`~finetune.data.datamodule.ImageFolderDataModule` (the same
``split_seed``, ``val_fraction``, ``folds``/``fold``, the same image checks) and stores every image's encoded file
bytes, its class and its name with ``litdata.optimize`` into ``OUTPUT/{train,val,test}/``, then ``manifest.json``
(the classes, the split settings, per split the count, the count per class and a digest of the file list).

:class:`ShardsDataModule` reads them with ``litdata.StreamingDataset`` and ``StreamingDataLoader`` (a local folder
or any URI LitData streams from: ``s3://``, ``gs://``, ``azure://``, ...) and decodes each image with the folder
path's own loader and transforms, so a run on shards trains, validates and tests as a run on the folder does.
Training streams: under DDP each rank streams its own part, every rank the same number of whole batches, each
image at most once per epoch (see :meth:`train_dataloader`); the train loader's position is part of every
checkpoint, so a run resumed mid-epoch continues the stream. Validation and test read their split by index, as the
folder path does, so every image is scored exactly once whatever the loader workers and batch size (see
:meth:`ShardsDataModule.val_dataloader`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune.atomic import disk_full_error, remove_stale, temp_name
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.device_augment import pad_collate
from finetune.data.images import decode_rgb, printable
from finetune.data.loading import pin_memory
from finetune.errors import PathError, SettingError
from finetune.workers import worker_context

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
FORMAT = "finetune-shards"
VERSION = 1
SPLIT_KEYS = ("val_fraction", "split_seed", "folds", "fold")
INDEX = "index.json"  # LitData's own index of a split's chunks
STAGING = ".writing."  # the shards are written into OUTPUT/.writing.<host>.<pid>.tmp/, then renamed into place
INSTALL = 'data=shards and finetune.shards need the litdata package: pip install -e ".[shards]" (or litdata).'


def _litdata():
    try:
        import litdata
    except ImportError as err:  # pragma: no cover - the message is the point
        raise SettingError(INSTALL) from err
    return litdata


def is_uri(root: str | os.PathLike) -> bool:
    """``s3://bucket/x`` and the like (streamed by LitData), as opposed to a local folder."""
    return "://" in str(root)


# --- writing ------------------------------------------------------------------------------------------------------


def split_samples(images: ImageFolderDataModule) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The classes and ``{split: [(image path, class index)]}`` of the folder, split as a run on it splits it."""
    images.setup("fit")
    images.setup("test")
    samples = {}
    for split, dataset in (("train", images.train_set), ("val", images.val_set), ("test", images.test_set)):
        folder, indices = (dataset.dataset, dataset.indices) if hasattr(dataset, "indices") else (dataset, None)
        chosen = folder.samples if indices is None else [folder.samples[i] for i in indices]
        samples[split] = [(path, int(target)) for path, target in chosen]
    return list(images.classes), samples


def _read_sample(items: Sequence[tuple[str, int, str]], position: int) -> dict[str, Any]:
    """One shard record: the image file's bytes as they are on disk (never decoded pixels), its class, its name.

    LitData is handed positions, not paths: it treats path strings among its inputs as files to stage itself.
    """
    path, label, name = items[position]
    with open(path, "rb") as file:
        return {"image": file.read(), "label": label, "name": name}


def _digest(records: Sequence[tuple[str, int]]) -> str:
    """sha256 of the split's ``(name, class index)`` list in name order: which files went into it."""
    text = json.dumps(sorted(records), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def write_shards(
    images: ImageFolderDataModule,
    output: str | Path,
    overwrite: bool = False,
    chunk_bytes: str | int = "64MB",
    num_workers: int = 1,
) -> dict[str, Any]:
    """Write ``images``' train/val/test splits as shards into ``output``; return the manifest written there.

    ``output`` must be a local folder that does not exist or is empty; with ``overwrite`` it may hold shards that
    this function wrote before (a folder with ``manifest.json``), which are replaced once the new ones are complete.
    Any other content is never deleted.
    """
    litdata = _litdata()
    if is_uri(output):
        raise SettingError(
            f"output={output}: shards are written to a local folder; copy the folder to object storage afterwards "
            "(e.g. aws s3 cp --recursive) and train with data.root=URI."
        )
    output = Path(output)
    if output.is_dir():
        remove_stale(output, STAGING, ".tmp")  # the staging folder of a write that was killed
    existing = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if output.exists() and not output.is_dir():
        raise PathError(f"output={output} is a file, not a folder: choose a folder for the shards.")
    if existing and not overwrite:
        raise PathError(
            f"output={output} already holds {', '.join(existing[:5])}: shards never overwrite a folder. Choose "
            "another output, or pass overwrite=true to replace shards written there before."
        )
    if existing and not (output / MANIFEST).is_file():
        raise PathError(
            f"output={output} holds {', '.join(existing[:5])} but no {MANIFEST}: it is not a shards folder, and "
            "overwrite=true only replaces shards written by finetune.shards. Choose another (empty) output folder."
        )
    classes, samples = split_samples(images)
    root = images.root
    hp = images.hparams
    output.mkdir(parents=True, exist_ok=True)
    staging = output / temp_name(STAGING, ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a dead process that had our pid
    staging.mkdir()
    splits: dict[str, Any] = {}
    split = SPLITS[0]
    try:
        for split in SPLITS:
            items = [(path, label, os.path.relpath(path, root)) for path, label in samples[split]]
            log.info("Writing %d %s images into %s", len(items), split, output / split)
            with _start_method_kept():
                litdata.optimize(
                    fn=functools.partial(_read_sample, items),
                    inputs=list(range(len(items))),
                    output_dir=str(staging / split),
                    chunk_bytes=chunk_bytes,
                    num_workers=max(1, min(num_workers, len(items))),
                    reorder_files=False,
                    verbose=True,
                    start_method=_START_METHOD,
                )
            written = _indexed_count(staging / split)
            if written != len(items):
                raise RuntimeError(
                    f"LitData wrote {written} of the {len(items)} {split} images into {staging / split}; see the "
                    "errors above. Nothing was written to the output folder."
                )
            records = [(name, label) for _, label, name in items]
            per_class = {name: 0 for name in classes}
            for _, label in records:
                per_class[classes[label]] += 1
            splits[split] = {"count": len(records), "per_class": per_class, "digest": _digest(records)}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "classes": classes,
            "split": {key: hp[key] for key in SPLIT_KEYS},
            "source": str(Path(root).resolve()),
            "splits": splits,
            "litdata": litdata.__version__,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in (MANIFEST, *SPLITS):  # the old manifest goes first: a half-replaced folder reads as no shards
            old = output / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        for split in SPLITS:
            os.replace(staging / split, output / split)
        os.replace(staging / MANIFEST, output / MANIFEST)  # last: the shards are complete once it is there
    except Exception as err:
        full = disk_full_error(err, output / split)  # before the clean-up, which frees the space
        if full is not None:
            raise full from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


# LitData's writers start by spawn unless told: each would import torch again (~7 s per split on a small CPU). They
# only read and encode images, so where fork exists (Linux) they fork, as the DataLoader's workers do there.
_START_METHOD = "fork" if sys.platform == "linux" else None


@contextlib.contextmanager
def _start_method_kept() -> Iterator[None]:
    """``litdata.optimize`` makes ``spawn`` the process's start method for good; put back the one it had, so that
    a run later in the same process (a notebook, a test) starts its loader workers as it would have."""
    method = multiprocessing.get_start_method(allow_none=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(method, force=True)


def _indexed_count(folder: Path) -> int:
    """The samples LitData's index of ``folder`` records (0 when it wrote no index)."""
    try:
        chunks = json.loads((folder / INDEX).read_text())["chunks"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(int(chunk["chunk_size"]) for chunk in chunks)


# --- reading ------------------------------------------------------------------------------------------------------


def read_manifest(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The manifest of the shards at ``root`` (a folder or a URI), refused by name when missing or unreadable."""
    where = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        if is_uri(root):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, MANIFEST)
                get_downloader(root, tmp, [], storage_options).download_file(where, local)
                text = Path(local).read_text()
        else:
            text = Path(where).read_text()
        manifest = json.loads(text)
    except (OSError, ValueError, RuntimeError) as err:
        raise PathError(
            f"Cannot read the shards manifest {where} ({type(err).__name__}: {err}). data.root must be a folder (or "
            "URI) written by python -m finetune.shards data=folder data.root=IMAGES output=SHARDS."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PathError(f"{where} is not a finetune shards manifest: write the shards with python -m finetune.shards.")
    if manifest.get("version") != VERSION:
        raise PathError(
            f"{where} is version {manifest.get('version')} of the shards format; this finetune reads version "
            f"{VERSION}. Write the shards again with python -m finetune.shards."
        )
    return manifest


def check_classes(manifest: dict[str, Any], settings: dict[str, Any], root: str) -> None:
    """Refuse shards holding other classes than ``data.classes`` (when it is a list)."""
    wanted = settings.get("classes")
    if wanted is not None and list(wanted) != list(manifest["classes"]):
        raise SettingError(
            f"The shards at {root} hold the classes {manifest['classes']}, but data.classes={list(wanted)}. Point "
            "data.root at shards of these classes, or set data.classes to the shards' (null: take theirs)."
        )


def check_split(manifest: dict[str, Any], settings: dict[str, Any], root: str) -> None:
    """Refuse shards whose train/val split is not the one the config asks for, naming each differing setting.

    Only training reads the train/val split; evaluation reads the test split, which no split setting changes.
    """
    split = manifest["split"]
    kfold = settings.get("folds") is not None or split.get("folds") is not None
    keys = ("split_seed", "folds", "fold") if kfold else ("split_seed", "val_fraction")  # what defines the split
    differ = [
        f"data.{key}: {split.get(key)!r} in the shards, {settings.get(key)!r} now"
        for key in keys
        if split.get(key) != settings.get(key)
    ]
    if differ:
        raise SettingError(
            f"The shards at {root} were written with another split ({'; '.join(differ)}). Set those data.* values "
            "to the shards' (a run's validation split must be the one its shards hold), or write shards for this "
            "split with python -m finetune.shards."
        )


def check_chunks(root: str, split: str) -> None:
    """Every chunk file of a local split is there with the size LitData's index records; names the file if not."""
    if is_uri(root):
        return  # object storage: LitData reports a missing or short chunk when it fetches it
    folder = Path(root) / split
    index_path = folder / INDEX
    try:
        chunks = json.loads(index_path.read_text())["chunks"]
    except (OSError, ValueError, KeyError) as err:
        raise PathError(
            f"Cannot read the shard index {index_path} ({type(err).__name__}: {err}): the {split} shards are "
            "missing or damaged. Write the shards again with python -m finetune.shards ... overwrite=true."
        ) from err
    for chunk in chunks:
        path = folder / chunk["filename"]
        if not path.is_file():
            raise PathError(
                f"Shard {path} is missing ({index_path} lists it). Copy the whole shards folder again, or write "
                "the shards again with python -m finetune.shards ... overwrite=true."
            )
        if path.stat().st_size != chunk["chunk_bytes"]:
            raise PathError(
                f"Shard {path} is corrupt: {path.stat().st_size} bytes, {index_path} records {chunk['chunk_bytes']}. "
                "Copy it again, or write the shards again with python -m finetune.shards ... overwrite=true."
            )


class DecodeSample:
    """A shard record -> ``(transform(8-bit RGB image), class)``, decoded as :func:`~finetune.data.load_rgb` does."""

    def __init__(self, transform: Callable, where: str) -> None:
        self.transform, self.where = transform, where

    def __call__(self, record: dict[str, Any]) -> tuple[Any, int]:
        name = f"{self.where}: {record['name']}"
        try:
            image = decode_rgb(io.BytesIO(record["image"]), name)
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
            raise PathError(
                f"Image {printable(record['name'])} in the shards {self.where} does not decode ({type(err).__name__}: "
                f"{err}). Fix or delete the source image and write the shards again (overwrite=true)."
            ) from err
        return self.transform(image), int(record["label"])


class ShardSplit(Dataset):
    """One split of the shards as a map-style dataset of ``(image, class)``: the whole split on every rank, in the
    shards' order (for calibration, feature extraction and the test report, which read the split themselves)."""

    def __init__(self, stream: Any, count: int) -> None:
        self.stream, self.count = stream, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for a split of {self.count} images")
        return self.stream[index]


class BlockSampler(DistributedSampler):
    """Rank ``rank`` of ``num_replicas`` gets the images ``[rank * N // num_replicas, (rank + 1) * N // num_replicas)``
    of a split of N, in order: every image on exactly one rank, none padded in twice. Contiguous rather than strided
    (``UnrepeatedDistributedSampler``'s every R-th image), because a split's images lie in its chunks in order: a rank
    reads only the chunks that hold its block. A ``DistributedSampler``, so that Lightning keeps it as it is."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        count = len(dataset)
        self.start, self.stop = rank * count // num_replicas, (rank + 1) * count // num_replicas
        self.num_samples, self.total_size = self.stop - self.start, count

    def __iter__(self):
        return iter(range(self.start, self.stop))


class ShardsDataModule(ImageFolderDataModule):
    """:class:`ImageFolderDataModule` over shards written by ``python -m finetune.shards``: ``root`` is their folder
    or URI. The same transforms, eval preprocessing and checkpoint record; the split is the one stored, checked
    against ``val_fraction``, ``split_seed``, ``folds``/``fold``; ``classes`` (a list) refuses other classes.
    ``storage_options``: LitData's, for object storage (credentials, endpoint). ``cache`` is not available (the
    stream decodes each image as it arrives); the remaining folder settings (download, image checks) do not apply.

    The train loader streams :attr:`streams` ``["train"]`` (a LitData ``StreamingDataset``); ``train_set``,
    ``val_set``, ``test_set`` and ``train_eval_set`` are whole splits (:class:`ShardSplit`), read by index by the
    val and test loaders and by the code that reads a split itself.
    """

    def __init__(
        self, *args: Any, classes: Sequence[str] | None = None, storage_options: dict | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.manifest: dict[str, Any] | None = None
        self.streams: dict[str, Any] = {}  # split -> its StreamingDataset, what the loaders read

    @property
    def shards_root(self) -> str:
        return str(self.hparams.root).rstrip("/")

    @property
    def num_classes(self) -> int:
        if not self.classes:
            self.prepare_data()
        return len(self.classes)

    def prepare_data(self) -> None:
        _litdata()
        if self.hparams.cache != "none":
            raise SettingError(
                f"data.cache={self.hparams.cache} does not apply to data=shards: the shards stream encoded images "
                "and decode each as it arrives. Use data.cache=none (the default) with shards, or data=folder."
            )
        for key, value in (("shots", self.hparams.shots), ("sampler", self.hparams.sampler)):
            if value is not None:
                raise SettingError(
                    f"data.{key}={value} does not apply to data=shards: the shards stream their split in a shuffled "
                    f"order and cannot be cut or drawn from by index. Use data=folder for data.{key}, or leave it null."
                )
        if self.manifest is None:
            manifest = read_manifest(self.shards_root, self.hparams.storage_options)
            check_classes(manifest, dict(self.hparams), self.shards_root)
            self.manifest, self.classes = manifest, list(manifest["classes"])

    def _stream(self, split: str, transform: Callable, shuffle: bool) -> Any:
        from litdata import StreamingDataset

        self.prepare_data()
        check_chunks(self.shards_root, split)
        where = f"{self.shards_root}/{split}"
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))  # the run's seed (seed_everything): its shuffle
        stream = StreamingDataset(
            where,
            shuffle=shuffle,
            seed=seed,
            drop_last=None if shuffle else False,
            storage_options=self.hparams.storage_options,
            transform=DecodeSample(transform, where),
        )
        return stream

    def _fit_sets(self, train_tf, eval_tf) -> tuple[Dataset, Dataset, Dataset]:
        self.prepare_data()
        check_split(self.manifest, dict(self.hparams), self.shards_root)
        self.streams["train"] = self._stream("train", train_tf, shuffle=True)
        self.streams["val"] = self._stream("val", eval_tf, shuffle=False)
        plain_train = self._stream("train", eval_tf, shuffle=False)
        return (
            ShardSplit(self.streams["train"], self._count("train")),
            ShardSplit(plain_train, self._count("train")),
            ShardSplit(self.streams["val"], self._count("val")),
        )

    def class_counts(self) -> list[int]:
        """The training split's images per class, as the manifest records them."""
        self.prepare_data()
        per_class = self.manifest["splits"]["train"]["per_class"]
        return [int(per_class[name]) for name in self.classes]

    def _check_duplicates(self) -> None:
        """Nothing to look for: the shards hold the split that ``finetune.shards`` wrote (it checked the folder)."""

    def _test_set(self, test_tf, stage: str | None) -> Dataset:
        self.streams["test"] = self._stream("test", test_tf, shuffle=False)
        return ShardSplit(self.streams["test"], self._count("test"))

    def _count(self, split: str) -> int:
        self.prepare_data()
        return int(self.manifest["splits"][split]["count"])

    def train_dataloader(self) -> Any:
        """Shuffled by the run's seed and the epoch. Under DDP LitData gives every rank the same number of whole
        batches (``drop_last``): per epoch fewer than ``ranks x batch_size`` images are left out, others each epoch."""
        collate = pad_collate if self.augments_on_device else None
        loader = self._loader(self.streams.get("train"), collate_fn=collate, epoch_of=self._epoch)
        if len(loader) == 0:  # Lightning would skip training with an info line, and test the untrained weights
            count, ranks = self._count("train"), self.trainer.world_size if self.trainer is not None else 1
            raise SettingError(
                f"data.batch_size={self.batch_size} with {ranks} processes: the {count} training images of the "
                f"shards give no whole batch to each process (under DDP every process gets the same number of "
                f"whole batches), so nothing would be trained. Use data.batch_size={max(1, count // ranks)} or "
                "less (it is per process), or fewer devices."
            )
        return loader

    def val_dataloader(self) -> DataLoader:
        """The val split read by index (:class:`ShardSplit`), in the folder path's loader: every image exactly once.

        Not a stream: a ``StreamingDataLoader`` gives each loader worker its own share, and each worker ends with
        its own partial batch, while its length counts ``ceil(images / batch_size)`` batches; Lightning stops
        after that count, so with 2+ workers the last batches were never scored. A map-style loader yields
        exactly ``len()`` batches. Under DDP each rank reads a contiguous block (:class:`BlockSampler`), so it
        fetches only the chunks holding its images.
        """
        return super()._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, read as :meth:`val_dataloader` reads val."""
        return super()._loader(self.test_set, shuffle=False)

    def _unrepeated_sampler(self, dataset: Dataset) -> DistributedSampler | None:
        """Under DDP, rank r's contiguous block of the split (every image once, no padding); ``None`` (Lightning's
        padded sampler) only where a rank would get no image at all, as for the folder."""
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not shards or shards["num_replicas"] < 2 or len(dataset) < shards["num_replicas"]:
            return None
        return BlockSampler(dataset, shards["num_replicas"], shards["rank"])

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, dataset, shuffle: bool = False, drop_last: bool = False, collate_fn=None, epoch_of=None):
        if dataset is None:
            raise RuntimeError("Call setup() before asking for a data loader.")
        workers = self.num_workers
        return EpochStreamingDataLoader(
            dataset,
            epoch_of=epoch_of,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory(self.trainer),
            multiprocessing_context=worker_context(workers),
        )


@functools.cache
def _streaming_loader_class() -> type:
    from litdata import StreamingDataLoader

    class EpochStreamingDataLoader(StreamingDataLoader):
        """LitData's loader, its shuffle epoch taken from the trainer: the same order after a resume."""

        def __init__(self, *args: Any, epoch_of: Callable[[], int] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.epoch_of = epoch_of

        def __iter__(self):
            if self.epoch_of is not None and not self.restore:
                self.current_epoch = self.epoch_of()  # StreamingDataLoader counts on from here: epoch + 1
            yield from super().__iter__()

    return EpochStreamingDataLoader


def EpochStreamingDataLoader(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class, built once litdata imports
    """A ``litdata.StreamingDataLoader`` whose epoch (the shuffle's) follows ``epoch_of()`` (the trainer's)."""
    return _streaming_loader_class()(*args, **kwargs)
