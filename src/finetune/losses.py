"""Training losses for ``model.criterion`` beyond torch's own: swap one in from config alone,
``model.criterion._target_=finetune.losses.FocalLoss model.criterion.gamma=2``.

A criterion is any ``nn.Module`` called as ``criterion(logits, targets)``, where ``targets`` are class indices, or
soft targets of shape ``(N, classes)`` under mixup/cutmix (``+callbacks=mixup``). Validation and test report the plain
NLL whatever the training loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from finetune.checks import check_number


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
