"""The LightningDataModule: one class for the d2l hot dog set and any ``train/<class>/``, ``test/<class>/`` folder.

A validation split is carved from train, stratified by class and seeded (a held-out fraction, or fold ``fold`` of
``folds`` stratified folds); the test split is touched only by ``trainer.test``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from finetune.data.cache import CachedImageDataset, ShrinkShorterSide, build_cache
from finetune.data.device_augment import (
    DeviceAugment,
    RawBatch,
    pad_collate,
    say_where_augmentation_runs,
)
from finetune.data.download import download_and_extract
from finetune.data.folders import (
    check_split,
    corrupt_images,
    evaluation_folder,
    find_duplicates,
    fold_split,
    load_rgb,
    preview,
    printable,
    report_duplicates,
    scan_image_folder,
    scan_test_folder,
    stratified_split,
)
from finetune.data.loading import AUTO, pin_memory, resolve_num_workers
from finetune.data.settings import TRAIN_ONLY_DATA_KEYS, check_data_settings
from finetune.data.transforms import (
    CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    to_normalized_tensor,
    train_transform,
)
from finetune.errors import DataError, PathError, describe_path
from finetune.workers import worker_context

log = logging.getLogger(__name__)


class ScannedImageFolder(ImageFolder):
    """``ImageFolder`` over the class folders the scan found and the images it kept: a run's output folder inside the
    data (skipped by the scan) is neither a class nor a source of images."""

    def __init__(self, root: Path, classes: Sequence[str], transform, is_valid_file) -> None:
        self._scanned_classes = list(classes)
        super().__init__(str(root), transform, loader=load_rgb, is_valid_file=is_valid_file)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._scanned_classes, {name: index for index, name in enumerate(self._scanned_classes)}


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val/test loaders over ``root/train/<class>/*`` and ``root/test/<class>/*``.

    ``batch_size`` is per device (Lightning's convention: under DDP each process loads its own batch).
    With ``download`` (a mapping with ``url`` and ``sha1``) the folder is fetched and verified first.
    A corrupt image stops ``setup()`` naming the file; ``skip_corrupt=True`` leaves such images out with a warning.
    ``verify_images=False`` skips decoding every image up front (for very large, known-good folders).
    ``duplicates``: byte-identical images in train and test, or in two classes, are named in a warning (``"warn"``),
    stop ``setup()`` (``"refuse"``), or are not looked for (``"ignore"``); copies within a class are a warning.
    ``augment=False`` trains on the eval transform; ``augment="trivial"|"randaugment"|"autoaugment"`` adds that
    torchvision policy after the book's crop and flip, ``random_erasing=p`` erases a random patch with probability p
    (both on the loader path only). ``cache="memory"|"disk"`` decodes every image once (see
    :mod:`finetune.data.cache`; ``cache_short_side=N`` shrinks cached training images to a shorter side of N).
    ``num_workers="auto"``: the cores available to the process, shared among the devices of this machine.
    ``augment_on="device"``: the train loader yields padded uint8 batches and the random crop, flip and
    normalisation run on the model's device after the transfer (:mod:`finetune.data.device_augment`).
    ``folds=K, fold=i``: validate on fold ``i`` of ``K`` stratified folds of train (seeded by ``split_seed``) and
    train on the other ``K - 1``, instead of holding out ``val_fraction``; test is untouched.
    ``crop_scale``: the area range of the training random crop (the book's ``(0.08, 1.0)``).
    ``eval_resize``: ``"square"`` (the book's: both sides to ``resize_size``) or ``"shorter_side"`` (the aspect kept,
    torchvision's ImageNet evaluation) before the centre crop of val/test images.
    ``mean``, ``std``, ``interpolation``: the normalisation and resampling of every transform (``None``: ImageNet's,
    bilinear; ``finetune.run.build_datamodule`` fills them from the backbone's pretrained config).

    The settings live in ``self.hparams`` (saved in checkpoints); ``augment`` is also an attribute, because the
    feature cache turns it off on an existing DataModule.

    ``test_only=True`` (what ``finetune.evaluate`` builds): only the images that are scored are needed, in
    ``root/test/<class>/`` or, without a ``test/`` folder, ``root/<class>/``; no ``train/`` folder, and the
    train/val settings (``val_fraction``, ``folds``, augmentation) are not used.
    ``require_test=False`` (a run that never tests: ``test_after_fit=false``): ``root`` may lack ``test/``.
    """

    def __init__(
        self,
        root: str | Path,
        download: dict | None = None,
        batch_size: int = 128,
        num_workers: int | str = AUTO,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int | None = 224,
        resize_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        skip_corrupt: bool = False,
        verify_images: bool = True,
        augment: bool | str = True,
        cache: str = "none",
        cache_short_side: int | None = None,
        cache_dir: str | Path | None = None,
        augment_on: str = "loader",
        device_resampling: str = "auto",
        folds: int | None = None,
        fold: int | None = None,
        crop_scale: Sequence[float] = CROP_SCALE,
        eval_resize: str = "square",
        random_erasing: float = 0.0,
        duplicates: str = "warn",
        test_only: bool = False,
        require_test: bool = True,
    ) -> None:
        super().__init__()
        root = os.path.expanduser(root)  # data.root=~/photos
        image_size = 224 if image_size is None else image_size  # None: what build_datamodule did not fill
        mean = list(IMAGENET_MEAN if mean is None else mean)
        std = list(IMAGENET_STD if std is None else std)
        interpolation = interpolation or "bilinear"
        if isinstance(crop_scale, Sequence) and not isinstance(crop_scale, str):
            crop_scale = list(crop_scale)  # a plain list in hparams and checkpoints, not Hydra's ListConfig
        # the values in effect, so a checkpoint records them (test_only, require_test: how a run uses the data)
        self.save_hyperparameters(ignore=["test_only", "require_test"])
        self.test_only = test_only
        self.require_test = require_test
        self._test_dir: Path | None = None  # test_only: root/test or root, once scanned
        self.augment = augment
        # The eval preprocessing, once: val/test transforms, the eval cache and checkpoints all derive from it.
        self.preprocessing = Preprocessing.of(image_size, resize_size, mean, std, interpolation, eval_resize)
        self.classes: list[str] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None
        self._layout: dict[str, dict[str, list[str]]] | None = None
        self._corrupt: dict[str, dict[str, str]] = {}  # per split: {path: reason}
        self._duplicates_checked = False
        self.device_augment: DeviceAugment | None = None  # set by setup() when the device augments
        # Another transform for the test split: test-time views (finetune.evaluate tta=..., see finetune.tta).
        self.test_transform: v2.Transform | None = None

    @classmethod
    def check_settings(cls, settings: dict, test_only: bool = False) -> None:
        """``data.*`` (its defaults filled in), before any image is read: see :mod:`finetune.data.settings`.
        ``test_only`` (evaluation): the train/val settings are not used, so they are not checked either."""
        signature = inspect.signature(cls.__init__).parameters.items()
        defaults = {name: p.default for name, p in signature if p.default is not inspect.Parameter.empty}
        ignored = {"_target_", *(TRAIN_ONLY_DATA_KEYS if test_only else ())}
        check_data_settings({**defaults, **{k: v for k, v in settings.items() if k not in ignored}})

    def _split(self, targets: list[int], classes: list[str]) -> tuple[list[int], list[int]]:
        """(train, val) indices of the train folder: fold ``fold`` of ``folds``, or ``val_fraction`` held out."""
        hp = self.hparams
        if hp.folds is None:
            return stratified_split(targets, hp.val_fraction, hp.split_seed)
        sizes = {name: targets.count(index) for index, name in enumerate(classes)}
        smallest = min(sizes, key=sizes.get)
        if sizes[smallest] < hp.folds:
            if sizes[smallest] >= 2:
                advice = f"Use data.folds between 2 and {sizes[smallest]}, or add images to that class."
            else:  # no number of folds (they start at 2), nor a held-out fraction, can split a 1-image class
                advice = (
                    f"Every validation split needs at least 2 images in each class (one to train on, one to "
                    f"validate): add images to {smallest!r}, or leave the class out."
                )
            raise DataError(
                f"data.folds={hp.folds} is larger than the smallest class ({smallest!r}: {sizes[smallest]} training "
                f"image(s)): some folds would validate without that class. {advice}"
            )
        return fold_split(targets, hp.folds, hp.fold, hp.split_seed)

    @property
    def root(self) -> Path:
        return Path(self.hparams.root)

    @property
    def resize_size(self) -> int:
        """The evaluation resize in effect: ``data.resize_size``, or the book's ratio of the crop when null."""
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
        return self.augment and self.hparams.augment_on == "device"

    @property
    def num_classes(self) -> int:
        """Number of classes, read from the class folders of ``root/train`` (``test_only``: of the folder scored),
        available before ``setup``."""
        if not self.classes:
            self.classes = sorted(self._scan()["test" if self.test_only else "train"])
        return len(self.classes)

    def prepare_data(self) -> None:
        if self.hparams.download:
            download_and_extract(self.hparams.download["url"], self.hparams.download["sha1"], self.root)
        elif not self.root.is_dir():
            layout = (
                "test/<class>/ image folders, or <class>/ folders directly"
                if self.test_only
                else "train/<class>/ and test/<class>/ image folders"
            )
            found = describe_path(self.root)
            problem = "does not exist" if found == "nothing" else f"is {found}, not a folder"
            raise PathError(
                f"Dataset folder {str(self.root)!r} (data.root) {problem}. Set data.root to a folder holding "
                f"{layout} (for example data.root=/data/hotdog)."
            )

    def data_folders(self) -> list[Path]:
        """The folders whose class folders this module reads: ``train/`` and ``test/`` (``test_only``: the folder
        scored). A run that wrote inside one would have its figures read as images by the next run."""
        if self.test_only:
            return [evaluation_folder(self.root)]
        return [self.root / "train", self.root / "test"]

    def eval_transform(self) -> v2.Compose:
        """The val/test transform, built from :attr:`preprocessing` (which checkpoints record)."""
        return self.preprocessing.transform()

    def train_transform(self) -> v2.Compose:
        hp = self.hparams
        policy = self.augment if isinstance(self.augment, str) else None
        erasing = hp.get("random_erasing", 0.0)
        return train_transform(hp.image_size, hp.mean, hp.std, hp.interpolation, hp.crop_scale, policy, erasing)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self._check_duplicates()
        eval_tf = self.eval_transform()
        train_tf = self.train_transform() if self.augment else eval_tf
        if self.augments_on_device:
            train_tf = v2.PILToTensor()  # decoded uint8; the crop, flip and normalisation run on the device
        if stage in ("fit", "validate", None) and self.train_set is None and not self.test_only:
            self.train_set, self.train_eval_set, self.val_set = self._fit_sets(train_tf, eval_tf)
            if self.augments_on_device and self.device_augment is None:
                self.device_augment = DeviceAugment(
                    hp.image_size, hp.mean, hp.std, scale=tuple(hp.crop_scale), resampling=hp.device_resampling
                )
                say_where_augmentation_runs(self.trainer, hp.cache)
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._test_set(self.test_transform or self.eval_transform(), stage)

    # --- the data source: the image folder (finetune.data.shards.ShardsDataModule reads shards instead) --------
    def _fit_sets(self, train_tf, eval_tf) -> tuple[Dataset, Dataset, Dataset]:
        """(train, train through the eval transform, val) of the train folder, split and checked; cached if asked."""
        hp = self.hparams
        keep = self._usable_images("train")
        if "test" in self._scan():
            self._usable_images("test")  # a corrupt test image must stop the run now, not after training
        augmented = self._folder("train", train_tf, keep)
        plain = self._folder("train", eval_tf, keep)
        self.classes = augmented.classes
        train_idx, val_idx = self._split(augmented.targets, augmented.classes)
        check_split(augmented, train_idx, val_idx, hp.val_fraction)
        train_set: Dataset = Subset(augmented, train_idx)
        train_eval_set = Subset(plain, train_idx)  # the training images through the eval transform
        val_set: Dataset = Subset(plain, val_idx)
        if hp.cache != "none":
            train_set = self._cached(train_set, "train", augmented=self.augment)
            val_set = self._cached(val_set, "val", augmented=False)
        return train_set, train_eval_set, val_set

    def _test_set(self, test_tf, stage: str | None) -> Dataset | None:
        """The test folder through ``test_tf``; None for ``setup()`` of a run set up without one."""
        hp = self.hparams
        if "test" not in self._scan():
            if stage is None:
                return None
            raise PathError(
                f"{str(self.root)!r} has no test/ folder to {stage} on (this run was set up without one: "
                "test_after_fit=false). Add test/<class>/<image> folders, or evaluate another folder."
            )
        keep = self._usable_images("test")
        test_set = self._folder("test", test_tf, keep)
        self.classes = test_set.classes
        if hp.cache != "none" and self.test_transform is None:  # the cache holds the centre crop only
            return self._cached(test_set, "test", augmented=False)
        return test_set

    def train_dataloader(self) -> DataLoader:
        collate = pad_collate if self.augments_on_device else None
        return self._loader(self.train_set, shuffle=True, drop_last=False, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _loader(self, dataset: Dataset | None, shuffle: bool, drop_last: bool = False, collate_fn=None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() before asking for a data loader.")
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else self._unrepeated_sampler(dataset),
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=collate_fn,
            persistent_workers=workers > 0,
            pin_memory=pin_memory(self.trainer),
            multiprocessing_context=worker_context(workers),
        )

    # --- device-side augmentation (data.augment_on=device) ---------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Draw a training batch's crops and flips on the CPU (no device synchronisation), before its transfer."""
        if isinstance(batch, RawBatch) and self.device_augment is not None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            return self.device_augment.draw(batch, rank)
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
            transform = to_normalized_tensor(hp.mean, hp.std)
        images = build_cache(
            [path for path, _ in samples], prepare, hp.cache, name, hp.cache_dir, num_workers=self.num_workers
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
        if self.test_only and split == "test":
            return self._test_dir
        return self.root / split

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
        if not self._duplicates_checked:
            policy = self.hparams.get("duplicates", "warn")
            if policy != "ignore":
                report_duplicates(find_duplicates(self._scan()), self.root, policy)
            self._duplicates_checked = True

    def _folder(self, split: str, transform, keep) -> ScannedImageFolder:
        return ScannedImageFolder(self._split_dir(split), sorted(self._scan()[split]), transform, keep)

    def _usable_images(self, split: str):
        """The ``is_valid_file`` test for ``split``: an image the scan found (not in a run folder) that decodes,
        checked once for the whole split."""
        if split not in self._corrupt:
            hp, by_class = self.hparams, self._scan()[split]
            split_dir = self._split_dir(split)
            self._corrupt[split] = corrupt_images(split_dir, by_class, hp.verify_images, hp.skip_corrupt)
        corrupt = self._corrupt[split]
        usable = {path for images in self._scan()[split].values() for path in images if path not in corrupt}
        return usable.__contains__
