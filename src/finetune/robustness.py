"""The shift benchmark: ``python -m finetune.robustness ckpt_path=CKPT [data=folder data.root=PHOTOS]``.

Scores a checkpoint on its clean test split and on shifted copies of it (:mod:`finetune.shifts`: smaller objects
off-centre, other aspects, ImageNet-C-style corruptions), all through the checkpoint's own eval preprocessing, and
writes ``robustness.json``, ``robustness.csv`` and ``robustness.md`` into a new folder. Per set: accuracy, AUROC
(one-vs-rest, averaged over the classes present: for two classes the binary AUROC), ECE (15 bins of the top
probability), NLL, per-class recall and the number of images; then their mean over the shifted sets and the gap,
clean accuracy minus that mean. The shifted folders are cached (``shift_cache``) and reused while the test folder
is unchanged.

Scoring goes through :func:`score`, which only sees a ``logits_fn(images) -> logits``: test-time augmentation or a
temperature plugs in there without changing the benchmark.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from finetune import atomic
from finetune.data import download_and_extract, load_rgb
from finetune.data.loading import resolve_num_workers
from finetune.data.splits import validation_record
from finetune.data.transforms import Preprocessing
from finetune.errors import PathError, SettingError
from finetune.harness.checkpoint_data import check_classes, use_checkpoint_data, use_checkpoint_geometry
from finetune.harness.checkpoint_io import class_names, load_for_inference
from finetune.harness.claim import claim_run_folder
from finetune.harness.config_keys import check_checkpoint_command
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.results import write_json_atomic
from finetune.harness.run_settings import check_seed
from finetune.harness.writable import check_apart
from finetune.metrics import TestMetrics
from finetune.run import CONFIG_DIR
from finetune.scoring import TEMPERATURE, Scorer
from finetune.shifts import SHIFTS, check_shift, make_shifted_folder, shifted_bytes, source_images
from finetune.tta import TTA_MODES, views_transform
from finetune.workers import ordered_loader

log = logging.getLogger(__name__)

CLEAN = "clean"
MEAN = "mean_over_shifts"
METRICS = ("acc", "auroc", "ece", "nll")  # per set, besides per-class recall and n
RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "robustness.json", "robustness.csv", "robustness.md"
DEVICES = ("auto", "cpu", "cuda", "mps")

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


# --- settings -----------------------------------------------------------------------------------------------------


def shift_sets(shifts: Any, severities: Any) -> list[tuple[str, int]]:
    """``(shift, severity)`` of every shifted set: ``shifts`` (null: all) x ``severities`` (null: each shift's own)."""
    names = list(SHIFTS) if shifts is None else [shifts] if isinstance(shifts, str) else shifts
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise SettingError(f"shifts must be a list of shift names (or null: all of {list(SHIFTS)}), got {shifts!r}.")
    if severities is not None:
        severities = [severities] if isinstance(severities, int) else severities
        if not isinstance(severities, Sequence) or isinstance(severities, str) or not severities:
            raise SettingError(
                f"severities must be a list such as [1, 2, 3] (or null: each shift's own), got {severities!r}."
            )
    sets = []
    for name in dict.fromkeys(names):  # a name given twice counts once
        own = SHIFTS[name].severities if name in SHIFTS else (1,)  # an unknown name is refused by check_shift
        for severity in own if severities is None else severities:
            check_shift(name, severity)
            sets.append((name, int(severity)))
    return list(dict.fromkeys(sets))


def default_cache(data_dir: str | Path, split_dir: Path) -> Path:
    """``<data_dir>/shifts/<folder>-<split>-<digest of its absolute path>``: one cache per test folder."""
    resolved = split_dir.resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return Path(data_dir) / "shifts" / f"{resolved.parent.name}-{resolved.name}-{digest}"


def resolve_device(setting: str) -> torch.device:
    if setting not in DEVICES:
        raise SettingError(f"device={setting!r} is not one of {DEVICES}.")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise SettingError("device=cuda but torch sees no CUDA device: use device=cpu (or auto).")
    return torch.device(setting)


# --- scoring ------------------------------------------------------------------------------------------------------


def model_logits(model: torch.nn.Module, device: torch.device) -> LogitsFn:
    """``images -> logits`` of ``model`` on ``device`` (eval mode, no gradients), returned on the CPU as floats."""
    model = model.to(device).eval()

    @torch.no_grad()
    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(device, non_blocking=True)).float().cpu()

    return logits_fn


