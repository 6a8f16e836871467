"""Learning-rate schedules of our own, for ``scheduler=``: torch's cover the rest (cosine, linear warm-up, one-cycle).

A schedule is a factory the module calls with its optimizer (and ``total_steps``, the run's number of scheduler
steps, when the factory takes it); it sets one rate for every group, which the module scales by each group's
``lr_scale`` at every step (``FineTuneModule.lr_scheduler_step``).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from finetune.checks import check_int, check_number


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05, final_factor: float = 0.0
) -> LambdaLR:
    """A linear warm-up over the first ``warmup_fraction`` of ``total_steps`` (from ``1 / (warmup + 1)`` of the base
    rate), then cosine annealing to
    ``final_factor`` times the base rate at the last step (timm's and torchvision's reference recipe, per step)."""
    check_int("total_steps", total_steps, 1, "the schedule's steps over the run")
    check_number(
        "scheduler.scheduler.warmup_fraction", warmup_fraction, "in [0, 1)", lambda x: 0 <= x < 1, "e.g. 0.05."
    )
    check_number("scheduler.scheduler.final_factor", final_factor, "in [0, 1]", lambda x: 0 <= x <= 1, "e.g. 0.")
    warmup = round(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
