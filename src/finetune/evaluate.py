"""Test a trained checkpoint: ``python -m finetune.evaluate ckpt_path=PATH [data overrides]``.

The model (backbone, head size, freezing) comes from the checkpoint; the data comes from the config, so pass the
same ``data=...`` overrides the run was trained with. Writes ``eval_results.json`` in the evaluation's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from finetune.module import FineTuneModule
from finetune.quiet import quiet_known_warnings
from finetune.results import to_number, write_json_atomic
from finetune.run import CONFIG_DIR, assemble
from finetune.run_folder import RunFolder


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    quiet_known_warnings()
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(ckpt_path)!r} does not exist. Pass ckpt_path=PATH to a .ckpt written by "
            "finetune.train (a run's checkpoints/ folder holds the best one and last.ckpt)."
        )
    # weights=None: the checkpoint holds every weight, so do not fetch pretrained ones first. A model trained on
    # cached features (cache_features=true) is evaluated on images: its frozen backbone is in the checkpoint.
    model = FineTuneModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights=None, cache_features=False)
    run = assemble(cfg, model=model)
    if model.hparams.num_classes != run.images.num_classes:
        raise ValueError(
            f"Checkpoint {str(ckpt_path)!r} predicts {model.hparams.num_classes} classes but the dataset at "
            f"{str(run.images.root)!r} has {run.images.num_classes}. Evaluate on the data it was trained for."
        )
    trainer = run.trainer
    metrics = trainer.test(model, datamodule=run.datamodule)[0]
    results = {
        "checkpoint": str(ckpt_path),
        "backbone": model.hparams.backbone,
        "classes": run.images.classes,
        "test/acc": to_number(metrics.get("test/acc")),
        "test/loss": to_number(metrics.get("test/loss")),
        "output_dir": cfg.paths.output_dir,
    }
    if trainer.is_global_zero:
        write_json_atomic(RunFolder(Path(cfg.paths.output_dir)).eval_results, results)
        print(f"{ckpt_path}: test/acc {results['test/acc']:.4f}  test/loss {results['test/loss']:.4f}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
