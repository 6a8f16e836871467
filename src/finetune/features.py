"""Cached backbone features for the frozen experiment: run the frozen backbone once per split, train the head only.

With ``model.freeze=backbone`` every epoch pushes the same images through the same frozen network, so all but the
head's work is repeated. ``features=cached`` computes what the head receives once per split (train, val,
test), with the *eval* transform and the backbone in eval mode, keeps it in memory, and trains the head on it.

What changes, and what does not:

- Train-time augmentation is dropped: every epoch sees the same centre-cropped image of each training example
  (``data.augmentation`` is set to null, with a warning if it was on). For a bit-for-bit comparison, run the
  uncached frozen path with ``data.augmentation=null``.
- Dropout placed directly in front of the head (MobileNetV2/V3's and EfficientNet's ``classifier`` Dropout) still
  applies at train time: it runs on the cached features exactly where it ran on the backbone's output.
- Random layers *inside* the frozen backbone (e.g. EfficientNet's stochastic depth, VGG's first dropout) act at
  train time in the uncached path but not on cached features; a warning names them.
- Frozen BatchNorm uses its running statistics in both paths (the uncached path keeps it in eval mode too).
- The random number stream of the run is not touched by the extraction, so shuffling and dropout masks match the
  uncached run draw for draw.

Features are computed lazily, the first time Lightning asks for a split's loader (the model is then on its device).

With ``callbacks.unfreeze.epoch=N`` (``experiment=lpft``, see :mod:`finetune.callbacks.unfreeze`) only the first N
epochs use the cache: the loaders serve features while the model's backbone is frozen and the image loaders after
(with train-time augmentation: the training features come from the eval transform of the training images instead);
the trainer reloads its loaders at epoch N for that (``reload_every``, which the assembly gives the trainer). Those
N epochs are the frozen experiment's on cached features, step for step. Under DDP the backbone joins the graph of
those epochs with an exact 0: DDP syncs the gradient of every parameter that required grad when it wrapped the
model.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from finetune.errors import SettingError
from finetune.feature_store import FeatureStore, backbone_digest, samples_of, stamp
from finetune.progress import track
from finetune.workers import ordered_loader

log = logging.getLogger(__name__)
UNFREEZE = "finetune.callbacks.unfreeze.BackboneUnfreeze"
MIXUP = "finetune.callbacks.mixup.MixUpCutMix"


class FeatureCacheDataModule(pl.LightningDataModule):
    """Serves ``(features, target)`` batches computed once per split by ``model``'s frozen backbone.

    Wraps the image DataModule (which still finds, splits and transforms the images) and the model whose backbone
    computes the features. Same batch size and shuffling as the image loaders; no loader workers (the features are
    already in memory). ``unfreeze_epoch``: the epoch a :class:`~finetune.callbacks.unfreeze.BackboneUnfreeze`
    trains the backbone from; the cache serves the epochs before it.
    """

    def __init__(
        self,
        images: pl.LightningDataModule,
        model: pl.LightningModule,
        unfreeze_epoch: int | None = None,
        store: str | None = None,
    ):
        super().__init__()
        self.store = store  # a folder keeping features across runs (finetune.feature_store), or None
        self.staged = unfreeze_epoch is not None  # features for the frozen epochs only
        self.unfreeze_epoch = unfreeze_epoch
        if getattr(images, "augmentation", None) is not None and not self.staged:
            log.warning(
                "features=cached: train-time augmentation is dropped; the head trains on features of the eval "
                "transform (centre crop) of each training image. Set data.augmentation=null to silence this."
            )
            images.augmentation = None
        skipped = random_layers_inside_backbone(model.net, model.head_name)
        if skipped:
            log.warning(
                "features=cached: random layers inside the frozen backbone act at train time without the cache but "
                "not on cached features: %s",
                ", ".join(skipped),
            )
        self.images = images
        self.model = model
        self.save_hyperparameters(dict(images.hparams))  # checkpoints record the image data's settings
        self.batch_size = images.batch_size
        self._features: dict[str, TensorDataset] = {}

    @staticmethod
    def check_settings(features: DictConfig, cfg: DictConfig) -> None:
        """Features can only be cached while the backbone does not train, and of unmixed images."""
        callbacks = [str(c.get("_target_")) for c in (cfg.get("callbacks") or {}).values() if c]
        freeze = cfg.model.get("freeze") if cfg.get("model") else "backbone"
        if freeze != "backbone" and UNFREEZE not in callbacks:
            raise SettingError(
                f"features=cached needs model.freeze=backbone or +callbacks=unfreeze (got model.freeze={freeze!r}): "
                "features can only be cached while the backbone does not train. Use experiment=frozen or "
                "experiment=lpft, or leave features unset."
            )
        if MIXUP in callbacks:
            raise SettingError(
                "callbacks.mixup mixes training images, but features=cached trains on cached features of unmixed "
                "images: leave features unset, or drop the mixup callback."
            )

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def class_counts(self) -> list[int]:
        return self.images.class_counts()

    @property
    def reload_every(self) -> int | None:
        """The ``reload_dataloaders_every_n_epochs`` that switches to the image loaders at the unfreeze epoch (and
        reloads harmlessly at its multiples); ``None`` when every epoch uses the cache."""
        return self.unfreeze_epoch if self.staged else None

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.images.trainer = self.trainer  # the image loaders shard val/test by the trainer's processes
        self.images.setup(stage)
        if self.staged and stage == "fit" and self.trainer is not None and self.trainer.world_size > 1:
            join_backbone_to_graph(self.model)

    def train_dataloader(self) -> DataLoader:
        if not self.model.backbone_frozen:
            return self.images.train_dataloader()
        sampler = self.images.train_sampler()  # data.sampler: the same draw over the features as over the images
        return DataLoader(self.features("train"), batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        if not self.model.backbone_frozen:
            return self.images.val_dataloader()
        return DataLoader(self.features("val"), batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.model.backbone_frozen:
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
            self._features[split] = self._extract(dataset, f"Extracting {split} features")
            log.info("Cached %s backbone features: %s", split, tuple(self._features[split].tensors[0].shape))
        return self._features[split]

    def _extract(self, dataset: Dataset, description: str) -> TensorDataset:
        """:func:`extract_features` of ``dataset``; with ``store``, only of the images it does not hold yet."""
        samples = samples_of(dataset) if self.store else None
        if samples is None:
            return extract_features(self.model, dataset, self.batch_size, self.images.num_workers, description)
        digest = backbone_digest(self.model.net, self.model.head_name, self.images.eval_transform())
        store = FeatureStore(self.store, digest)
        stamps = [stamp(path) for path, _ in samples]
        found = store.lookup(stamps)
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            computed = extract_features(
                self.model, Subset(dataset, missing), self.batch_size, self.images.num_workers, description
            ).tensors[0]
            store.add([stamps[i] for i in missing], computed)
            for i, row in zip(missing, computed, strict=True):
                found[i] = row
        log.info("%s: %d of %d from %s", description, len(samples) - len(missing), len(samples), store.path)
        if not found:
            return TensorDataset(torch.empty(0, 0), torch.empty(0, dtype=torch.long))
        return TensorDataset(torch.stack(found), torch.tensor([target for _, target in samples]))


def unfreeze_epoch(cfg: DictConfig) -> int | None:
    """The epoch ``callbacks.unfreeze`` (if configured) trains the backbone from."""
    for node in (cfg.get("callbacks") or {}).values():
        if node and str(node.get("_target_")) == UNFREEZE:
            return int(node.epoch)
    return None


@torch.no_grad()
def extract_features(
    model: pl.LightningModule,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    description: str = "Extracting features",
) -> TensorDataset:
    """What ``model``'s head receives for every item of ``dataset``, in eval mode, leaving the run's random stream
    untouched. Progress (in batches) is shown when it takes more than a few seconds (see :mod:`finetune.progress`).
    """
    loader = ordered_loader(dataset, batch_size, num_workers)
    features, targets = [], []
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            for images, labels in track(loader, total=len(loader), description=description, unit="batches"):
                features.append(head_input(model.net, model.head_name, images.to(model.device)).float().cpu())
                targets.append(labels)
        finally:
            model.train(was_training)
    if not features:
        return TensorDataset(torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    return TensorDataset(torch.cat(features), torch.cat(targets))


def join_backbone_to_graph(model: pl.LightningModule) -> None:
    """While the backbone is frozen, add an exact 0 that depends on every backbone parameter to the head's output:
    DDP fails on a parameter that required grad when it wrapped the model but that the loss does not reach."""

    def add_zero(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if model.training and model.backbone_frozen:
            return output + 0.0 * sum(p.sum() for p in model.backbone_parameters())
        return None

    model.net.get_submodule(model.head_name).register_forward_hook(add_zero)


# --- network structure: what the head receives, and the random layers around it ---------------------------------
_RANDOM_LAYERS = (nn.modules.dropout._DropoutNd,)
_STOCHASTIC_DEPTH = ("StochasticDepth", "DropPath")  # torchvision's and timm's per-sample residual drop


def head_input(net: nn.Module, head_name: str, images: torch.Tensor) -> torch.Tensor:
    """What ``net``'s head layer receives for ``images`` (captured by a forward pre-hook on the head)."""
    captured: list[torch.Tensor] = []
    handle = net.get_submodule(head_name).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        net(images)
    finally:
        handle.remove()
    return captured[0]