def collect(logits_fn: LogitsFn, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's logits and true class, in loader order."""
    logits, targets = [], []
    for images, labels in loader:
        logits.append(logits_fn(images).float())
        targets.append(labels.long())
    if not logits:
        raise PathError("The image folder to score holds no images.")
    return torch.cat(logits), torch.cat(targets)


def metrics_of(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, AUROC, ECE, NLL, per-class recall and n of one set's logits (``finetune.metrics``' definitions)."""
    report = TestMetrics(len(classes))
    report.update(logits, targets, torch.arange(len(targets)))
    computed = report.compute()
    confusion = computed["confusion"]
    support = computed["support"]
    return {
        "n": int(len(targets)),
        "acc": _number(confusion.diagonal().sum() / confusion.sum()),
        "auroc": _number(computed["auroc"]),
        "ece": _number(computed["ece"]),
        "nll": _number(F.cross_entropy(logits.float(), targets, reduction="mean")),
        "recall": {
            name: (_number(computed["recall"][i]) if support[i] > 0 else None) for i, name in enumerate(classes)
        },
    }


def score(logits_fn: LogitsFn, dataset: Dataset, classes: Sequence[str], batch_size: int, num_workers: int) -> dict:
    """:func:`metrics_of` one dataset of ``(image, class)`` pairs, scored by ``logits_fn``."""
    loader = ordered_loader(dataset, batch_size, num_workers)
    return metrics_of(*collect(logits_fn, loader), classes)


def summarise(sets: dict[str, dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """The mean of every metric over the shifted sets (each shift and severity weighs the same), and the gap."""
    shifted = [record for name, record in sets.items() if name != CLEAN]
    mean = {key: _mean([record[key] for record in shifted]) for key in METRICS}
    mean["recall"] = {name: _mean([record["recall"][name] for record in shifted]) for name in classes}
    mean["n"] = sum(record["n"] for record in shifted)
    clean_acc = sets[CLEAN]["acc"]
    gap = None if clean_acc is None or mean["acc"] is None else clean_acc - mean["acc"]
    by_shift: dict[str, dict[str, float | None]] = {}
    for record in shifted:
        by_shift.setdefault(record["shift"], {})
    for shift in by_shift:
        records = [record for record in shifted if record["shift"] == shift]
        by_shift[shift] = {key: _mean([record[key] for record in records]) for key in METRICS}
    return {MEAN: mean, "gap": gap, "mean_by_shift": by_shift}


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --- the entry point ----------------------------------------------------------------------------------------------


def robustness(cfg: DictConfig, logits_fn: LogitsFn | None = None) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` on the clean test split and every shifted copy; write and return the record.

    ``logits_fn``: what scores the images (default: the checkpoint's model on ``cfg.device``).
    """
    check_checkpoint_command(cfg, "robustness")
    sets_asked = shift_sets(OmegaConf.select(cfg, "shifts"), OmegaConf.select(cfg, "severities"))
    seed = cfg.get("shift_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SettingError(f"shift_seed must be an integer, got {seed!r}.")
    device = resolve_device(str(cfg.get("device", "auto")))
    pl.seed_everything(check_seed(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = Path(cfg.ckpt_path)
    model, checkpoint = load_for_inference(ckpt_path)
    use_checkpoint_data(cfg, checkpoint, ckpt_path)  # no data= given: the data it was trained on
    use_checkpoint_geometry(cfg, checkpoint, ckpt_path)
    data = cfg.data
    root = Path(data.root)
    split_dir = root / str(cfg.get("split", "test"))
    cache = Path(cfg.shift_cache) if cfg.get("shift_cache") else default_cache(cfg.paths.data_dir, split_dir)
    check_apart(  # before the claim creates the run folder: it must not appear inside the images scored either
        {f"paths.output_dir={output_dir}": output_dir, f"shift_cache={cache}": cache},
        {f"data.root={root} (its {split_dir.name}/)": split_dir},
    )
    claim_run_folder(output_dir)  # its own new folder, never a training run's
    preprocessing = Preprocessing.of(
        data.image_size,
        data.resize_size,
        mean=data.mean,
        std=data.std,
        interpolation=data.interpolation,
        eval_resize=data.eval_resize,
    )
    tta = str(cfg.get("tta") or "none")
    if tta not in TTA_MODES:
        raise SettingError(f"Unknown tta={tta!r}: choose one of {TTA_MODES}.")
    transform = views_transform(preprocessing, tta) or preprocessing.transform()
    if data.get("download"):
        download_and_extract(data.download["url"], data.download["sha1"], root)
    if not split_dir.is_dir():
        raise PathError(
            f"{str(split_dir)!r} does not exist: data.root must be a folder holding {split_dir.name}/<class>/ image "
            "folders (set data.root, or split=...)."
        )
    source_images(split_dir)  # a folder without class folders, or a class without images, is refused by name
    clean = ImageFolder(str(split_dir), transform, loader=load_rgb)
    classes = class_names(checkpoint, model.hparams.num_classes, ckpt_path)
    found = SimpleNamespace(classes=clean.classes, num_classes=len(clean.classes), root=split_dir)
    check_classes(checkpoint, model, found, ckpt_path)
    workers = resolve_num_workers(data.num_workers)
    folders = {}
    for shift, severity in sets_asked:
        start = time.perf_counter()
        folders[f"{shift}-{severity}"] = make_shifted_folder(split_dir, shift, severity, seed, cache, max(1, workers))
        log.info("%s-%d: %s (%.1f s)", shift, severity, folders[f"{shift}-{severity}"], time.perf_counter() - start)
    cache_bytes = sum(shifted_bytes(folder) for folder in folders.values())
    log.info(
        "The %d shifted set(s) take %s in %s (full-size lossless PNG, reused by every benchmark of this folder; "
        "delete it to free the space, it is rebuilt when needed).",
        len(folders),
        _size(cache_bytes),
        cache,
    )
    scorer = Scorer(model, checkpoint.get(TEMPERATURE, 1.0))
    logits_fn = logits_fn or model_logits(scorer, device)
    sets: dict[str, dict[str, Any]] = {}
    datasets = {CLEAN: clean, **{n: ImageFolder(str(f), transform, loader=load_rgb) for n, f in folders.items()}}
    for number, (name, dataset) in enumerate(datasets.items(), start=1):
        if dataset.classes != clean.classes:  # a cache folder changed by hand
            raise PathError(f"{dataset.root!r} has the classes {dataset.classes}, not {clean.classes}: delete it.")
        start = time.perf_counter()
        record = score(logits_fn, dataset, classes, int(data.batch_size), workers)
        # One line per set: scoring 22 sets of 500 photos takes most of an hour on a small CPU.
        elapsed = time.perf_counter() - start
        log.info("scored %s (%d/%d): accuracy %.3f (%.1f s)", name, number, len(datasets), record["acc"], elapsed)
        shift, _, severity = name.rpartition("-")
        extra = {} if name == CLEAN else {"shift": shift, "severity": int(severity)}
        sets[name] = {**extra, **record, "folder": str(dataset.root)}
    results = {
        "checkpoint": str(ckpt_path),
        "backbone": model.hparams.get("backbone"),
        "classes": classes,
        "preprocessing": preprocessing.to_dict(),
        "tta": tta,
        "temperature": scorer.temperature,
        "source": str(split_dir),
        # A copy of a validation split (scripts/val_split_folder.py) says so: a recipe may be chosen on this record.
        "validation_split": validation_record(root),
        "shift_seed": seed,
        "shift_cache": str(cache),
        "shift_cache_bytes": cache_bytes,  # the shifted images of the sets scored
        "sets": sets,
        **summarise(sets, classes),
        "output_dir": str(output_dir),
    }
    written = write_results(results, output_dir)
    tell(f"{to_markdown(results)}Wrote {', '.join(str(p) for p in written)}")
    return results


# --- the tables ---------------------------------------------------------------------------------------------------


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per set, then the mean over the shifted sets: ``set, shift, severity, n``, the metrics, recalls."""
    rows = []
    named = [*results["sets"].items(), (MEAN, results[MEAN])]
    for name, record in named:
        row = {"set": name, "shift": record.get("shift", ""), "severity": record.get("severity", ""), "n": record["n"]}
        row.update({key: record[key] for key in METRICS})
        row.update({f"recall/{c}": record["recall"][c] for c in results["classes"]})
        rows.append(row)
    return rows


def to_csv(results: dict[str, Any]) -> str:
    rows = table_rows(results)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: "" if v is None else (repr(round(v, 6)) if isinstance(v, float) else v) for k, v in row.items()}
        )
    return out.getvalue()


def to_markdown(results: dict[str, Any]) -> str:
    """The table a person reads: one line per set, the mean over shifts, the gap, what was scored."""
    rows = table_rows(results)
    columns = ["set", "n", *METRICS, *(f"recall/{c}" for c in results["classes"])]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [str(row["set"]), str(row["n"])] + [_cell(row[c]) for c in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    gap = results["gap"]
    record = results.get("validation_split")
    copy = f" (a copy of the validation split of {record.get('data_root')})" if record else ""
    lines += [
        "",
        f"Gap (clean acc - mean acc over the {len(results['sets']) - 1} shifted sets): {_cell(gap)}.",
        f"Checkpoint {results['checkpoint']}; test folder {results['source']}{copy}; shift seed "
        f"{results['shift_seed']}. "
        "AUROC one-vs-rest (binary for two classes), ECE over 15 bins of the top probability, NLL in nats.",
    ]
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_results(results: dict[str, Any], output_dir: Path) -> list[Path]:
    paths = [output_dir / RESULTS_JSON, output_dir / RESULTS_CSV, output_dir / RESULTS_MD]
    write_json_atomic(paths[0], results)
    for path, text in zip(paths[1:], (to_csv(results), to_markdown(results)), strict=True):
        atomic.write_text(path, text)
    return paths


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="robustness")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    robustness(cfg)


if __name__ == "__main__":
    main()
