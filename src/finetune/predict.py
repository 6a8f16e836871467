"""Predict on new images: ``python -m finetune.predict ckpt_path=CKPT inputs=PATH`` (or ``finetune-predict``).

``inputs`` is an image file, a folder (searched recursively for images) or a glob (``'photos/**/*.jpg'``). Writes
``predictions.csv`` in a new folder (like a training run's), or ``output=FILE.csv|FILE.json``: one row per input, in
input order, with ``path``, ``label`` (the class name), ``score`` (its probability), one probability column per class
(named after it) and ``error`` (empty, or why that file could not be read). The images go through the checkpoint's
own eval preprocessing, so a photo gets the probabilities ``finetune.evaluate`` computes for it (divided by the
checkpoint's temperature, when it was calibrated). ``tta=flip|five_crop|full`` averages the probabilities of
test-time views of each image (:mod:`finetune.tta`), as ``finetune.evaluate tta=...``
does. Any ``trainer.*`` flag applies; on several devices
each input is predicted once (unpadded shards) and the rows are gathered back into input order.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune import atomic
from finetune.data import is_image_file, load_rgb
from finetune.data.images import preview
from finetune.errors import DataError, OverwriteError, PathError, SettingError
from finetune.harness.checkpoint_io import class_names, load_for_inference, preprocessing
from finetune.harness.config_keys import check_checkpoint_command, check_node_keys
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.run_folder import RunFolder
from finetune.harness.writable import check_apart, check_writable
from finetune.run import CONFIG_DIR, build_trainer
from finetune.scoring import TEMPERATURE, Scorer
from finetune.tta import TTA_MODES, views_transform
from finetune.workers import worker_context

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".json")
FIXED_COLUMNS = ("path", "label", "score")


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict every input; the rows written (on rank 0; other ranks return an empty list)."""
    check_checkpoint_command(cfg, "predict", unused=("model", "optimizer", "scheduler", "data"))
    check_node_keys("trainer", OmegaConf.to_container(cfg.trainer, resolve=False))
    tta = str(cfg.get("tta") or "none")
    if tta not in TTA_MODES:
        raise SettingError(
            f"Unknown tta={tta!r}: choose one of {TTA_MODES} (flip: with the mirror image; five_crop: corners and "
            "centre; full: the centre crop and the whole photo letterboxed, each with its mirror image)."
        )
    inputs = find_inputs(str(cfg.inputs))
    folder = Path(str(cfg.inputs)).expanduser()
    # Checked before predicting anything: an output over an input, an existing output or a read-only folder is
    # said at once, not after the work.
    output = output_path(cfg, {f"inputs={cfg.inputs}": folder if folder.is_dir() else inputs})
    check_writable(output.parent, *(("output", output) if cfg.get("output") else ("paths.output_dir",)))
    model, checkpoint = load_for_inference(cfg.ckpt_path)
    classes = class_names(checkpoint, model.hparams.num_classes, cfg.ckpt_path)
    eval_preprocessing = preprocessing(checkpoint, cfg.ckpt_path)
    transform = views_transform(eval_preprocessing, tta) or eval_preprocessing.transform()
    data = PredictData(ImageFiles(inputs, transform), cfg.batch_size, cfg.num_workers)
    trainer = build_trainer(cfg)
    scorer = Scorer(model, checkpoint.get(TEMPERATURE, 1.0))
    outputs = trainer.predict(Predictor(scorer), datamodule=data, return_predictions=True) or []
    results = gather(outputs, len(inputs))
    if not trainer.is_global_zero:
        return []
    rows = [row(inputs[i], classes, probs, error) for i, (probs, error) in enumerate(results)]
    write_rows(rows, table_columns(classes), output)
    failed = [r for r in rows if r["error"]]
    if failed:
        log.warning(
            "%d of %d input(s) could not be read (listed with an error in %s), e.g. %s: %s",
            len(failed),
            len(rows),
            output,
            failed[0]["path"],
            failed[0]["error"],
        )
    if len(failed) == len(rows):
        raise DataError(f"None of the {len(rows)} input(s) could be predicted: every one failed to load ({output}).")
    tell(f"Predicted {len(rows) - len(failed)} image(s) with {cfg.ckpt_path}: {output}")
    return rows


def output_path(cfg: DictConfig, inputs: dict[str, Any] | None = None) -> Path:
    """Where the predictions go: never over ``inputs`` (or ``ckpt_path``) nor inside an input folder
    (:func:`~finetune.harness.writable.check_apart`); an existing file is only replaced with ``overwrite=true``."""
    output = Path(cfg.output) if cfg.get("output") else RunFolder(Path(cfg.paths.output_dir)).predictions
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise SettingError(f"output={output}: the file must end in .csv or .json (that chooses the format).")
    named = f"output={output}" if cfg.get("output") else f"the predictions file {output}"
    check_apart({named: output}, {**(inputs or {}), f"ckpt_path={cfg.ckpt_path}": cfg.ckpt_path})
    if output.is_dir():
        raise PathError(f"output={output} is a folder: pass a file, e.g. output={output / 'predictions.csv'}.")
    if output.exists() and not cfg.get("overwrite", False) and os.environ.get("LOCAL_RANK", "0") == "0":
        raise OverwriteError(f"output={output} already exists: pass overwrite=true to replace it, or another file.")
    return output


