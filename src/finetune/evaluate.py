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

from finetune.errors import SettingError
from finetune.harness.checkpoint_data import check_classes, use_checkpoint_data, use_checkpoint_geometry
from finetune.harness.checkpoint_io import load_for_inference
from finetune.harness.claim import claim_run_folder
from finetune.harness.config_keys import check_checkpoint_command
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.results import to_number, write_json_atomic, write_test_report
from finetune.harness.run_folder import RunFolder
from finetune.harness.run_settings import check_seed
from finetune.run import CONFIG_DIR, assemble
from finetune.scoring import TEMPERATURE, Scorer
from finetune.tta import TTA_MODES, views_transform

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
    run.images.test_transform = views_transform(run.images.preprocessing, tta)
    check_classes(checkpoint, model, run.images, ckpt_path)
    trainer = run.trainer
    scorer = Scorer(model, checkpoint.get(TEMPERATURE, 1.0))
    metrics = trainer.test(scorer, datamodule=run.datamodule)[0]
    results = {
        "checkpoint": str(ckpt_path),
        "backbone": model.hparams.backbone,
        "classes": run.images.classes,
        "image_size": run.images.preprocessing.image_size,
        "resize_size": run.images.resize_size,
        "eval_resize": run.images.hparams.eval_resize,
        "tta": tta,
        "temperature": scorer.temperature,
        "test/acc": to_number(metrics.get("test/acc")),
        "test/loss": to_number(metrics.get("test/loss")),
        **write_test_report(scorer, run.images, Path(cfg.paths.output_dir), trainer.is_global_zero),
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
