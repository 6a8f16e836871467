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
      checkpoints/zero_shot.ckpt   a zero-shot run's model (trainer.max_epochs=0 with model.head_init.from=source)
      .claim                    which process owns the folder (created atomically before anything is written)

Multirun job folders are named ``<job number>_<experiment>_seed<seed>`` (``conf/hydra/default.yaml``).

A single command refused before it did any work (a wrong setting, file or folder: one ``Error:`` line) leaves no
folder behind: :func:`release_unstarted` takes back what it wrote at its start (``.claim``, ``.hydra/``, its log and
a ``results.json`` saying it failed before its first epoch) and the folder itself if the claim made it. A folder
holding anything else (a checkpoint, a figure, a logger's files, a trained epoch) is left as it is, and so is every
folder once training has started (:func:`keep_claimed`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = "results.json"
EVAL_RESULTS = "eval_results.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
INTERRUPTED = "interrupted.ckpt"
ZERO_SHOT = "zero_shot.ckpt"
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
LOG_SUFFIX = ".log"  # Hydra's job log: train.log, evaluate.log, ...


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
    def zero_shot_checkpoint(self) -> Path:
        return self.checkpoints / ZERO_SHOT

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
        made = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        before = frozenset(os.listdir(self.path))
        fd = os.open(self.claim_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as file:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            json.dump(record, file)
        _CLAIMS.append(_Claim(self, made, before))

    def is_job_folder(self) -> bool:
        """Whether this looks like a run or job folder: Hydra's record of it, or its results."""
        return self.hydra.is_dir() or self.results.is_file()

    def job_name(self) -> tuple[str, int] | None:
        """(experiment, seed) from a multirun job folder's name, or ``None`` for any other name."""
        match = JOB_FOLDER.match(self.path.name)
        return (match["experiment"], int(match["seed"])) if match else None


@dataclass(frozen=True)
class _Claim:
    """A folder this process claimed: whether the claim made it, and what it held before."""

    folder: RunFolder
    made: bool
    before: frozenset[str]


_CLAIMS: list[_Claim] = []  # in claim order; release_unstarted() empties it


def keep_claimed() -> None:
    """From here on the command does work worth its folder (``finetune.train``: training starts): a failure no
    longer takes back the folders it claimed, whatever they hold (a diverged first epoch leaves no checkpoint)."""
    _CLAIMS.clear()


def release_unstarted() -> list[Path]:
    """Take back the folders this process claimed whose new contents are only what a command writes at its start:
    its ``.claim``, Hydra's ``.hydra/*.yaml``, its log, and a ``results.json`` of a run that failed before its first
    epoch. Those entries go (the log file's handler is closed first), and the folder too when the claim made it and
    nothing else is left; a folder the user made is left as it was before the command. Any other new entry (a
    checkpoint, a figure, a logger's folder) keeps the folder whole. Returns the folders removed or restored.

    For a single command refused before it started work (:func:`finetune.harness.exits.user_errors`), never for a
    multirun job: a sweep keeps every job's record.
    """
    released = []
    while _CLAIMS:
        claim = _CLAIMS.pop()
        path = claim.folder.path
        try:
            new = sorted(set(os.listdir(path)) - claim.before)
        except OSError:
            continue
        if CLAIM not in new or not all(_written_at_start(path / name) for name in new):
            continue
        _close_log_files(path)
        for name in new:
            entry = path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if claim.made:
            try:
                path.rmdir()  # only if empty: nothing else appeared meanwhile
            except OSError:
                pass
        released.append(path)
    return released


def _written_at_start(entry: Path) -> bool:
    """Whether ``entry`` of a run folder is one a command writes before it does any work."""
    if entry.is_symlink():
        return False
    if entry.name == CLAIM or (entry.name.endswith(LOG_SUFFIX) and entry.is_file()):
        return entry.is_file()
    if entry.name == HYDRA and entry.is_dir():
        return all(p.is_file() and p.suffix == ".yaml" for p in entry.iterdir())
    if entry.name == RESULTS and entry.is_file():
        try:
            record = json.loads(entry.read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(record, dict)
            and record.get("status") == "failed"
            and not record.get("history")
            and not record.get("best_checkpoint")
            and not record.get("last_checkpoint")
        )
    return False


def _close_log_files(folder: Path) -> None:
    """Close and detach the root logger's file handlers that write into ``folder`` (Hydra's job log)."""
    root, folder = logging.getLogger(), Path(os.path.abspath(folder))
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            root.removeHandler(handler)
            handler.close()
