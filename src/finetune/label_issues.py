"""Likely mislabelled training images: ``python -m finetune.label_issues [train overrides] [label_issues.folds=5]``.

k-fold cross-validation over ``train/`` (``data.folds``, stratified and seeded as a k-fold run splits it): fold k's
model trains on the other folds for ``trainer.max_epochs`` and predicts fold k, so every training image gets
probabilities from a model that never saw it (no checkpoint is selected on the fold it predicts). Confident learning
(Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021;
:func:`find_label_issues`) then flags the images whose given label the others contradict, and ranks them by
self-confidence, the probability of the given label (lowest first).

The default is the cheap path, ``experiment=frozen features=cached``: each image's features are computed once (a
``features.store`` in the run folder, unless one is given) and each fold trains a head on them in seconds; the
fine-tune recipe works too (``experiment=finetune ~features``, slower). It writes into its own folder,
``logs/label_issues/<date>_<time>_<experiment>/``: ``label_issues.csv`` (path, given label, suggested label,
self-confidence, margin; flagged images, least self-confident first), ``label_issues.json`` (the same, the settings
and the estimated joint of given and true labels), and ``label_issues.png`` (the first ``label_issues.gallery`` of
them, as the model saw them). One process (``trainer.devices=1``).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune import atomic
from finetune.checks import check_int
from finetune.errors import SettingError
from finetune.harness.claim import claim_run_folder
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.figures import top_losses_figure
from finetune.harness.results import write_json_atomic
from finetune.harness.run_settings import check_seed
from finetune.run import CONFIG_DIR, assemble
from finetune.scoring import Scorer

log = logging.getLogger(__name__)
CSV_NAME, JSON_NAME, FIGURE_NAME = "label_issues.csv", "label_issues.json", "label_issues.png"
FEATURE_STORE = "feature_store"  # features=cached without a features.store: kept in the run folder for the folds


def find_label_issues(labels: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Confident learning's label issues (Northcutt et al. 2021, section 3; cleanlab's ``find_label_issues`` with
    ``filter_by="prune_by_noise_rate"``): a boolean mask over the examples.

    1. Per class j, the threshold t_j is the mean probability of j over the examples labelled j.
    2. The confident joint C[i][j] counts the examples labelled i whose probability of j reaches t_j (of several such
       classes, the most probable); calibrated so that row i sums to the n_i examples labelled i.
    3. For every i != j, the C[i][j] examples labelled i with the largest margin p_j - p_i are flagged, except those
       whose given label is also the most probable class.
    """
    labels, probs = labels.long(), probs.double()
    n, k = probs.shape
    counts = torch.bincount(labels, minlength=k).double()
    thresholds = torch.stack([probs[labels == j, j].mean() if counts[j] else torch.tensor(2.0) for j in range(k)])
    confident = probs >= thresholds - 1e-6
    several = confident.sum(dim=1) > 1
    guess = torch.where(several, probs.argmax(dim=1), confident.double().argmax(dim=1))
    joint = torch.zeros(k, k, dtype=torch.double)
    kept = confident.any(dim=1)
    joint.index_put_((labels[kept], guess[kept]), torch.ones(int(kept.sum()), dtype=torch.double), accumulate=True)
    joint.diagonal().clamp_(min=1)
    joint = joint / joint.sum(dim=1, keepdim=True) * counts[:, None]  # rows: the given labels' counts
    joint = joint / joint.sum() * n
    joint = torch.stack([round_preserving_sum(row) for row in joint])
    flagged = torch.zeros(n, dtype=torch.bool)
    for i in range(k):
        members = torch.nonzero(labels == i).flatten()
        if len(members) <= 1:
            continue  # as cleanlab: a class of one image keeps it
        for j in range(k):
            if i != j and joint[i, j] > 0:
                margin = probs[members, j] - probs[members, i]
                order = torch.argsort(-margin, stable=True)
                flagged[members[order[: int(joint[i, j])]]] = True
    bonus = probs.clone()
    bonus[torch.arange(n), labels] += 1e-6
    flagged[bonus.argmax(dim=1) == labels] = False
    return flagged


def round_preserving_sum(row: torch.Tensor) -> torch.Tensor:
    """Round to whole counts keeping the row's (rounded) total: the largest remainders go up first."""
    ints = row.round()
    short = int(round(float(row.sum())) - float(ints.sum()))
    if short:
        order = torch.argsort(row - ints, descending=short > 0, stable=True)[: abs(short)]
        ints[order] += 1 if short > 0 else -1
    return ints


def out_of_fold_probabilities(cfg: DictConfig) -> tuple[torch.Tensor, Any]:
    """Every training image's probabilities from the fold model that did not train on it, and the image data."""
    folds = cfg.label_issues.folds
    probs: torch.Tensor | None = None
    images = None
    for fold in range(folds):
        fold_cfg = fold_config(cfg, fold)
        pl.seed_everything(check_seed(cfg.seed), workers=True)
        run = assemble(fold_cfg)
        if run.trainer.world_size > 1:
            raise SettingError("finetune.label_issues runs in one process: set trainer.devices=1.")
        tell(f"label_issues: fold {fold + 1}/{folds}: training on the other {folds - 1} folds")
        run.trainer.fit(run.model, datamodule=run.datamodule)
        held_out = run.images.split_indices["val"]
        predicted = run.trainer.predict(Scorer(run.model), dataloaders=run.datamodule.val_dataloader())
        fold_probs = torch.cat([p.float().cpu() for p in predicted])
        if probs is None:
            probs = torch.full((len(run.images.train_folder), fold_probs.shape[1]), math.nan)
        probs[torch.tensor(held_out)] = fold_probs
        images = run.images
    if probs is None or bool(torch.isnan(probs).any()):
        raise RuntimeError("some training images got no out-of-fold prediction")
    return probs, images


