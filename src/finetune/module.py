"""The LightningModule: a pretrained backbone, a fresh head with its own learning rate, optional freezing."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.backbones import IMAGENET, build_backbone, dropouts_before_head, head_input
from finetune.checkpoint import CLASSES, PREPROCESSING, describe_data
from finetune.metrics import TestMetrics, batch_indices
from finetune.schedules import BackboneUnfreeze, WeightAverage, check_ema_decay

log = logging.getLogger(__name__)

FREEZE_MODES = ("none", "backbone")
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
    ``compile=True`` compiles ``net`` in place with ``torch.compile`` (its state_dict keys stay those of ``net``, so
    checkpoints load into an uncompiled module); where compiling fails, the run says so once and runs uncompiled.
    ``unfreeze_at_epoch=N`` freezes the backbone (BatchNorm included) for the first N epochs of a fit, then trains
    it in its own group; with ``cache_features`` those N epochs train the head on cached features. ``ema_decay``
    validates, tests and checkpoints an EMA of the weights. Both live in :mod:`finetune.schedules`.
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
        compile: bool = False,
        unfreeze_at_epoch: int = 0,
        ema_decay: float | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        if freeze not in FREEZE_MODES:
            raise ValueError(
                f"Unknown freeze mode {freeze!r}: model.freeze must be one of {FREEZE_MODES}. Use model.freeze=none "
                "to train every layer, or model.freeze=backbone to train the head only (experiment=frozen)."
            )
        head_advice = "It multiplies optimizer.lr for the new head: 10 (the book's fine-tuning), 1 for one rate."
        check_number("model.head_lr_mult", head_lr_mult, "> 0", lambda x: x > 0, head_advice)
        if isinstance(unfreeze_at_epoch, bool) or not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0:
            raise ValueError(
                f"model.unfreeze_at_epoch must be an integer >= 0 (0: the backbone trains from the start), "
                f"got {unfreeze_at_epoch!r}."
            )
        if unfreeze_at_epoch and freeze != "none":
            raise ValueError(
                f"model.unfreeze_at_epoch={unfreeze_at_epoch} needs model.freeze=none (got freeze={freeze!r}): "
                "a backbone frozen for the whole run never unfreezes."
            )
        if cache_features and freeze != "backbone" and not unfreeze_at_epoch:
            raise ValueError(
                f"model.cache_features=true needs model.freeze=backbone or model.unfreeze_at_epoch > 0 (got "
                f"freeze={freeze!r}): features can only be cached while the backbone does not train. Use "
                "experiment=frozen or experiment=lpft, or model.cache_features=false."
            )
        if ema_decay is not None:
            check_ema_decay(ema_decay)
        # Optimiser/scheduler factories come from the run's config; checkpoints keep only the model's recipe. So does
        # compiling: how a run executes the network, not what it is (a checkpoint loads uncompiled unless asked).
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "compile"])
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
        self._batch_images: int | None = None  # the last batch's size, for the out-of-memory advice
        self.compiled = False
        if compile:
            self.compile_net()

        self.loss = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Epoch losses as torchmetrics too: weighted by samples, and exact across DDP ranks with uneven shards.
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
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
        trainer = self._trainer
        if not self.unfreeze_at_epoch or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return False
        return trainer.current_epoch < self.unfreeze_at_epoch

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

    def frozen_batchnorms(self) -> list[_BatchNorm]:
        head = self.net.get_submodule(self.head_name)
        head_modules = {id(m) for m in head.modules()}
        return [m for m in self.net.modules() if isinstance(m, _BatchNorm) and id(m) not in head_modules]

    # --- checkpoints ----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Note the class names and eval preprocessing of the datamodule (set up before the module's hook)."""
        spec = describe_data(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        if spec is not None:
            self.data_spec = spec

    # --- torch.compile ------------------------------------------------------------------------------------
    def compile_net(self) -> bool:
        """Compile ``net`` in place (``nn.Module.compile``: no ``_orig_mod.`` in its state_dict); False if refused."""
        if self.input_mode == "features":
            log.info("model.compile=true with model.cache_features=true: the backbone runs once per split, uncompiled.")
            return False
        try:
            self.net.compile()
        except Exception as err:  # noqa: BLE001 - e.g. "Dynamo is not supported on Python 3.x", or Windows
            self._run_uncompiled(err)
            return False
        self.compiled = True
        return True

    def _run_uncompiled(self, err: BaseException) -> None:
        self.net._compiled_call_impl = None  # what nn.Module.compile sets; None restores the eager forward
        self.compiled = False
        log.warning(
            "model.compile=true, but torch.compile fails here (%s: %s); running uncompiled. Set model.compile=false "
            "to silence this.",
            type(err).__name__,
            str(err).strip().splitlines()[0][:300] if str(err).strip() else "",
        )

    def _net(self, images: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.net(images)
        try:
            return self.net(images)
        except torch._dynamo.exc.TorchDynamoException as err:  # compilation happens on the first calls
            self._run_uncompiled(err)
            return self.net(images)

    # --- steps --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["optimizer_class"] = self.optimizer_class()
        if self.data_spec is not None:
            checkpoint.update(self.data_spec)  # "classes", "preprocessing": what predict and export rely on
        if self.weight_average is not None:
            self.weight_average.write_average(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get(CLASSES):
            self.data_spec = {CLASSES: list(checkpoint[CLASSES]), PREPROCESSING: checkpoint.get(PREPROCESSING)}

    # --- steps --------------------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (``NCHW``), or of cached head inputs (``NC``) in ``input_mode="features"``."""
        expected = 2 if self.input_mode == "features" else 4
        if inputs.ndim != expected:
            raise ValueError(
                f"FineTuneModule in input_mode={self.input_mode!r} takes {expected}-D batches, got shape "
                f"{tuple(inputs.shape)}. Cached features (model.cache_features=true) are 2-D, images are 4-D."
            )
        if self.input_mode == "features":
            return self.forward_head(inputs)
        return self.forward_images(inputs)

    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._net(images)

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
        self._batch_images = len(targets)
        with self._explain_out_of_memory():
            logits = self(images)
        return self._log_step(logits, targets, stage, accuracy, mean_loss)

    def _log_step(self, logits, targets, stage: str, accuracy: MulticlassAccuracy, mean_loss: MeanMetric):
        loss = self.loss(logits, targets)
        accuracy(logits, targets)
        mean_loss.update(loss.detach(), weight=targets.shape[0])
        # Metric objects: Lightning computes them once per epoch over every sample of every DDP rank.
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train", self.train_acc, self.train_loss)
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
        self.test_metrics.update(logits, targets, self._sample_indices(batch_idx, len(targets)))

    def on_test_epoch_end(self) -> None:
        self.test_report = self.test_metrics.compute()  # synced over DDP ranks: every test image once
        self.test_metrics.reset()

    def _sample_indices(self, batch_idx: int, size: int) -> torch.Tensor:
        """The test set indices of this batch's samples (-1 where the loader's order is unknown)."""
        batches = self._test_batches
        if batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == size:
            return torch.tensor(batches[batch_idx], dtype=torch.long, device=self.device)
        return torch.full((size,), -1, dtype=torch.long, device=self.device)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with self._explain_out_of_memory():
            super().backward(loss, *args, **kwargs)

    @contextlib.contextmanager
    def _explain_out_of_memory(self):
        """A device out-of-memory error, re-raised naming the batch size and the settings that need less memory."""
        try:
            yield
        except torch.OutOfMemoryError as err:
            if _OOM_ADVICE in str(err):
                raise
            raise torch.OutOfMemoryError(f"{err}\n\n{self._memory_advice()}") from err

    def _memory_advice(self) -> str:
        trainer = self._trainer
        images = getattr(self, "_batch_images", None)
        precision = str(trainer.precision) if trainer is not None else "?"
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        lines = [
            f"{_OOM_ADVICE} with a batch of {images} images per device (data.batch_size), precision {precision}, "
            f"model.channels_last={str(self.hparams.channels_last).lower()}, "
            f"trainer.accumulate_grad_batches={accumulate}. To need less memory:",
            "- a smaller data.batch_size, with trainer.accumulate_grad_batches raised by the same factor to keep "
            f"the batch per optimiser step (e.g. data.batch_size={max((images or 2) // 2, 1)} "
            f"trainer.accumulate_grad_batches={accumulate * 2});",
        ]
        if precision.startswith(("32", "64")):
            lines.append("- trainer.precision=bf16-mixed (or 16-mixed): activations take half the bytes;")
        if not self.hparams.channels_last:
            lines.append("- model.channels_last=true (less workspace for convolutions on tensor-core GPUs);")
        lines.append("- a smaller data.image_size, or model.freeze=backbone to train the head only.")
        return "\n".join(lines)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=-1)


def check_number(key: str, value: Any, rule: str, holds: Callable[[float], bool], advice: str) -> None:
    """``ValueError`` naming ``key`` and ``value`` unless ``value`` is a finite real number for which ``holds``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and holds(value)):
        raise ValueError(f"{key} must be {rule}, got {value!r}. {advice}")


_OOM_ADVICE = "Out of device memory"


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Multiply each parameter group's ``lr`` by its ``lr_scale`` (once, when the optimizer is built)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer
