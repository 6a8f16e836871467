"""How ``train/`` is split: a validation split carved from it, stratified by class and seeded (a held-out
``data.val_fraction``, or fold ``data.fold`` of ``data.folds`` stratified folds); the test split is never touched.
Few-shot runs (``data.shots=K``) then keep K training images per class, drawn by ``data.shot_seed``."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.data.images import preview
from finetune.errors import DataError

# A copy of a validation split (scripts/val_split_folder.py: VAL/test/<class>/...) says what it is in this file beside
# its test/ folder, so that the shift benchmark on it, and a recipe chosen on that, can tell it from a test split.
VALIDATION_RECORD = "validation_split.json"
SPLIT_SETTINGS = ("val_fraction", "split_seed", "folds", "fold")  # the data.* settings that decide the split


def validation_record(root: str | Path) -> dict[str, Any] | None:
    """The record of a validation-split copy at ``root`` (data root, split settings, classes, images); ``None`` for
    any other folder (a test split among them)."""
    try:
        record = json.loads((Path(root) / VALIDATION_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def split_train(
    targets: list[int], classes: list[str], val_fraction: float, seed: int, folds: int | None, fold: int | None
) -> tuple[list[int], list[int]]:
    """(train, val) indices of the train folder: fold ``fold`` of ``folds``, or ``val_fraction`` held out."""
    if folds is None:
        return stratified_split(targets, val_fraction, seed)
    sizes = {name: targets.count(index) for index, name in enumerate(classes)}
    smallest = min(sizes, key=sizes.get)
    if sizes[smallest] < folds:
        if sizes[smallest] >= 2:
            advice = f"Use data.folds between 2 and {sizes[smallest]}, or add images to that class."
        else:  # no number of folds (they start at 2), nor a held-out fraction, can split a 1-image class
            advice = (
                f"Every validation split needs at least 2 images in each class (one to train on, one to validate): "
                f"add images to {smallest!r}, or leave the class out."
            )
        raise DataError(
            f"data.folds={folds} is larger than the smallest class ({smallest!r}: {sizes[smallest]} training "
            f"image(s)): some folds would validate without that class. {advice}"
        )
    return fold_split(targets, folds, fold, seed)


def check_split(folder, train_idx: list[int], val_idx: list[int], val_fraction: float) -> None:
    """Every class needs training images to learn from and validation images to select the checkpoint by."""
    counts = {name: [0, 0] for name in folder.classes}
    for side, indices in enumerate((train_idx, val_idx)):
        for index in indices:
            counts[folder.classes[folder.targets[index]]][side] += 1
    short = [
        f"class {name!r}: {n_train} train, {n_val} val"
        for name, (n_train, n_val) in counts.items()
        if not (n_train and n_val)
    ]
    if short:
        raise DataError(
            f"data.val_fraction={val_fraction} leaves {len(short)} class(es) without training or "
            f"validation images ({preview(short, limit=10, sep='; ')}): each class gives "
            "round(val_fraction * n) of its n training images to val, and the validation split selects the "
            "checkpoint that is tested. Change data.val_fraction, or add images to those classes."
        )


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) so that each class gives ``round(val_fraction * n_class)`` to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(seed)
    train, val = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        n_val = round(val_fraction * len(indices))
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def stratified_folds(targets: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Deal the indices into ``folds`` disjoint folds covering them all, each class spread as evenly as it can be.

    Each class is shuffled (seeded) and dealt round-robin, starting where the previous class stopped, so fold
    sizes differ by at most one overall and each class's counts per fold differ by at most one.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}.")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(seed)
    dealt: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        for position, index in enumerate(indices):
            dealt[(start + position) % folds].append(index)
        start = (start + len(indices)) % folds
    return [sorted(fold) for fold in dealt]


def fold_split(targets: Sequence[int], folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices for fold ``fold`` of :func:`stratified_folds`: val is that fold, train the others."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}.")
    dealt = stratified_folds(targets, folds, seed)
    return sorted(i for k, part in enumerate(dealt) if k != fold for i in part), dealt[fold]


def draw_shots(
    targets: Sequence[int], classes: Sequence[str], train_idx: list[int], shots: int | None, seed: int
) -> list[int]:
    """K = ``shots`` of each class's training indices, drawn by ``seed`` (``None``: all of them).

    Drawn from what the validation split left, so validation is the same images for every K and every draw: a
    few-shot curve then compares models on one yardstick. Each class's images are shuffled by ``seed`` whatever K,
    and the first K kept: with one seed the K = 1 images are among the K = 2 ones, and so on (nested draws, so a
    curve over K with one seed adds images rather than swapping them).
    """
    if shots is None:
        return train_idx
    by_class: dict[int, list[int]] = {}
    for index in train_idx:
        by_class.setdefault(targets[index], []).append(index)
    short = {classes[c]: len(found) for c, found in sorted(by_class.items()) if len(found) < shots}
    if short:
        listing = ", ".join(f"{name!r}: {n}" for name, n in short.items())
        raise DataError(
            f"data.shots={shots} is more than the training images of {len(short)} class(es) ({listing}, after the "
            f"validation split). Use data.shots <= {min(short.values())}, or add images to those classes."
        )
    rng = random.Random(seed)
    kept = []
    for c in sorted(by_class):
        order = sorted(by_class[c])
        rng.shuffle(order)
        kept += order[:shots]
    return sorted(kept)
