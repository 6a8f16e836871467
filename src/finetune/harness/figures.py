"""The test report's two figures: ``confusion_matrix.png`` and ``top_losses.png`` (matplotlib, optional).

matplotlib is the optional extra ``figures``; without it the figures are skipped with one warning and everything
else (results.json's ``test/*`` keys, which hold the same numbers) is written as usual.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from finetune import atomic
from finetune.data import IMAGENET_MEAN, IMAGENET_STD
from finetune.harness.run_folder import RunFolder

log = logging.getLogger(__name__)

COLUMNS = 4


def write_figures(
    report: dict[str, Any],
    record: dict[str, Any],
    classes: list[str],
    dataset: Dataset | None,
    preprocessing: dict[str, Any] | None,
    folder: RunFolder,
) -> list[Path]:
    """Draw both figures into ``folder``; the paths written (none without matplotlib)."""
    try:
        from matplotlib.figure import Figure  # noqa: F401 - imported here: an optional dependency
    except ImportError:
        log.warning(
            "Skipping %s and %s: matplotlib is not installed (pip install 'finetune[figures]').",
            folder.confusion_matrix.name,
            folder.top_losses.name,
        )
        return []
    folder.path.mkdir(parents=True, exist_ok=True)
    written = []
    worst = record.get("test/top_losses") or []
    drawings = [(folder.confusion_matrix, lambda path: confusion_matrix_figure(report["confusion"], classes, path))]
    if dataset is not None and worst and all(entry["index"] >= 0 for entry in worst):
        drawings.append((folder.top_losses, lambda path: top_losses_figure(worst, dataset, preprocessing or {}, path)))
    else:
        log.warning("Skipping %s: the test images are not available to draw.", folder.top_losses.name)
    for path, draw in drawings:
        try:
            written.append(draw(path))
        except Exception as err:  # noqa: BLE001 - a figure must never cost the run its results
            log.warning("Could not draw %s: %s: %s", path, type(err).__name__, err)
    return written


def confusion_matrix_figure(confusion: torch.Tensor, classes: list[str], path: Path) -> Path:
    """Counts, rows = true class, columns = predicted class; each row's share of its class as the colour."""
    from matplotlib.figure import Figure

    counts = confusion.long()
    k = len(classes)
    side = min(24.0, max(4.5, 0.6 * k + 2.5))
    figure = Figure(figsize=(side, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    shares = (counts.float() / counts.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    axes.set_xticks(range(k), classes, rotation=45, ha="right")
    axes.set_yticks(range(k), classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"Confusion matrix (test, {int(counts.sum())} images)")
    if k <= 30:
        for row in range(k):
            for column in range(k):
                colour = "white" if shares[row, column] > 0.5 else "black"
                axes.text(column, row, str(int(counts[row, column])), ha="center", va="center", color=colour)
    atomic.save_figure(figure, path)
    return path


def top_losses_figure(
    worst: list[dict[str, Any]],
    dataset: Dataset,
    preprocessing: dict[str, Any],
    path: Path,
    title: str | None = None,
    names: tuple[str, str] = ("true", "predicted"),
):
    """The test images with the highest loss, as the model saw them, captioned true / predicted (probability).
    ``title`` and the caption's two ``names`` for other galleries of the same kind (``finetune.label_issues``)."""
    from matplotlib.figure import Figure

    columns = min(COLUMNS, len(worst))
    rows = math.ceil(len(worst) / columns)
    figure = Figure(figsize=(3.0 * columns, 3.4 * rows), dpi=100, layout="constrained")
    mean = torch.tensor(preprocessing.get("mean", IMAGENET_MEAN))[:, None, None]
    std = torch.tensor(preprocessing.get("std", IMAGENET_STD))[:, None, None]
    for position, entry in enumerate(worst):
        axes = figure.add_subplot(rows, columns, position + 1)
        image = dataset[entry["index"]][0]
        if isinstance(image, torch.Tensor) and image.ndim == 3:
            axes.imshow((image.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        name = Path(entry["path"]).name if entry.get("path") else f"#{entry['index']}"
        caption = (
            f"{names[0]}: {entry['true']}\n{names[1]}: {entry['predicted']} ({_fmt(entry['probability'])})\n{name}"
        )
        axes.set_title(caption, fontsize=9)
        axes.set_axis_off()
    losses = f"loss {_fmt(worst[0]['loss'])} down to {_fmt(worst[-1]['loss'])}"
    figure.suptitle(f"{title} ({losses})" if title else f"Highest-loss test images ({losses})")
    atomic.save_figure(figure, path)
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
