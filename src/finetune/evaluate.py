"""Test a trained checkpoint: ``python -m finetune.evaluate ckpt_path=PATH [data overrides]``.

The model (backbone, head size, freezing) comes from the checkpoint; the data comes from the config, so pass the
same ``data=...`` overrides the run was trained with. Writes ``eval_results.json`` in the evaluation's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from finetune.module import FineTuneModule
from finetune.results import to_number, write_json_atomic
from finetune.train import CONFIG_DIR, build_datamodule


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(ckpt_path)!r} does not exist. Pass ckpt_path=PATH to a .ckpt written by "
            "finetune.train (a run's checkpoints/ folder holds the best one and last.ckpt)."
        )
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    # weights=None: the checkpoint holds every weight, so do not fetch pretrained ones first.
    model = FineTuneModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights=None)
    if model.hparams.num_classes != datamodule.num_classes:
        raise ValueError(
            f"Checkpoint {str(ckpt_path)!r} predicts {model.hparams.num_classes} classes but the dataset at "
            f"{str(datamodule.root)!r} has {datamodule.num_classes}. Evaluate on the data it was trained for."
        )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False)
    metrics = trainer.test(model, datamodule=datamodule)[0]
    results = {
        "checkpoint": str(ckpt_path),
        "backbone": model.hparams.backbone,
        "classes": datamodule.classes,
        "test/acc": to_number(metrics.get("test/acc")),
        "test/loss": to_number(metrics.get("test/loss")),
        "output_dir": cfg.paths.output_dir,
    }
    if trainer.is_global_zero:
        write_json_atomic(Path(cfg.paths.output_dir) / "eval_results.json", results)
        print(f"{ckpt_path}: test/acc {results['test/acc']:.4f}  test/loss {results['test/loss']:.4f}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
