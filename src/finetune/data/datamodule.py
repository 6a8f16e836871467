"""The LightningDataModule: one class for the d2l hot dog set and any ``train/<class>/``, ``test/<class>/`` folder.

Its steps, each in a module of its own: fetch the folder (:mod:`~finetune.data.download`), find the class folders
and their images (:mod:`~finetune.data.folders`), check that every image decodes and name duplicates
(:mod:`~finetune.data.verify`), carve the validation split from train (:mod:`~finetune.data.splits`), transform
(:mod:`~finetune.data.transforms`). Faster paths plug in where marked: decoded images cached
(:mod:`~finetune.data.cache`), augmentation on the device (:mod:`~finetune.data.device_augment`). The training
images can be drawn by class weights instead of shuffled (:mod:`~finetune.data.sampling`, ``data.sampler``), and
cut to K per class (``data.shots``, :mod:`~finetune.data.splits`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from finetune.data.cache import CachedImageDataset, ShrinkShorterSide, build_cache
from finetune.data.device_augment import DeviceAugment, RawBatch, pad_collate, say_where_augmentation_runs
from finetune.data.download import download_and_extract
from finetune.data.folders import evaluation_folder, scan_image_folder, scan_test_folder
from finetune.data.images import load_rgb, preview, printable
from finetune.data.loading import AUTO, pin_memory, resolve_num_workers
from finetune.data.sampling import train_sampler
from finetune.data.settings import TRAIN_ONLY_DATA_KEYS, check_data_settings
from finetune.data.splits import check_split, draw_shots, split_train
from finetune.data.transforms import BOOK_IMAGE_SIZE, CROP_SCALE, Preprocessing, to_normalized_tensor, train_transform
from finetune.data.verify import corrupt_images, find_duplicates, report_duplicates
from finetune.errors import PathError, describe_path
from finetune.workers import worker_context

log = logging.getLogger(__name__)
Augmentation = Callable[..., v2.Transform]  # train_transform with its data.augmentation.* settings bound
BOOK_AUGMENTATION = partial(train_transform)  # the book's crop and flip (data.augmentation's defaults)


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val/test loaders over ``root/train/<class>/*`` and ``root/test/<class>/*``; ``conf/data/folder.yaml``
    documents every setting beside its default.

    ``augmentation`` builds the training transform from the eval preprocessing's size, normalisation and
    resampling (``data.augmentation``: :func:`~finetune.data.transforms.train_transform` with its settings bound;
    ``None`` trains on the eval transform). ``test_only`` (``finetune.evaluate``): only the images scored are
    needed, in ``root/test/<class>/`` or ``root/<class>/``; ``require_test=False`` (``test_after_fit=false``): no
    ``test/`` needed. The settings are recorded in ``hparams``, which checkpoints keep.
    """

    def __init__(
        self,
        root: str | Path,
        download: dict | None = None,
        batch_size: int = 128,
        num_workers: int | str = AUTO,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        folds: int | None = None,
        fold: int | None = None,
        shots: int | None = None,
        shot_seed: int = 0,
        sampler: str | Sequence[float] | dict[str, float] | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        eval_resize: str = "square",
        augmentation: Augmentation | None = BOOK_AUGMENTATION,
        augment_on: str = "loader",
        device_resampling: str = "auto",
        cache: str = "none",
        cache_short_side: int | None = None,
        cache_dir: str | Path | None = None,
        skip_corrupt: bool = False,
        verify_images: bool = True,
        duplicates: str = "warn",
        test_only: bool = False,
        require_test: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["augmentation", "test_only", "require_test"])
        self.hparams.root = os.path.expanduser(root)  # data.root=~/photos
        self.hparams.augmentation = getattr(augmentation, "keywords", None) if augmentation else None
        self.augmentation = augmentation
        self.test_only, self.require_test = test_only, require_test
        # The eval preprocessing, once: val/test transforms, the eval cache and checkpoints all derive from it.
        size = BOOK_IMAGE_SIZE if image_size is None else image_size  # None: no backbone filled it (finetune.shards)
        self.preprocessing = Preprocessing.of(size, resize_size, mean, std, interpolation, eval_resize)
        self.test_transform: v2.Transform | None = None  # test-time views (finetune.evaluate tta=...): finetune.tta
        self.classes: list[str] = []
        self.train_set = self.val_set = self.test_set = self.train_eval_set = None
        self.train_folder: ImageFolder | None = None  # all of train/ through the eval transform, once set up
        self.split_indices: dict[str, list[int]] = {}  # "train", "val": indices into train_folder (after data.shots)
        self.device_augment: DeviceAugment | None = None  # set by setup() when the device augments
        self._layout: dict[str, dict[str, list[str]]] | None = None
        self._test_dir: Path | None = None  # test_only: root/test or root, once scanned
        self._corrupt: dict[str, dict[str, str]] = {}  # per split: {path: reason}
        self._duplicates_checked = False

    @classmethod
    def check_settings(cls, settings: dict, test_only: bool = False) -> None:
        """``data.*`` (its defaults filled in), before any image is read: see :mod:`finetune.data.settings`.
        ``test_only`` (evaluation): the train/val settings are not used, so they are not checked either."""
        defaults = {}
        for owner in reversed([c for c in cls.__mro__ if issubclass(c, ImageFolderDataModule)]):  # a subclass wins
            signature = inspect.signature(owner.__init__).parameters.items()
            defaults |= {name: p.default for name, p in signature if p.default is not inspect.Parameter.empty}
        ignored = {"_target_", *(TRAIN_ONLY_DATA_KEYS if test_only else ())}
        check_data_settings({**defaults, **{k: v for k, v in settings.items() if k not in ignored}})

    # --- what the data is ----------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.hparams.root)

    @property
    def resize_size(self) -> int:
        return self.preprocessing.resize_size

    @property
    def batch_size(self) -> int:
        return self.hparams.batch_size

    @property
    def num_workers(self) -> int:
        """Loader processes in effect: ``data.num_workers``, with ``auto`` resolved for this machine and trainer."""
        return resolve_num_workers(self.hparams.num_workers, self.trainer)

    @property
    def augments_on_device(self) -> bool:
        return self.augmentation is not None and self.hparams.augment_on == "device"

    @property
    def num_classes(self) -> int:
        """The class folders of ``root/train`` (``test_only``: of the folder scored), known before ``setup``."""
        if not self.classes:
            self.classes = sorted(self._scan()["test" if self.test_only else "train"])
        return len(self.classes)

    @property
    def train_targets(self) -> list[int] | None:
        """The training split's class indices in ``train_set``'s order; ``None`` before ``setup("fit")``."""
        if self.train_folder is None:
            return None
        return [self.train_folder.targets[i] for i in self.split_indices["train"]]

    def class_counts(self) -> list[int]:
        """Training images per class (class-folder order), after the validation split and ``data.shots``: what a
        class-weighted loss and ``data.sampler=balanced`` weigh by. Known once ``setup("fit")`` has run."""
        targets = self.train_targets
        if targets is None:
            raise RuntimeError("Call setup('fit') before asking for the training split's class counts.")
        return [targets.count(index) for index in range(len(self.classes))]

    def data_folders(self) -> list[Path]:
        """The folders whose class folders this module reads: a run that wrote inside one would have its figures
        read as images by the next run."""
        return [evaluation_folder(self.root)] if self.test_only else [self.root / "train", self.root / "test"]

    def eval_transform(self) -> v2.Compose:
        return self.preprocessing.transform()

    def train_transform(self) -> v2.Transform:
        p = self.preprocessing
        return self.augmentation(p.image_size, p.mean, p.std, p.interpolation)

    # --- Lightning's steps ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.hparams.download:
            download_and_extract(self.hparams.download["url"], self.hparams.download["sha1"], self.root)
        elif not self.root.is_dir():
            found = describe_path(self.root)
            problem = "does not exist" if found == "nothing" else f"is {found}, not a folder"
            layout = "test/<class>/ or <class>/" if self.test_only else "train/<class>/ and test/<class>/"
            raise PathError(
                f"Dataset folder {str(self.root)!r} (data.root) {problem}. Set data.root to a folder holding "
                f"{layout} image folders (for example data.root=/data/hotdog)."
            )

    def setup(self, stage: str | None = None) -> None:
        self._check_duplicates()
        eval_tf = self.eval_transform()
        train_tf = self.train_transform() if self.augmentation is not None else eval_tf
        if self.augments_on_device:
            train_tf = v2.PILToTensor()  # decoded uint8; the crop, flip and normalisation run on the device
        if stage in ("fit", "validate", None) and self.train_set is None and not self.test_only:
            self.train_set, self.train_eval_set, self.val_set = self._fit_sets(train_tf, eval_tf)
            if self.augments_on_device and self.device_augment is None:
                p, hp = self.preprocessing, self.hparams
                scale = tuple(self.augmentation.keywords.get("crop_scale", CROP_SCALE))
                self.device_augment = DeviceAugment(
                    p.image_size, p.mean, p.std, scale=scale, resampling=hp.device_resampling
                )
                say_where_augmentation_runs(self.trainer, hp.cache)
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._test_set(self.test_transform or eval_tf, stage)

    def train_dataloader(self) -> DataLoader:
        collate = pad_collate if self.augments_on_device else None
        return self._loader(self.train_set, shuffle=True, collate_fn=collate, sampler=self.train_sampler())

    def train_sampler(self):
        """``data.sampler``'s draw of the training split (:mod:`~finetune.data.sampling`); ``None``: shuffled."""
        return train_sampler(self.hparams.sampler, self.train_targets, self.classes, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # --- the data source: the image folder (finetune.data.shards.ShardsDataModule reads shards instead) ----------
    def _fit_sets(self, train_tf, eval_tf) -> tuple[Dataset, Dataset, Dataset]:
        """(train, train through the eval transform, val) of the train folder, split and checked; cached if asked."""
        hp = self.hparams
        keep = self._usable_images("train")
        if "test" in self._scan():
            self._usable_images("test")  # a corrupt test image must stop the run now, not after training
        augmented, plain = self._folder("train", train_tf, keep), self._folder("train", eval_tf, keep)
        self.classes = augmented.classes
        train_idx, val_idx = split_train(augmented.targets, augmented.classes, hp.val_fraction, hp.split_seed,
                                         hp.folds, hp.fold)  # fmt: skip
        check_split(augmented, train_idx, val_idx, hp.val_fraction)
        train_idx = draw_shots(augmented.targets, augmented.classes, train_idx, hp.shots, hp.shot_seed)
        self.train_folder, self.split_indices = plain, {"train": train_idx, "val": val_idx}
        train_set, val_set = Subset(augmented, train_idx), Subset(plain, val_idx)
        train_eval_set = Subset(plain, train_idx)  # the training images through the eval transform
        if hp.cache != "none":
            train_set = self._cached(train_set, "train", augmented=self.augmentation is not None)
            val_set = self._cached(val_set, "val", augmented=False)
        return train_set, train_eval_set, val_set

    def _test_set(self, test_tf, stage: str | None) -> Dataset | None:
        """The test folder through ``test_tf``; None for ``setup()`` of a run set up without one."""
        if "test" not in self._scan():
            if stage is None:
                return None
            raise PathError(
                f"{str(self.root)!r} has no test/ folder to {stage} on (this run was set up without one: "
                "test_after_fit=false). Add test/<class>/<image> folders, or evaluate another folder."
            )
        test_set = self._folder("test", test_tf, self._usable_images("test"))
        self.classes = test_set.classes
        if self.hparams.cache != "none" and self.test_transform is None:  # the cache holds the centre crop only
            return self._cached(test_set, "test", augmented=False)
        return test_set

    def _scan(self) -> dict[str, dict[str, list[str]]]:
        """Check the layout once; warn about files that are not images (ImageFolder ignores them)."""
        if self._layout is None:
            if self.test_only:
                by_class, others, self._test_dir = scan_test_folder(self.root)
                self._layout = {"test": by_class}
            else:
                self._layout, others = scan_image_folder(self.root, require_test=self.require_test)
            if others:
                log.warning(
                    "Ignoring %d file(s) in %s that are not images (by extension: %s): %s",
                    len(others),
                    printable(self.root),
                    ", ".join(IMG_EXTENSIONS),
                    preview([os.path.relpath(p, self.root) for p in others]),
                )
        return self._layout

    def _check_duplicates(self) -> None:
        """Byte-identical images across the splits and classes read (``data.duplicates``), once."""
        if not self._duplicates_checked and self.hparams.duplicates != "ignore":
            report_duplicates(find_duplicates(self._scan()), self.root, self.hparams.duplicates)
        self._duplicates_checked = True

    def _split_dir(self, split: str) -> Path:
        self._scan()
        return self._test_dir if self.test_only and split == "test" else self.root / split

    def _folder(self, split: str, transform, keep) -> ScannedImageFolder:
        return ScannedImageFolder(self._split_dir(split), sorted(self._scan()[split]), transform, keep)

    def _usable_images(self, split: str) -> Callable[[str], bool]:
        """The ``is_valid_file`` test for ``split``: an image the scan found (not in a run folder) that decodes,
        checked once for the whole split."""
        hp, by_class = self.hparams, self._scan()[split]
        if split not in self._corrupt:
            self._corrupt[split] = corrupt_images(self._split_dir(split), by_class, hp.verify_images, hp.skip_corrupt)
        usable = {path for images in by_class.values() for path in images if path not in self._corrupt[split]}
        return usable.__contains__

    # --- loading -----------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset | None, shuffle: bool, collate_fn=None, sampler=None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() before asking for a data loader.")
        workers = self.num_workers
        if sampler is None and not shuffle:
            sampler = self._unrepeated_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_fn,
            persistent_workers=workers > 0,
            pin_memory=pin_memory(self.trainer),
            multiprocessing_context=worker_context(workers),
        )

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

    # --- faster paths: decoded images cached (data.cache), augmentation on the device (data.augment_on) -------------
    def _cached(self, dataset: ImageFolder | Subset, name: str, augmented: bool) -> CachedImageDataset:
        """The same samples, decoded once: whole (or shrunk) for the random crop, or through the eval geometry."""
        hp = self.hparams
        folder, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
        samples = folder.samples if indices is None else [folder.samples[i] for i in indices]
        if augmented:
            prepare = ShrinkShorterSide(hp.cache_short_side)
            transform = None if self.augments_on_device else self.train_transform()
        else:
            prepare = self.preprocessing.geometry()
            transform = to_normalized_tensor(self.preprocessing.mean, self.preprocessing.std)
        paths = [path for path, _ in samples]
        images = build_cache(paths, prepare, hp.cache, name, hp.cache_dir, num_workers=self.num_workers)
        return CachedImageDataset(images, [target for _, target in samples], transform)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Draw a training batch's crops and flips on the CPU (no device synchronisation), before its transfer."""
        if isinstance(batch, RawBatch) and self.device_augment is not None:
            return self.device_augment.draw(batch, self.trainer.global_rank if self.trainer is not None else 0)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Crop, flip and normalise a training batch where it now is (the model's device)."""
        if isinstance(batch, RawBatch) and self.device_augment is not None:
            return self.device_augment.apply(batch)
        return batch

    def state_dict(self) -> dict:
        return {"device_augment": self.device_augment.state_dict()} if self.device_augment is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.device_augment is not None and "device_augment" in state_dict:
            self.device_augment.load_state_dict(state_dict["device_augment"])


class ScannedImageFolder(ImageFolder):
    """``ImageFolder`` over the class folders the scan found and the images it kept: a run's output folder inside the
    data (skipped by the scan) is neither a class nor a source of images."""

    def __init__(self, root: Path, classes: Sequence[str], transform, is_valid_file) -> None:
        self._scanned_classes = list(classes)
        super().__init__(str(root), transform, loader=load_rgb, is_valid_file=is_valid_file)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._scanned_classes, {name: index for index, name in enumerate(self._scanned_classes)}
