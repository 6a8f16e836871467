"""``data.sampler``: training images drawn by class weights instead of shuffled, one draw per epoch shared by all
DDP ranks.

``data.sampler=balanced`` draws every class equally often (each image with probability ``1 / (classes * n_class)``);
a list ``[w_0, w_1, ...]`` (class-folder order) or a mapping ``{class: w}`` gives each class a share of the draws
in proportion to ``w`` (``[1, 1]`` is ``balanced`` for two classes). Draws are with replacement, as many per epoch
as the training split has images, so an epoch has the usual number of steps; the minority's images repeat.

Why a ``DistributedSampler`` of its own: Lightning wraps any other sampler in ``DistributedSamplerWrapper``, which
iterates *each rank's own copy* of it and keeps every ``world_size``-th index. A ``WeightedRandomSampler`` draws from
the rank's global random stream, and those streams part as soon as the ranks' augmentations or dropout differ: each
rank then keeps its share of a different draw, so the epoch is no longer one draw that follows the weights, and two
ranks can train on the same positions of their draws. :class:`WeightedEpochSampler` is a ``DistributedSampler``, so
Lightning leaves it alone: every rank makes the same draw from its own generator seeded with ``seed + epoch`` (no
global random state is read or moved) and keeps the positions ``rank, rank + world_size, ...``; the ranks' parts
are disjoint and together are exactly the one draw. Lightning calls ``set_epoch`` at the start of every epoch, also
after a resume, so a resumed run draws for epoch ``e`` what the uninterrupted run drew (resuming restarts the
interrupted epoch, as Lightning always does; ``last.ckpt`` is written at an epoch's end).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from finetune.checks import is_number
from finetune.errors import SettingError

BALANCED = "balanced"
SAMPLER_MEANING = (
    "null (shuffle), balanced (every class drawn equally often), a list of one weight per class in class-folder "
    "order ([1, 3]) or a mapping of class to weight ({cat: 1, dog: 3})"
)


class WeightedEpochSampler(DistributedSampler):
    """One seeded weighted draw per epoch, dealt out so that each of ``num_replicas`` ranks gets its own part.

    ``weights``: one non-negative number per sample (need not sum to 1). ``num_samples``: the draws per epoch over
    all ranks (default ``len(weights)``), rounded up to a multiple of ``num_replicas`` so every rank gets as many (the
    extra draws are draws, not padding copies). ``replacement=False`` draws each index at most once (then
    ``num_samples <= len(weights)``).
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        replacement: bool = True,
    ) -> None:
        weights = torch.as_tensor(weights, dtype=torch.double)
        super().__init__(range(len(weights)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        total = len(weights) if num_samples is None else int(num_samples)
        if weights.ndim != 1 or not len(weights) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be a non-empty 1-d sequence of non-negative numbers, not all zero")
        self.weights, self.replacement = weights, replacement
        self.num_samples = math.ceil(total / self.num_replicas)  # per rank
        self.total_size = self.num_samples * self.num_replicas
        if not replacement and self.total_size > int((weights > 0).sum()):
            raise ValueError(f"{self.total_size} draws without replacement from {int((weights > 0).sum())} samples")

    def draw(self) -> list[int]:
        """This epoch's whole draw (every rank's parts, in draw order): the same on every rank."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.total_size, self.replacement, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


def check_sampler(value: Any) -> None:
    """``data.sampler``'s shape (the class names and the list's length are checked against the data at setup)."""
    if value is None or value == BALANCED:
        return
    weights = list(value.values()) if isinstance(value, Mapping) else value
    listed = isinstance(weights, (list, tuple)) and len(weights) >= 1 and all(is_number(w) for w in weights)
    if not listed or min(weights) < 0 or not sum(weights) > 0:
        raise SettingError(f"data.sampler must be {SAMPLER_MEANING}; weights >= 0, not all 0. Got {value!r}.")


def class_weights(value: Any, classes: Sequence[str]) -> list[float]:
    """Each class's share of the draws (unnormalised), in class-folder order."""
    if value == BALANCED:
        return [1.0] * len(classes)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(classes))
        missing = [name for name in classes if name not in value]
        if unknown or missing:
            raise SettingError(
                f"data.sampler names the classes {sorted(value)}, but the data has {list(classes)}"
                f"{f' (unknown: {unknown})' if unknown else ''}{f' (missing: {missing})' if missing else ''}: give "
                "every class folder a weight, or use data.sampler=balanced."
            )
        return [float(value[name]) for name in classes]
    if len(value) != len(classes):
        raise SettingError(
            f"data.sampler has {len(value)} weights but the data has {len(classes)} classes {list(classes)}: give one "
            "weight per class folder, in that order, or use data.sampler=balanced."
        )
    return [float(w) for w in value]


def sample_weights(value: Any, targets: Sequence[int], classes: Sequence[str]) -> list[float]:
    """Each training image's weight: its class's share divided among the class's images."""
    counts = [0] * len(classes)
    for target in targets:
        counts[target] += 1
    shares = class_weights(value, classes)
    return [shares[t] / counts[t] for t in targets]


def train_sampler(value: Any, targets: Sequence[int] | None, classes: Sequence[str], trainer: Any) -> Any:
    """The sampler of ``data.sampler`` for the training split (``None``: the loader shuffles), for this process's
    rank. Seeded by the run's seed (``PL_GLOBAL_SEED``, which ``seed_everything`` sets, as Lightning's own
    ``DistributedSampler`` is)."""
    if value is None:
        return None
    if targets is None:
        raise RuntimeError("Call setup('fit') before asking for the training sampler.")
    shards = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
    seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    return WeightedEpochSampler(
        sample_weights(value, targets, classes),
        num_replicas=shards.get("num_replicas", 1),
        rank=shards.get("rank", 0),
        seed=seed,
    )
