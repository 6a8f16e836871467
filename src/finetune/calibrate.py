"""Fit a checkpoint's temperature on validation: ``python -m finetune.calibrate ckpt_path=CKPT [data overrides]``.

For checkpoints written without ``calibrate=true`` (or a soup). The temperature is fitted on the validation split of
the data settings given (pass the run's, so that it is the run's own validation split), and written with the weights
into ``calibrated.ckpt`` in a new folder, never over the original; ``calibration.json`` says what changed. A
temperature that cannot be trusted (too few validation images, far from 1) is not applied: the copy keeps T = 1 and
both the record (``val/temperature_reliable``, ``val/temperature_reason``) and the printed line say why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from finetune import atomic
from finetune.harness.checkpoint_data import check_classes, use_checkpoint_data, use_checkpoint_geometry
from finetune.harness.checkpoint_io import load_for_inference
from finetune.harness.claim import claim_run_folder
from finetune.harness.config_keys import check_checkpoint_command
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.results import write_json_atomic
from finetune.harness.run_settings import check_seed
from finetune.harness.writable import check_apart
from finetune.run import CONFIG_DIR, assemble
from finetune.temperature import calibrate_checkpoint, temperature_line

CALIBRATED = "calibrated.ckpt"
RECORD = "calibration.json"


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    check_checkpoint_command(cfg, "calibrate")
    pl.seed_everything(check_seed(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = Path(cfg.ckpt_path)
    check_apart(
        {f"paths.output_dir={output_dir} (its {name})": output_dir / name for name in (CALIBRATED, RECORD)},
        {f"ckpt_path={ckpt_path}": ckpt_path},
    )
    claim_run_folder(output_dir)
    model, checkpoint = load_for_inference(ckpt_path)
    use_checkpoint_data(cfg, checkpoint, ckpt_path)  # no data= given: the data it was trained on
    use_checkpoint_geometry(cfg, checkpoint, ckpt_path)
    run = assemble(cfg, model=model)
    run.images.setup("fit")
    check_classes(checkpoint, model, run.images, ckpt_path)
    output = output_dir / CALIBRATED
    record = {"checkpoint": str(ckpt_path), **calibrate_checkpoint(model, run.images, checkpoint)}
    atomic.torch_save(checkpoint, output)
    record["calibrated_checkpoint"] = str(output)
    write_json_atomic(output_dir / RECORD, record)
    tell(f"{temperature_line(record)}. Wrote {output}")
    return record


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="calibrate")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    calibrate(cfg)


if __name__ == "__main__":
    main()