def fold_config(cfg: DictConfig, fold: int) -> DictConfig:
    """The training config of one fold: fold ``fold`` of ``label_issues.folds`` validates (and is predicted), the
    whole run trains for ``trainer.max_epochs`` without checkpoints or a test."""
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.data.folds, fold_cfg.data.fold = int(cfg.label_issues.folds), fold
        fold_cfg.test_after_fit = False
        (fold_cfg.get("callbacks") or {}).pop("model_checkpoint", None)  # no selection on the fold it predicts
        for node in (fold_cfg.get("logger") or {}).values():
            if node and "version" in node:
                node.version = f"fold{fold}"  # each fold's history its own (the csv logger's csv/fold0/...)
        if fold_cfg.get("features") and fold_cfg.features.get("store") is None:
            fold_cfg.features.store = str(Path(cfg.paths.output_dir) / FEATURE_STORE)  # each image's features once
        fold_cfg.pop("label_issues")
    return fold_cfg


def label_issues(cfg: DictConfig) -> dict[str, Any]:
    """Find the likely label issues of ``cfg``'s training images; write the CSV, JSON and gallery."""
    settings = cfg.label_issues
    check_int("label_issues.folds", settings.folds, 2, "the folds of the cross-validation; 5 is usual")
    check_int("label_issues.gallery", settings.gallery, 0, "images drawn in label_issues.png")
    if cfg.data.get("shots") is not None:
        raise SettingError("finetune.label_issues looks at every training image: leave data.shots null.")
    output_dir = Path(cfg.paths.output_dir)
    claim_run_folder(output_dir)
    probs, images = out_of_fold_probabilities(cfg)
    folder, classes = images.train_folder, list(images.classes)
    labels = torch.tensor(folder.targets)
    flagged = find_label_issues(labels, probs)
    given = probs[torch.arange(len(labels)), labels]
    others = probs.clone()
    others[torch.arange(len(labels)), labels] = -1.0
    rows = []
    for index in sorted(torch.nonzero(flagged).flatten().tolist(), key=lambda i: (float(given[i]), i)):
        suggested = int(others[index].argmax())
        rows.append(
            {
                "index": index,
                "path": str(folder.samples[index][0]),
                "given": classes[int(labels[index])],
                "suggested": classes[suggested],
                "self_confidence": round(float(given[index]), 6),
                "suggested_probability": round(float(probs[index, suggested]), 6),
                "margin": round(float(given[index] - others[index].max()), 6),  # < 0: another class is likelier
            }
        )
    record = {
        "images": len(labels),
        "issues": len(rows),
        "folds": int(settings.folds),
        "experiment": cfg.get("name"),
        "backbone": cfg.model.backbone,
        "out_of_fold_accuracy": float((probs.argmax(dim=1) == labels).double().mean()),
        "classes": classes,
        "label_issues": rows,
    }
    write_json_atomic(output_dir / JSON_NAME, record)
    atomic.write_text(output_dir / CSV_NAME, to_csv(rows))
    figure = gallery(rows[: settings.gallery], folder, images.preprocessing.to_dict(), output_dir / FIGURE_NAME)
    tell(
        f"label_issues: {len(rows)} of {len(labels)} training images look mislabelled (out-of-fold accuracy "
        f"{record['out_of_fold_accuracy']:.3f}); least self-confident first in {output_dir / CSV_NAME}"
        + (f", the first {min(len(rows), settings.gallery)} drawn in {figure}" if figure else "")
    )
    return record


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    fields = ["path", "given", "suggested", "self_confidence", "margin"]
    writer = csv.DictWriter(out, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def gallery(rows: list[dict[str, Any]], folder: Any, preprocessing: dict[str, Any], path: Path) -> Path | None:
    """The flagged images as the model saw them, captioned given / suggested (its probability); ``None`` without
    matplotlib or without images to draw."""
    if not rows:
        return None
    try:
        import matplotlib  # noqa: F401 - the optional figures extra
    except ImportError:
        log.warning("Skipping %s: matplotlib is not installed (pip install 'finetune[figures]').", path.name)
        return None
    entries = [
        {
            "index": row["index"],
            "path": row["path"],
            "true": row["given"],
            "predicted": row["suggested"],
            "probability": row["suggested_probability"],
            "loss": -math.log(max(row["self_confidence"], 1e-12)),
        }
        for row in rows
    ]
    title = f"Likely label issues: {len(rows)} training images, least self-confident first"
    return top_losses_figure(entries, folder, preprocessing, path, title=title, names=("given", "suggested"))


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="label_issues")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    label_issues(cfg)


if __name__ == "__main__":
    main()
