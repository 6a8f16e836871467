"""Cached backbone features for the frozen experiment: run the frozen backbone once per split, train the head only.

With ``model.freeze=backbone`` every epoch pushes the same images through the same frozen network, so all but the
head's work is repeated. ``model.cache_features=true`` computes what the head receives once per split (train, val,
test), with the *eval* transform and the backbone in eval mode, keeps it in memory, and trains the head on it.

What changes, and what does not:

- Train-time augmentation is dropped: every epoch sees the same centre-cropped image of each training example
  (``data.augment`` is set to false, with a warning if it was on). For a bit-for-bit comparison, run the uncached
  frozen path with ``data.augment=false``.
- Dropout placed directly in front of the head (MobileNetV2/V3's and EfficientNet's ``classifier`` Dropout) still
  applies at train time: it runs on the cached features exactly where it ran on the backbone's output.
- Random layers *inside* the frozen backbone (e.g. EfficientNet's stochastic depth, VGG's first dropout) act at
  train time in the uncached path but not on cached features; a warning names them.
- Frozen BatchNorm uses its running statistics in both paths (the uncached path keeps it in eval mode too).
- The random number stream of the run is not touched by the extraction, so shuffling and dropout masks match the
  uncached run draw for draw.

Features are computed lazily, the first time Lightning asks for a split's loader (the model is then on its device).

With ``model.unfreeze_at_epoch=N`` (``experiment=lpft``) only the first N epochs use the cache: the loaders serve
features while the model's backbone is frozen and the image loaders after (with train-time augmentation: the
training features come from the eval transform of the training images instead); the trainer reloads its loaders
at epoch N for that (``reload_every``, which the assembly gives the trainer). Those N epochs are the frozen
experiment's on cached features, step for step.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from finetune.backbones import random_layers_inside_backbone
from finetune.errors import SettingError
from finetune.progress import track
from finetune.workers import ordered_loader

log = logging.getLogger(__name__)


class FeatureCacheDataModule(pl.LightningDataModule):
    """Serves ``(features, target)`` batches computed once per split by ``model``'s frozen backbone.

    Wraps the image DataModule (which still finds, splits and transforms the images) and the model whose
    backbone computes the features. Same batch size and shuffling as the image loaders; no loader workers
    (the features are already in memory).
    """

    def __init__(self, images: pl.LightningDataModule, model: pl.LightningModule) -> None:
        super().__init__()
        if not model.hparams.get("cache_features"):
            raise SettingError(
                "Cached features need a model built with model.cache_features=true (input_mode='features', which "
                "needs model.freeze=backbone): it trains the head on them and refuses images."
            )
        self.staged = bool(getattr(model, "unfreeze_at_epoch", 0))  # features for the frozen epochs only
        if getattr(images, "augment", False) and not self.staged:
            log.warning(
                "model.cache_features=true: train-time augmentation is dropped; the head trains on features of "
                "the eval transform (centre crop) of each training image. Set data.augment=false to silence this."
            )
            images.augment = False
        skipped = random_layers_inside_backbone(model.net, model.head_name)
        if skipped:
            log.warning(
                "model.cache_features=true: random layers inside the frozen backbone act at train time without "
                "the cache but not on cached features: %s",
                ", ".join(skipped),
            )
        self.images = images
        self.model = model
        self.save_hyperparameters(dict(images.hparams))  # checkpoints record the image data's settings
        self.batch_size = images.batch_size
        self._features: dict[str, TensorDataset] = {}

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    @property
    def reload_every(self) -> int | None:
        """The ``reload_dataloaders_every_n_epochs`` that switches to the image loaders at the unfreeze epoch (and
        reloads harmlessly at its multiples); ``None`` when every epoch uses the cache."""
        return self.model.unfreeze_at_epoch if self.staged else None

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.images.trainer = self.trainer  # the image loaders shard val/test by the trainer's processes
        self.images.setup(stage)

    def train_dataloader(self) -> DataLoader:
        if self.model.input_mode != "features":
            return self.images.train_dataloader()
        return DataLoader(self.features("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.model.input_mode != "features":
            return self.images.val_dataloader()
        return DataLoader(self.features("val"), batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.model.input_mode != "features":
            return self.images.test_dataloader()
        return DataLoader(self.features("test"), batch_size=self.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def features(self, split: str) -> TensorDataset:
        """The split's ``(features, targets)``, computed on first use."""
        if split not in self._features:
            eval_view = self.staged and split == "train"  # the augmented training set serves the later epochs
            dataset = getattr(self.images, "train_eval_set" if eval_view else f"{split}_set")
            if dataset is None:
                raise RuntimeError(f"Call setup() before asking for the {split} features.")
            self._features[split] = extract_features(
                self.model, dataset, self.batch_size, self.images.num_workers, f"Extracting {split} features"
            )
            log.info("Cached %s backbone features: %s", split, tuple(self._features[split].tensors[0].shape))
        return self._features[split]


@torch.no_grad()
def extract_features(
    model: pl.LightningModule,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    description: str = "Extracting features",
) -> TensorDataset:
    """Run ``model.head_inputs`` over ``dataset`` in eval mode, leaving the run's random stream untouched.

    Progress (in batches) is shown when it takes more than a few seconds (see :mod:`finetune.progress`).
    """
    loader = ordered_loader(dataset, batch_size, num_workers)
    features, targets = [], []
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            for images, labels in track(loader, total=len(loader), description=description, unit="batches"):
                features.append(model.head_inputs(images.to(model.device)).float().cpu())
                targets.append(labels)
        finally:
            model.train(was_training)
    if not features:
        return TensorDataset(torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    return TensorDataset(torch.cat(features), torch.cat(targets))
