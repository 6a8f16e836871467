"""The book's LightningModule: a pretrained backbone, a fresh head with its own learning rate, optional freezing.

What a researcher swaps is injected, built by Hydra from config: the loss (``model.criterion``), the optimizer
(``optimizer=``, a factory called with this module's parameter groups) and the scheduler (``scheduler=``: a factory
plus Lightning's ``interval`` and ``frequency``). The recipe extras are components of their own around it:
``finetune.callbacks`` (unfreezing, EMA, mixup/cutmix, compile, channels-last), ``finetune.scoring`` (temperature
and test-time views when a trained model is scored) and ``finetune.features`` (the head trained on cached features).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.backbones import IMAGENET, build_backbone
from finetune.backbones.head_init import check_head_init
from finetune.checks import check_choice, check_int, check_number, check_optimizer
from finetune.errors import SettingError
from finetune.features import head_forward
from finetune.param_groups import Grouping, parameter_groups

FREEZE_MODES = ("none", "backbone")
# train: PyTorch's default, batch statistics while training; frozen: the backbone's pretrained statistics throughout.
BATCHNORM_MODES = ("train", "frozen")
INTERVALS = ("step", "epoch")  # Lightning's: the scheduler steps after every optimizer step, or every epoch
# The layers with running statistics (torchvision's and timm's BatchNorm layers subclass these).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


class FineTuneModule(pl.LightningModule):
    """Classifier = backbone (``finetune.backbones``) + a new Xavier-initialised ``Linear`` head.

    The optimizer gets named parameter groups, each with an ``lr_scale`` (as timm's groups have): ``backbone``
    1 and ``head`` ``head_lr_mult`` (only ``head`` when the backbone is frozen); ``groups`` (``model.groups``:
    layer-wise rate decay, norms and biases without weight decay) splits them further (:mod:`finetune.param_groups`).
    Every group's rate is its ``lr_scale`` times the schedule's rate at every step (:meth:`lr_scheduler_step`), so the
    ratios also hold under schedules that set absolute rates (``OneCycleLR``, ``CyclicLR``). ``freeze="backbone"``
    trains the head only and keeps the backbone's BatchNorm layers in eval mode, so their running statistics never
    move. ``batchnorm="frozen"`` keeps them in eval mode while every layer trains (their scale and shift still learn):
    a network whose pretrained statistics are far from any one batch's starts fine-tuning where it was, not broken.

    ``scheduler``: Lightning's ``lr_scheduler`` dictionary with a factory under ``scheduler`` (called with the
    optimizer, and with ``total_steps`` when it takes one that the config leaves unset: the run's number of scheduler
    steps) and ``interval`` / ``frequency``.

    ``head_init``: ``None`` or ``{"from": "xavier"}`` for the book's fresh head; ``{"from": "source", "classes":
    {class: [source indices] | "rest"}}``, its classes in output order, starts the head from the pretrained
    classifier's rows (:mod:`finetune.backbones.head_init`; ``finetune.run`` orders the mapping by the class folders).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        weights: str | None = IMAGENET,
        freeze: str = "none",
        head_lr_mult: float = 10.0,
        groups: dict[str, Any] | None = None,
        criterion: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: dict[str, Any] | None = None,
        head_init: dict[str, Any] | None = None,
        batchnorm: str = "train",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["criterion", "optimizer", "scheduler"])  # the model's recipe, for checkpoints
        self.grouping = Grouping.of(groups)
        built = build_backbone(backbone, num_classes, weights, head_init)
        self.net, self.head_name = built.model, built.head_name
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.optimizer_factory, self.scheduler_config = optimizer, scheduler
        self.frozen_epochs = 0  # a fit's first epochs with the backbone frozen: set by BackboneUnfreeze
        if freeze == "backbone":
            for param in self.backbone_parameters():
                param.requires_grad_(False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        # Epoch losses as torchmetrics: weighted by samples, exact across DDP ranks with uneven shards; a nan batch
        # makes the epoch's nan (torchmetrics' default would drop it with a warning, and a broken batch would vanish).
        self.train_loss, self.val_loss = MeanMetric(nan_strategy=math.nan), MeanMetric(nan_strategy=math.nan)

    @staticmethod
    def check_settings(model: DictConfig, cfg: DictConfig) -> None:
        """``model.*`` and ``optimizer.*``, before anything is built (``finetune.run`` calls it)."""
        if model.get("freeze") not in FREEZE_MODES:
            raise SettingError(
                f"Unknown model.freeze={model.get('freeze')!r}: choose one of {FREEZE_MODES} (none trains every "
                "layer; backbone trains the head only, as experiment=frozen)."
            )
        meaning = "train: normalise with each batch's statistics; frozen: keep the pretrained ones while training"
        check_choice("model.batchnorm", model.get("batchnorm", "train"), BATCHNORM_MODES, meaning)
        if model.get("batchnorm") == "frozen" and model.get("weights") is None:
            raise SettingError(
                "model.batchnorm=frozen keeps the backbone's pretrained BatchNorm statistics, but model.weights is "
                "null (random weights have none): use model.batchnorm=train."
            )
        advice = "It multiplies optimizer.lr for the new head: 10 (the book's fine-tuning), 1 for one rate."
        check_number("model.head_lr_mult", model.get("head_lr_mult"), "> 0", lambda x: x > 0, advice)
        groups = model.get("groups")
        Grouping.of(OmegaConf.to_container(groups, resolve=True) if OmegaConf.is_config(groups) else groups)
        head_init = model.get("head_init")
        head_init = OmegaConf.to_container(head_init, resolve=True) if OmegaConf.is_config(head_init) else head_init
        check_head_init(head_init, model.get("weights"))
        criterion = model.get("criterion") or {}
        if "label_smoothing" in criterion:  # torch's losses check it only when they first run
            advice = "It is the share of each training target spread evenly over the classes (0: none; 0.1 is usual)."
            smoothing = criterion.get("label_smoothing")
            check_number("model.criterion.label_smoothing", smoothing, "in [0, 1)", lambda x: 0 <= x < 1, advice)
        check_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True))
        scheduler = cfg.get("scheduler")
        if scheduler:
            check_choice("scheduler.interval", scheduler.get("interval"), INTERVALS, "how often the schedule steps")
            check_int("scheduler.frequency", scheduler.get("frequency", 1), 1, "steps or epochs between its steps")

    # --- parameter groups and their rates -------------------------------------------------------------------
    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.net.get_submodule(self.head_name).parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.net.parameters() if id(p) not in head)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in named groups, each with the ``lr_scale`` applied to the schedule's rate."""
        return parameter_groups(self.net, self.head_name, self.hparams.head_lr_mult, self.grouping)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("FineTuneModule was built without an optimizer factory; it can only be scored.")
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_config is None:
            return scale_rates(optimizer, up=True)
        config = dict(self.scheduler_config)
        factory = config.pop("scheduler")
        scheduler = factory(optimizer, **self._schedule_length(factory, config))  # sees the unscaled rates
        return {"optimizer": scale_rates(optimizer, up=True), "lr_scheduler": {"scheduler": scheduler, **config}}

    def _schedule_length(self, factory: Any, config: dict[str, Any]) -> dict[str, int]:
        """``total_steps`` for a schedule that takes it and was not given one: the scheduler steps of the run."""
        takes = "total_steps" in inspect.signature(getattr(factory, "func", factory)).parameters
        if not takes or getattr(factory, "keywords", {}).get("total_steps") is not None:
            return {}
        steps = self.trainer.estimated_stepping_batches if config.get("interval") == "step" else self.trainer.max_epochs
        return {"total_steps": max(1, int(steps) // int(config.get("frequency", 1)))}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step the schedule on the groups' unscaled rates, then give each group ``lr_scale`` times its rate."""
        scale_rates(scheduler.optimizer, up=False)
        scheduler.step() if metric is None else scheduler.step(metric)
        scale_rates(scheduler.optimizer, up=True)

    def setup(self, stage: str) -> None:
        """A criterion that weighs classes by the training split (``set_class_counts``, e.g. ``weight=balanced`` of
        :class:`~finetune.losses.WeightedCrossEntropy`) gets its per-class image counts from the data module before
        fitting (the data module is set up first, and on resume before the checkpoint's weights are restored)."""
        set_counts = getattr(self.criterion, "set_class_counts", None)
        if stage == "fit" and set_counts is not None:
            set_counts(self.trainer.datamodule.class_counts())

    # --- frozen BatchNorm ---------------------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone is frozen now: always with ``freeze="backbone"``, else in the first
        ``frozen_epochs`` of a fit (``finetune.callbacks.unfreeze``)."""
        return self.hparams.freeze == "backbone" or self.current_epoch < self.frozen_epochs

    @property
    def batchnorm_frozen(self) -> bool:
        """Whether the backbone's BatchNorm layers keep their running statistics now (eval mode while training)."""
        return self.backbone_frozen or self.hparams.get("batchnorm", "train") == "frozen"

    def train(self, mode: bool = True) -> FineTuneModule:
        """Lightning switches modes before every epoch; frozen BatchNorm layers must stay in eval()."""
        super().train(mode)
        if self.batchnorm_frozen:
            for module in self.frozen_batchnorms():
                module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.train(True)  # re-assert after Lightning's own mode bookkeeping

    def frozen_batchnorms(self) -> list[nn.Module]:
        head = {id(m) for m in self.net.get_submodule(self.head_name).modules()}
        return [m for m in self.net.modules() if isinstance(m, BATCHNORMS) and id(m) not in head]

    # --- steps --------------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for images (``NCHW``), or for cached head inputs (``NC``, see ``finetune.features``)."""
        return head_forward(self.net, self.head_name, inputs) if inputs.ndim == 2 else self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = self.criterion(logits, targets)  # targets may be soft (N, classes): mixup and cutmix
        hard = targets.argmax(dim=1) if targets.ndim == 2 else targets  # the larger share, for the accuracy
        self._log("train", logits, hard, loss, self.train_acc, self.train_loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        self._log("val", logits, targets, F.cross_entropy(logits, targets), self.val_acc, self.val_loss)

    def _log(self, stage: str, logits, targets, loss, accuracy: MulticlassAccuracy, mean_loss: MeanMetric) -> None:
        accuracy(logits, targets)
        mean_loss.update(loss.detach(), weight=targets.shape[0])
        # Metric objects: Lightning computes them once per epoch over every sample of every DDP rank.
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)


def scale_rates(optimizer: torch.optim.Optimizer, up: bool) -> torch.optim.Optimizer:
    """Multiply (``up``) or divide every group's ``lr`` by its ``lr_scale``."""
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group["lr"] = group["lr"] * scale if up else group["lr"] / scale
    return optimizer
