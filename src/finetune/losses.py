"""Training losses for ``model.criterion`` beyond torch's own: swap one in from config alone,
``model.criterion._target_=finetune.losses.FocalLoss model.criterion.gamma=2``.

A criterion is any ``nn.Module`` called as ``criterion(logits, targets)``, where ``targets`` are class indices, or
soft targets of shape ``(N, classes)`` under mixup/cutmix (``+callbacks=mixup``). Validation and test report the plain
NLL whatever the training loss. A criterion with a ``set_class_counts(counts)`` method is told the training split's
images per class before fitting (``FineTuneModule.setup``): :class:`WeightedCrossEntropy` weighs by them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from finetune.checks import check_number, numbers
from finetune.errors import SettingError

BALANCED = "balanced"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy with each sample's term scaled by ``(1 - p_true) ** gamma``, so
    that easy examples count less. ``gamma=0`` is cross-entropy; ``weight``: one factor per class, as in
    ``nn.CrossEntropyLoss``. Soft targets: the same with ``p_true`` the probability mass on the target."""

    def __init__(self, gamma: float = 2.0, weight: Sequence[float] | None = None) -> None:
        super().__init__()
        advice = "It down-weights easy examples: 0 is plain cross-entropy, 2 the paper's."
        check_number("model.criterion.gamma", gamma, ">= 0", lambda x: x >= 0, advice)
        self.gamma = float(gamma)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        soft = targets.float() if targets.ndim == 2 else F.one_hot(targets, logits.shape[-1]).float()
        p_true = (soft * log_probs.exp()).sum(dim=-1)
        weights = soft if self.weight is None else soft * self.weight
        per_sample = -(weights * log_probs).sum(dim=-1) * (1 - p_true).clamp_min(0) ** self.gamma
        if self.weight is not None and targets.ndim == 1:  # as nn.CrossEntropyLoss: the weighted mean
            return per_sample.sum() / weights.sum()
        return per_sample.mean()


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with one weight per class, for imbalanced data (``model/criterion=weighted_cross_entropy``).

    ``weight``: ``"balanced"`` (each class weighs ``n / (classes * n_class)`` by the training split's counts, so every
    class contributes as much to the loss as it would in a balanced set: scikit-learn's ``class_weight="balanced"``),
    a list of one positive number per class (in class-folder order), or ``None`` (plain cross-entropy). The weights
    are a buffer of the module, so checkpoints keep the ones a fit used. ``label_smoothing`` as torch's.
    """

    def __init__(self, weight: str | Sequence[float] | None = BALANCED, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.check_weight(weight)
        self.balanced = weight == BALANCED
        self.label_smoothing = float(label_smoothing)
        given = None if weight is None or self.balanced else torch.as_tensor(list(weight), dtype=torch.float32)
        self.register_buffer("weight", given)

    @staticmethod
    def check_weight(weight: Any) -> None:
        if weight is None or weight == BALANCED:
            return
        listed = isinstance(weight, (list, tuple)) and len(weight) >= 2 and numbers(weight, len(weight))
        if not listed or min(weight) <= 0:
            raise SettingError(
                f"model.criterion.weight must be balanced, null, or a list of one positive number per class (in "
                f"class-folder order, e.g. [1.0, 9.0]), got {weight!r}."
            )

    def set_class_counts(self, counts: Sequence[int]) -> None:
        """The training split's images per class (class-folder order): ``balanced`` weights come from them; a given
        list must have one number per class."""
        if self.balanced:
            counts_t = torch.as_tensor(list(counts), dtype=torch.float32)
            self.weight = counts_t.sum() / (len(counts_t) * counts_t.clamp_min(1))
        elif self.weight is not None and len(self.weight) != len(counts):
            raise SettingError(
                f"model.criterion.weight has {len(self.weight)} numbers but the data has {len(counts)} classes: give "
                "one weight per class folder, in their sorted order, or model.criterion.weight=balanced."
            )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.balanced and self.weight is None:
            raise RuntimeError("WeightedCrossEntropy(weight='balanced') was called before set_class_counts().")
        weight = None if self.weight is None else self.weight.to(logits.device, torch.float32)
        return F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=self.label_smoothing)
