"""The layout of a run folder: the only code that spells its file names.

A run (``python -m finetune.train``), a multirun job, an evaluation, a prediction and an export each get a folder of
their own::

    <run>/
      .hydra/overrides.yaml     the command-line overrides (written by Hydra when the run starts)
      results.json              written when the run ends: completed, interrupted or failed
      eval_results.json         written by finetune.evaluate
      confusion_matrix.png      the test report's figures, after every test (train's final test, finetune.evaluate)
      top_losses.png
      predictions.csv           written by finetune.predict (in its own folder)
      model.onnx, model.onnx.json         written by finetune.export (in its own folder), the model and its sidecar
      model.torchscript.pt, model.torchscript.pt.json
      checkpoints/last.ckpt     the end of the latest finished epoch
      checkpoints/interrupted.ckpt   the state at Ctrl+C / SIGTERM / a crash while fitting
      checkpoints/epochNN-val_acc*.ckpt   the best epoch on validation
      .claim                    which process owns the folder (created atomically before anything is written)

Multirun job folders are named ``<job number>_<experiment>_seed<seed>`` (``conf/hydra/default.yaml``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = "results.json"
EVAL_RESULTS = "eval_results.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
INTERRUPTED = "interrupted.ckpt"
HYDRA = ".hydra"
OVERRIDES = "overrides.yaml"
CLAIM = ".claim"
CONFUSION_MATRIX = "confusion_matrix.png"
TOP_LOSSES = "top_losses.png"
PREDICTIONS = "predictions.csv"
EXPORTED_MODELS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
# conf/hydra/default.yaml's hydra.sweep.subdir: ${hydra.job.num}_${name}_seed${seed}
JOB_FOLDER = re.compile(r"^\d+_(?P<experiment>.+)_seed(?P<seed>-?\d+)$")


@dataclass(frozen=True)
class RunFolder:
    """One run's folder and the paths inside it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunFolder:
        """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
        checkpoint = Path(checkpoint)
        parent = checkpoint.parent
        return cls(parent.parent if parent.name == CHECKPOINTS else parent)

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def eval_results(self) -> Path:
        return self.path / EVAL_RESULTS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def interrupted_checkpoint(self) -> Path:
        return self.checkpoints / INTERRUPTED

    @property
    def confusion_matrix(self) -> Path:
        return self.path / CONFUSION_MATRIX

    @property
    def top_losses(self) -> Path:
        return self.path / TOP_LOSSES

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    def exported_model(self, format: str) -> Path:
        return self.path / EXPORTED_MODELS[format]

    @property
    def hydra(self) -> Path:
        return self.path / HYDRA

    @property
    def overrides(self) -> Path:
        return self.hydra / OVERRIDES

    @property
    def claim_file(self) -> Path:
        return self.path / CLAIM

    @staticmethod
    def sidecar(model_file: Path) -> Path:
        """The description written beside an exported model: ``PATH.json``."""
        return model_file.with_name(model_file.name + SIDECAR_SUFFIX)

    def resume_candidates(self) -> list[Path]:
        """Where a resumable state may be, newest kind first (also directly in the folder, for hand-made ones)."""
        return [folder / name for folder in (self.checkpoints, self.path) for name in (INTERRUPTED, LAST)]

    def holds_a_run(self) -> list[str]:
        """What in this folder belongs to a run (its claim, Hydra's record, results, checkpoints); empty if none."""
        found = [p.name for p in (self.claim_file, self.results, self.eval_results) if p.exists()]
        if self.hydra.is_dir():
            found.append(f"{HYDRA}/")
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            found.append(f"{CHECKPOINTS}/")
        return found

    def claim(self) -> None:
        """Make this process the folder's owner, atomically: of two runs started at once, exactly one succeeds.

        Raises ``FileExistsError`` when the folder was claimed before, by any run.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.claim_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as file:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            json.dump(record, file)

    def is_job_folder(self) -> bool:
        """Whether this looks like a run or job folder: Hydra's record of it, or its results."""
        return self.hydra.is_dir() or self.results.is_file()

    def job_name(self) -> tuple[str, int] | None:
        """(experiment, seed) from a multirun job folder's name, or ``None`` for any other name."""
        match = JOB_FOLDER.match(self.path.name)
        return (match["experiment"], int(match["seed"])) if match else None