def head_forward(net: nn.Module, head_name: str, features: torch.Tensor) -> torch.Tensor:
    """The head on cached features, after the Dropout layers right in front of it (as they run in ``net``)."""
    for name in dropouts_before_head(net, head_name):
        features = net.get_submodule(name)(features)
    return net.get_submodule(head_name)(features)


def dropouts_before_head(net: nn.Module, head_name: str) -> list[str]:
    """Names of the Dropout layers directly in front of the head in its ``nn.Sequential`` (in order)."""
    parent_name, _, child = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    if not isinstance(parent, nn.Sequential):
        return []
    names = [name for name, _ in parent.named_children()]
    found: list[str] = []
    for name in reversed(names[: names.index(child)]):
        if not isinstance(parent.get_submodule(name), _RANDOM_LAYERS):
            break
        found.insert(0, f"{parent_name}.{name}" if parent_name else name)
    return found


def random_layers_inside_backbone(net: nn.Module, head_name: str) -> list[str]:
    """Dropout / stochastic-depth layers that cached features cannot reproduce (they sit inside the backbone)."""
    kept = set(dropouts_before_head(net, head_name))
    return [
        name
        for name, module in net.named_modules()
        if name not in kept
        and (isinstance(module, _RANDOM_LAYERS) or type(module).__name__ in _STOCHASTIC_DEPTH)
        and (getattr(module, "p", 0) or getattr(module, "drop_prob", 0) or 0) > 0
    ]