def find_inputs(spec: str) -> list[str]:
    """The image files ``inputs=`` names, in a stable order: one file, a folder's images (recursive), or a glob.

    Images are recognised by extension, as training recognises them (:func:`finetune.data.is_image_file`): the
    other files of a folder or a glob get no row, and are named in a warning; a single file of another type is an
    error.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        if not is_image_file(path.name):
            raise SettingError(
                f"inputs={spec}: not an image file that finetune reads (files ending in {', '.join(IMG_EXTENSIONS)}, "
                "as in training). Convert it to one of those (e.g. PNG or JPEG), or pass a folder or a glob of images."
            )
        return [str(path)]
    if path.is_dir():
        files = [
            os.path.join(folder, name)
            for folder, _, names in sorted(os.walk(path, followlinks=True))
            for name in sorted(names)
        ]
        found, skipped = _images_and_others(files)
        if not found:
            raise SettingError(
                f"inputs={spec}: the folder holds no images (files ending in {', '.join(IMG_EXTENSIONS)}); it holds "
                f"{preview([os.path.relpath(f, path) for f in skipped])}."
            )
    elif glob.has_magic(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        found, skipped = _images_and_others([m for m in matches if os.path.isfile(m)])
        if not found:
            raise PathError(f"inputs={spec}: the pattern matches no image files ({len(matches)} match(es)).")
    else:
        raise PathError(f"inputs={spec}: no such file or folder (pass an image, a folder of images, or a glob).")
    if skipped:
        log.warning(
            "Skipping %d file(s) of inputs=%s that are not images (by extension: %s), with no row in the "
            "predictions: %s",
            len(skipped),
            spec,
            ", ".join(IMG_EXTENSIONS),
            preview(skipped),
        )
    return found


def _images_and_others(files: list[str]) -> tuple[list[str], list[str]]:
    """``files`` split into images (by extension) and the rest, each in the given order."""
    return [f for f in files if is_image_file(f)], [f for f in files if not is_image_file(f)]


class ImageFiles(Dataset):
    """``{"image", "index", "error"}`` per file: an unreadable file gives a blank image and the reason."""

    def __init__(self, paths: list[str], transform: Any) -> None:
        self.paths = paths
        self.transform = transform
        self.blank = transform(Image.new("RGB", (8, 8)))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, error = self.transform(load_rgb(self.paths[index])), ""  # the datamodule's own image loader
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for bad files; report, don't stop
            image, error = torch.zeros_like(self.blank), f"{type(err).__name__}: {err}"
        return {"image": image, "index": index, "error": error}


class PredictData(pl.LightningDataModule):
    """One loader over the inputs; under DDP each rank gets its own unpadded shard (every input exactly once)."""

    def __init__(self, dataset: ImageFiles, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = None
        if shards and shards.get("num_replicas", 1) > 1:
            sampler = UnrepeatedDistributedSampler(self.dataset, shuffle=False, **shards)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=worker_context(self.num_workers),
        )


class Predictor(pl.LightningModule):
    """Softmax probabilities of a :class:`~finetune.scoring.Scorer` (averaged over test-time views, when the inputs
    are ``NVCHW``)."""

    def __init__(self, model: pl.LightningModule) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float().softmax(dim=-1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"index": batch["index"].cpu(), "probs": self(batch["image"]).cpu(), "error": list(batch["error"])}


def gather(outputs: list[dict[str, Any]], count: int) -> list[tuple[list[float] | None, str]]:
    """``(probabilities or None, error)`` per input, in input order, from every rank's batches."""
    local = [
        (int(index), None if error else probs.tolist(), error)
        for batch in outputs
        for index, probs, error in zip(batch["index"], batch["probs"], batch["error"], strict=True)
    ]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        local = [entry for part in everyone for entry in part]
    local.sort(key=lambda entry: entry[0])
    indices = [entry[0] for entry in local]
    if indices != list(range(count)):
        raise RuntimeError(f"Predicted {len(indices)} rows for {count} inputs: some were predicted twice or never.")
    return [(probs, error) for _, probs, error in local]


def table_columns(classes: list[str]) -> list[str]:
    """``path, label, score``, one column per class (named after it), ``error``."""
    columns = [*FIXED_COLUMNS, *classes, "error"]
    if len(set(columns)) != len(columns):
        raise SettingError(f"Class names {classes} clash with the columns {FIXED_COLUMNS + ('error',)} or repeat.")
    return columns


def row(path: str, classes: list[str], probs: list[float] | None, error: str) -> dict[str, Any]:
    if probs is None:
        return {"path": path, "label": None, "score": None, **dict.fromkeys(classes), "error": error}
    best = max(range(len(probs)), key=probs.__getitem__)
    by_class = dict(zip(classes, probs, strict=True))
    return {"path": path, "label": classes[best], "score": probs[best], **by_class, "error": ""}


def write_rows(rows: list[dict[str, Any]], columns: list[str], output: Path) -> None:
    """``.csv`` (empty cells for missing values) or ``.json`` (a list of objects), whole or not at all."""
    with atomic.atomic_write(output, "w", newline="", encoding="utf-8") as file:
        if output.suffix.lower() == ".json":
            json.dump([{c: r[c] for c in columns} for r in rows], file, indent=1)
            file.write("\n")
        else:
            writer = csv.writer(file)
            writer.writerow(columns)
            for r in rows:
                writer.writerow(
                    ["" if r[c] is None else (f"{r[c]:.8g}" if isinstance(r[c], float) else r[c]) for c in columns]
                )


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
