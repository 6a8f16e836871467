"""Test a trained checkpoint: ``python -m finetune.evaluate ckpt_path=PATH [data overrides]``.

The model (backbone, head size, freezing) comes from the checkpoint, and so do the class names and the eval
preprocessing: a folder whose classes differ from the checkpoint's is refused, and the checkpoint's image and resize
sizes, normalisation and interpolation are used unless ``data.image_size`` / ``data.resize_size`` / ``data.mean`` /
``data.std`` / ``data.interpolation`` are given on the command line. Without ``data=`` or ``data.root=`` on the
command line the data is the checkpoint's own (its recorded ``data.root`` and split settings: its test split); with
them, the folder given. The folder needs only the images it scores, in
``test/<class>/`` or directly in ``<class>/`` (no ``train/``; the train/val ``data.*`` settings are ignored).
Writes ``eval_results.json`` (with the test report's ``test/*`` keys), ``confusion_matrix.png`` and ``top_losses.png``
in the evaluation's folder. A calibrated checkpoint's temperature is applied; ``tta=flip|five_crop|full`` averages
the probabilities of test-time views.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from finetune.data.preprocessing import CLASSES, TTA_MODES, Preprocessing
from finetune.errors import DataError, PathError, SettingError, describe_path
from finetune.harness.checkpoint import load_for_inference
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.overrides import override_keys
from finetune.harness.results import command_line_overrides, to_number, write_json_atomic, write_test_report
from finetune.harness.resume import claim_run_folder, run_cwd
from finetune.harness.run_folder import RunFolder
from finetune.harness.settings import check_checkpoint_command, check_seed
from finetune.run import CONFIG_DIR, assemble

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_checkpoint_command(cfg, "evaluate")
    pl.seed_everything(check_seed(cfg.seed), workers=True)
    claim_run_folder(cfg.paths.output_dir)  # its own new folder, never a training run's
    ckpt_path = Path(cfg.ckpt_path)
    model, checkpoint = load_for_inference(ckpt_path)
    use_checkpoint_data(cfg, checkpoint, ckpt_path)
    use_checkpoint_geometry(cfg, checkpoint, ckpt_path)
    tta = str(cfg.get("tta") or "none")
    if tta not in TTA_MODES:
        raise SettingError(f"Unknown tta={tta!r}: choose one of {TTA_MODES}.")
    run = assemble(cfg, model=model, test_only=True)  # only the images it scores: test/<class>/ or <class>/
    run.images.test_views = tta
    check_classes(checkpoint, model, run.images, ckpt_path)
    trainer = run.trainer
    metrics = trainer.test(model, datamodule=run.datamodule)[0]
    results = {
        "checkpoint": str(ckpt_path),
        "backbone": model.hparams.backbone,
        "classes": run.images.classes,
        "image_size": run.images.hparams.image_size,
        "resize_size": run.images.resize_size,
        "eval_resize": run.images.hparams.eval_resize,
        "tta": tta,
        "temperature": model.temperature,
        "test/acc": to_number(metrics.get("test/acc")),
        "test/loss": to_number(metrics.get("test/loss")),
        **write_test_report(model, run.images, Path(cfg.paths.output_dir), trainer.is_global_zero),
        "output_dir": cfg.paths.output_dir,
    }
    if trainer.is_global_zero:
        written = RunFolder(Path(cfg.paths.output_dir)).eval_results
        write_json_atomic(written, results)
        tell(
            f"{ckpt_path}: test/acc {_fmt(results['test/acc'])}  test/loss {_fmt(results['test/loss'])}\n"
            f"Wrote {written} (and the figures next to it)"  # last: where to look
        )
    return results


# The data settings a checkpoint's run was trained with that say which images it saw and how they were split; used
# when no data setting is given on the command line (sizes and normalisation: use_checkpoint_geometry).
RECORDED_DATA = ("root", "download", "skip_corrupt", "verify_images", "val_fraction", "split_seed", "folds", "fold")


def use_checkpoint_data(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: Path) -> None:
    """Without ``data=`` or ``data.root=`` on the command line, use the data the checkpoint was trained on (its
    recorded ``data.root``, download and split settings) instead of the config's default data set, saying so; other
    ``data.*`` given on the command line still apply.

    A relative recorded root (older checkpoints) is relative to the folder its run started in.
    """
    given = {key.lstrip("+~") for key in override_keys(command_line_overrides())}
    if given & {"data", "data.root"}:
        return
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    if not saved.get("root"):
        log.warning("%s records no data.root: using the config's data (data.root=%s).", ckpt_path, cfg.data.get("root"))
        return
    root = Path(str(saved["root"])).expanduser()
    if not root.is_absolute():
        root = (run_cwd(RunFolder.of_checkpoint(ckpt_path)) or Path.cwd()) / root
    if not root.is_dir() and not saved.get("download"):
        raise PathError(
            f"No data.root given, and the data {str(ckpt_path)!r} was trained on, data.root={root}, is "
            f"{describe_path(root)} now. Pass data=folder data.root=PATH (a folder of test/<class>/ or <class>/)."
        )
    for key in RECORDED_DATA:
        if key in saved and key in cfg.data and f"data.{key}" not in given:
            cfg.data[key] = saved[key]
    cfg.data.root = str(root)
    log.info(
        "No data settings given: using the data %s was trained on (data.root=%s). Pass data=folder data.root=PATH "
        "for other images.",
        ckpt_path,
        root,
    )


def use_checkpoint_geometry(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: Path) -> None:
    """Set ``cfg.data``'s eval preprocessing (sizes, mean, std, interpolation) to the checkpoint's, except those given
    on the command line.

    A new ``data.image_size`` without ``data.resize_size`` keeps the config's resize (null: the backbone's crop
    fraction of the new crop, see ``finetune.run.backbone_preprocessing``), not the checkpoint's, which may be smaller
    than the new crop.
    """
    preprocessing = Preprocessing.from_checkpoint(checkpoint, ckpt_path)
    given = override_keys(command_line_overrides())
    for key in Preprocessing.keys():
        stored = getattr(preprocessing, key)
        stored = list(stored) if isinstance(stored, tuple) else stored
        if f"data.{key}" in given or (key == "resize_size" and "data.image_size" in given):
            if cfg.data.get(key) != stored:
                log.warning("data.%s=%s, not the checkpoint's %s.", key, cfg.data[key], stored)
            continue
        cfg.data[key] = stored


def check_classes(checkpoint: dict[str, Any], model: pl.LightningModule, images: Any, ckpt_path: Path) -> None:
    """Refuse a dataset whose classes (names, in order) are not the ones the checkpoint predicts."""
    found = images.classes if images.num_classes else []  # num_classes reads the class folders
    stored = checkpoint.get(CLASSES)
    if stored and list(stored) != list(found):
        raise DataError(
            f"Checkpoint {str(ckpt_path)!r} predicts the classes {list(stored)}, but the dataset at "
            f"{str(images.root)!r} has {list(found)}. Evaluate on the data it was trained for."
        )
    if model.hparams.num_classes != len(found):
        raise DataError(
            f"Checkpoint {str(ckpt_path)!r} predicts {model.hparams.num_classes} classes but the dataset at "
            f"{str(images.root)!r} has {len(found)}. Evaluate on the data it was trained for."
        )
    if not stored:
        log.warning("%s stores no class names (an older checkpoint): only their number was checked.", ckpt_path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
