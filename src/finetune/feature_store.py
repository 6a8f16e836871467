"""``features.store=DIR``: cached backbone features kept on disk, so that runs with the same frozen backbone and eval
preprocessing compute each image's features once, whatever their split, fold, few-shot draw or seed.

A few-shot grid (``-m data.shots=1,2,5 data.shot_seed=0,1,2,3,4 features=cached``) or the k folds of
``finetune.label_issues`` otherwise push the same validation and test images through the same frozen network in
every job. One file per (backbone weights, eval transform) under ``DIR``, named by a digest of both: the backbone's
parameters and buffers as they are (not its file name), and the eval transform's description. Inside, each image is
known by its path, size and modification time: a changed file is computed again. Files are written whole
(:mod:`finetune.atomic`), merged with the file as it is just before; two jobs writing at the same instant each
write a complete, valid file, and rows the other added are computed again when next needed. What the store returns
is what :func:`finetune.features.extract_features` computed for those images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from finetune import atomic


def backbone_digest(net: nn.Module, head_name: str, transform: object) -> str:
    """sha256 over the backbone's parameters and buffers (the head left out) and the eval transform's text."""
    digest = hashlib.sha256(repr(transform).encode())
    for name, tensor in sorted(net.state_dict().items()):
        if name == head_name or name.startswith(f"{head_name}."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def samples_of(dataset: Dataset) -> list[tuple[str, int]] | None:
    """``(path, target)`` of every item of an ``ImageFolder`` or a subset of one; ``None`` for other datasets (e.g.
    decoded images held in memory, ``data.cache``), whose items have no file to be known by."""
    if isinstance(dataset, Subset):
        inner = samples_of(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    return [(str(path), int(target)) for path, target in samples] if isinstance(samples, list) else None


def stamp(path: str) -> str:
    """An image's identity in the store: its path, size and modification time."""
    info = os.stat(path)
    return f"{os.path.abspath(path)}|{info.st_size}|{info.st_mtime_ns}"


class FeatureStore:
    """The stored features of one backbone and eval transform: ``lookup`` what is known, ``add`` what was computed."""

    def __init__(self, folder: str | Path, digest: str) -> None:
        self.path = Path(folder) / f"features-{digest}.pt"
        self._rows: dict[str, torch.Tensor] | None = None

    def rows(self) -> dict[str, torch.Tensor]:
        if self._rows is None:
            self._rows = {}
            if self.path.is_file():
                saved = torch.load(self.path, weights_only=True)
                self._rows = dict(zip(saved["stamps"], saved["features"], strict=True))
        return self._rows

    def lookup(self, stamps: Sequence[str]) -> list[torch.Tensor | None]:
        rows = self.rows()
        return [rows.get(s) for s in stamps]

    def add(self, stamps: Sequence[str], features: torch.Tensor) -> None:
        """Add rows and write the file, merged with what another job may have written since it was read."""
        self._rows = None
        rows = self.rows()
        rows.update(zip(stamps, features, strict=True))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(rows)
        atomic.torch_save({"stamps": keys, "features": torch.stack([rows[k] for k in keys])}, self.path)
