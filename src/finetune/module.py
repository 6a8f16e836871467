"""The LightningModule: a pretrained backbone, a fresh head with its own learning rate, optional freezing."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from finetune.backbones import IMAGENET, build_backbone, dropouts_before_head, head_input
from finetune.data.preprocessing import CLASSES, PREPROCESSING
from finetune.metrics import TestMetrics, batch_indices
from finetune.schedules import BackboneUnfreeze, WeightAverage

log = logging.getLogger(__name__)

FREEZE_MODES = ("none", "backbone")
TEMPERATURE = "temperature"  # the checkpoint key of the fitted temperature
# The layers with running statistics (torchvision's and timm's BatchNorm layers subclass these).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INPUT_MODES = ("images", "features")
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class FineTuneModule(pl.LightningModule):
    """Classifier = torchvision backbone + new ``Linear`` head.

    Optimiser parameter groups carry an ``lr_scale`` (as timm's do): the backbone 1 and the head ``head_lr_mult``
    (a single group when ``head_lr_mult == 1`` or the backbone is frozen); the optimizer's ``lr`` is scaled by it.
    ``freeze="backbone"`` trains only the head, and keeps every BatchNorm of the frozen backbone in eval mode so its
    running statistics never move. ``cache_features`` (frozen only) sets ``input_mode="features"``: the module then
    takes 2-D batches of cached head inputs (see ``finetune.features``) and refuses images, and the other way round.
    ``net_runner``: how ``net`` is called, where a run compiles it (``model.compile=true``, see
    :func:`finetune.harness.guards.compile_network`); None calls it eagerly.
    ``unfreeze_at_epoch=N`` freezes the backbone (BatchNorm included) for the first N epochs of a fit, then trains
    it in its own group; with ``cache_features`` those N epochs train the head on cached features. ``ema_decay``
    validates, tests and checkpoints an EMA of the weights. Both live in :mod:`finetune.schedules`.
    ``label_smoothing``, ``mixup_alpha``, ``cutmix_alpha`` change the training loss only (torchvision's batch
    ``MixUp``/``CutMix``, one of the two per batch when both are on; the loss takes their soft targets, the training
    accuracy counts the larger share): val and test losses stay the plain NLL. ``temperature`` divides the logits
    at inference; it is fitted on validation after a fit (:mod:`finetune.calibration`) and kept in checkpoints.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        weights: str | Path | None = IMAGENET,
        freeze: str = "none",
        head_lr_mult: float = 10.0,
        channels_last: bool = False,
        cache_features: bool = False,
        unfreeze_at_epoch: int = 0,
        ema_decay: float | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        # Optimiser/scheduler factories come from the run's config; checkpoints keep only the model's recipe.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        built = build_backbone(backbone, num_classes, None if weights is None else str(weights))
        self.net = built.model
        self.head_name = built.head_name
        self.freeze = freeze
        self.head_lr_mult = head_lr_mult
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.recipe_callbacks: list[pl.Callback] = []
        if unfreeze_at_epoch:
            self.recipe_callbacks.append(BackboneUnfreeze(unfreeze_at_epoch))
        self.weight_average = WeightAverage(ema_decay) if ema_decay is not None else None
        if self.weight_average is not None:
            self.recipe_callbacks.append(self.weight_average)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if freeze == "backbone":
            for param in self.backbone_parameters():
                param.requires_grad_(False)
        self.net_runner: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by model.compile=true
        self._fitting = False

        self.loss = nn.CrossEntropyLoss()
        self.train_loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []
        mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else []
        self.batch_mix = v2.RandomChoice(mixes) if mixes else None
        self.temperature = 1.0  # > 0; the logits are divided by it outside training (1: uncalibrated)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Epoch losses as torchmetrics too: weighted by samples, and exact across DDP ranks with uneven shards. A nan
        # batch loss makes the epoch's nan (torchmetrics' default drops it with a warning: a broken batch would vanish
        # from val/loss and test/loss); "disable" would also drop the weights.
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy=math.nan) for _ in range(3))
        # The test report (per class, confusion matrix, AUROC, ECE, worst images): see finetune.metrics.
        self.test_metrics = TestMetrics(num_classes)
        self.test_report: dict[str, Any] | None = None
        self._test_batches: list[list[int]] | None = None
        # What the data was: class names in order and the eval preprocessing; saved in every checkpoint.
        self.data_spec: dict[str, Any] | None = None

    # --- parameters -------------------------------------------------------------------------------------
    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.net.get_submodule(self.head_name).parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.net.parameters() if id(p) not in head)

    def parameter_groups(self) -> list[dict]:
        """The trainable parameters in named groups, each with the ``lr_scale`` the optimizer applies to its lr."""
        head = list(self.head_parameters())
        backbone = [p for p in self.backbone_parameters() if p.requires_grad]
        if not backbone:
            return [{"name": "head", "params": head, "lr_scale": self.head_lr_mult}]
        if self.head_lr_mult == 1 and not self.unfreeze_at_epoch:
            return [{"name": "all", "params": backbone + head, "lr_scale": 1.0}]
        return [
            {"name": "backbone", "params": backbone, "lr_scale": 1.0},
            {"name": "head", "params": head, "lr_scale": self.head_lr_mult},
        ]

    def optimizer_class(self) -> str | None:
        """The optimizer's class (``torch.optim.SGD``), recorded in checkpoints so a resume can check it."""
        factory = self.optimizer_factory
        target = getattr(factory, "func", factory)
        return None if target is None else f"{target.__module__}.{target.__qualname__}"

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("FineTuneModule was built without an optimizer factory; it can only evaluate.")
        optimizer = scale_learning_rates(self.optimizer_factory(self.parameter_groups()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """The recipe's schedules (``unfreeze_at_epoch``, ``ema_decay``): the same objects for every fit and test."""
        return list(self.recipe_callbacks)

    # --- frozen BatchNorm ---------------------------------------------------------------------------------
    def backbone_frozen(self) -> bool:
        """Whether the backbone is frozen now: always with ``freeze="backbone"``, else before the unfreeze epoch
        of a fit (outside a fit, e.g. when testing, the model is the whole network)."""
        if self.freeze == "backbone":
            return True
        return bool(self.unfreeze_at_epoch) and self._fitting and self.current_epoch < self.unfreeze_at_epoch

    @property
    def compiled(self) -> bool:
        """Whether ``net`` runs compiled now (``model.compile=true``, and compiling has not failed)."""
        return bool(getattr(self.net_runner, "compiled", False))

    def teardown(self, stage: str) -> None:
        self._fitting = False

    @property
    def input_mode(self) -> str:
        """``features`` (2-D cached head inputs) while a ``cache_features`` model's backbone is frozen, else images."""
        return "features" if self.hparams.cache_features and self.backbone_frozen() else "images"

    def train(self, mode: bool = True) -> FineTuneModule:
        """Lightning switches modes before every epoch; frozen BatchNorm layers must stay in eval()."""
        super().train(mode)
        if self.backbone_frozen():
            for module in self.frozen_batchnorms():
                module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.train(True)  # re-assert after Lightning's own mode bookkeeping

    def frozen_batchnorms(self) -> list[nn.Module]:
        head = self.net.get_submodule(self.head_name)
        head_modules = {id(m) for m in head.modules()}
        return [m for m in self.net.modules() if isinstance(m, BATCHNORMS) and id(m) not in head_modules]

    # --- checkpoints ----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Note whether this is a fit, and the class names and eval preprocessing of the datamodule (set up before
        the module's hook)."""
        self._fitting = stage == "fit"
        if self._fitting:
            self.temperature = 1.0  # a temperature belongs to the weights it was fitted on, which a fit changes
        datamodule = self.trainer.datamodule
        images = getattr(datamodule, "images", datamodule)  # the image data behind a feature cache
        preprocessing = getattr(images, "preprocessing", None)
        if preprocessing is not None and getattr(images, "classes", None):
            self.data_spec = {CLASSES: list(images.classes), PREPROCESSING: preprocessing.to_dict()}

    # --- steps --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["optimizer_class"] = self.optimizer_class()
        checkpoint[TEMPERATURE] = self.temperature
        if self.data_spec is not None:
            checkpoint.update(self.data_spec)  # "classes", "preprocessing": what predict and export rely on
        if self.weight_average is not None:
            self.weight_average.write_average(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.temperature = float(checkpoint.get(TEMPERATURE, 1.0))  # older checkpoints: uncalibrated
        if checkpoint.get(CLASSES):
            self.data_spec = {CLASSES: list(checkpoint[CLASSES]), PREPROCESSING: checkpoint.get(PREPROCESSING)}

    # --- steps --------------------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (``NCHW``), or of cached head inputs (``NC``) in ``input_mode="features"``.

        Test-time views (``NVCHW``, :meth:`finetune.data.preprocessing.Preprocessing.views`): the log of the mean of
        the views' probabilities, which a softmax turns back into that mean.
        """
        if inputs.ndim == 5 and self.input_mode == "images":
            count, views = inputs.shape[:2]
            probs = self(inputs.flatten(0, 1)).float().softmax(dim=-1).view(count, views, -1).mean(dim=1)
            return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        expected = 2 if self.input_mode == "features" else 4
        if inputs.ndim != expected:
            raise ValueError(
                f"FineTuneModule in input_mode={self.input_mode!r} takes {expected}-D batches, got shape "
                f"{tuple(inputs.shape)}. Cached features (model.cache_features=true) are 2-D, images are 4-D."
            )
        logits = self.forward_head(inputs) if self.input_mode == "features" else self.forward_images(inputs)
        return logits if self.training or self.temperature == 1.0 else logits / self.temperature

    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (self.net_runner or self.net)(images)

    def head_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the head receives for ``images``: the features that ``cache_features`` stores."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return head_input(self.net, self.head_name, images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The head on cached features, after the Dropout that sits right in front of it (as in ``net``)."""
        for name in dropouts_before_head(self.net, self.head_name):
            features = self.net.get_submodule(name)(features)
        return self.net.get_submodule(self.head_name)(features)

    def _shared_step(self, batch, stage: str, accuracy: MulticlassAccuracy, mean_loss: MeanMetric) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        return self._log_step(logits, targets, stage, accuracy, mean_loss)

    def _log_step(
        self, logits, targets, stage: str, accuracy: MulticlassAccuracy, mean_loss: MeanMetric, loss=None
    ) -> torch.Tensor:
        """Log the step's loss (the plain NLL unless the training loss is given) and accuracy."""
        loss = self.loss(logits, targets) if loss is None else loss
        accuracy(logits, targets)
        mean_loss.update(loss.detach(), weight=targets.shape[0])
        # Metric objects: Lightning computes them once per epoch over every sample of every DDP rank.
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        soft = None
        if self.batch_mix is not None:
            images, soft = self.batch_mix(images, targets)  # soft: (N, classes) shares of the two mixed images
        logits = self(images)
        loss = self.train_loss_fn(logits, targets if soft is None else soft)
        hard = targets if soft is None else soft.argmax(dim=1)  # the larger share, for the training accuracy
        self._log_step(logits, hard, "train", self.train_acc, self.train_loss, loss)
        if self.input_mode == "features" and self.unfreeze_at_epoch and self.trainer.world_size > 1:
            # DDP syncs the gradient of every parameter that required grad when it wrapped the model, and fails
            # on one the loss does not reach: the backbone joins the graph with an exact 0 (see schedules.py).
            loss = loss + 0.0 * sum(p.sum() for p in self.backbone_parameters())
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc, self.val_loss)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self.test_report = None
        self._test_batches = batch_indices(self.trainer.test_dataloaders)

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self._log_step(logits, targets, "test", self.test_acc, self.test_loss)
        temperature = self.temperature if images.ndim < 5 else None  # averaged views have no raw logits
        self.test_metrics.update(logits, targets, self._sample_indices(batch_idx, len(targets)), temperature)

    def on_test_epoch_end(self) -> None:
        self.test_report = self.test_metrics.compute()  # synced over DDP ranks: every test image once
        self.test_metrics.reset()

    def _sample_indices(self, batch_idx: int, size: int) -> torch.Tensor:
        """The test set indices of this batch's samples (-1 where the loader's order is unknown)."""
        batches = self._test_batches
        if batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == size:
            return torch.tensor(batches[batch_idx], dtype=torch.long, device=self.device)
        return torch.full((size,), -1, dtype=torch.long, device=self.device)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=-1)


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Multiply each parameter group's ``lr`` by its ``lr_scale`` (once, when the optimizer is built)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer
