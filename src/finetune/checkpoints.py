"""Checkpoints that a run can be continued from: after an interruption, into a new folder, with the same result.

- ``ResumableModelCheckpoint``: Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` after every epoch (2.6
  only does when the best one changes) and keeps its best-so-far when a resumed run writes to a new folder
  (Lightning forgets it when the folder changes); the earlier run's files are never deleted.
- ``InterruptCheckpoint``: Ctrl+C, SIGTERM (Lightning stops at the end of the batch) or a crash while fitting
  saves ``checkpoints/interrupted.ckpt``.
- ``RngState``: the random generators travel in every checkpoint (Lightning does not save them), so that one epoch
  plus a resumed epoch draws the same shuffles and augmentations as two epochs straight.
- ``find_checkpoint``, ``with_run_overrides``, ``check_resumable``: what ``resume=RUN_DIR`` means.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # checkpoints/interrupted.ckpt
# Overrides of the earlier run that a resumed run must not inherit: where it writes, and what it resumes from.
_NOT_INHERITED = {"resume", "ckpt_path", "paths.output_dir", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"}


class ResumableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with an up-to-date ``last.ckpt`` and a ranking that survives a resume into a new folder.

    Lightning keeps only ``best_model_path`` when the checkpoint folder changed, so the resumed run would call its
    first epoch "best" even when the earlier run did better. Here the earlier scores stay in the ranking; files
    outside this run's folder are never deleted (Lightning's own ``_should_remove_checkpoint`` rule).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        # Lightning 2.6 writes last.ckpt only when a top-k checkpoint is saved at the same step, so with save_top_k=1
        # last.ckpt is a copy of the best one; resuming needs the latest epoch.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Saves ``interrupted.ckpt`` when fitting stops on an exception, once training has made progress.

    A failure to save is logged, never raised: it must not hide the error that stopped the run.
    """

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__(str(dirpath), filename=INTERRUPTED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # nothing trained yet (or interrupted while testing): last.ckpt, if any, is the state to keep
        try:
            trainer.save_checkpoint(self.ckpt_path)
            log.warning("Fitting stopped (%s): saved %s", type(exception).__name__, self.ckpt_path)
        except Exception as err:  # noqa: BLE001 - keep the original exception visible
            log.error("Could not save %s after %s: %s", self.ckpt_path, type(exception).__name__, err)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pass  # Lightning's version deletes the file at the end of every fit/test; we never delete a checkpoint


class RngState(pl.Callback):
    """Saves the torch, numpy and python random generators in each checkpoint and restores them on resume.

    Restored when the checkpoint is loaded, i.e. before the resumed run creates its first data-loader iterator,
    the same point at which the uninterrupted run goes on drawing. Under several processes only rank 0's state is
    in the checkpoint, so there each rank keeps its freshly seeded generators instead.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                log.info("Several processes: random generators are seeded afresh, not restored from the checkpoint.")
                return
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def find_checkpoint(resume: str | Path) -> Path:
    """The checkpoint that ``resume=`` names: a ``.ckpt`` file, or a run folder's latest checkpoint.

    In a run folder that is ``checkpoints/interrupted.ckpt`` (written only when the run was stopped, so always the
    newest state) or else ``checkpoints/last.ckpt`` (the end of the last finished epoch).
    """
    path = Path(resume)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume={resume}: no such run folder or checkpoint file. Pass a run's folder (logs/runs/<...>, or a "
            "multirun job's folder) or one of its checkpoints/*.ckpt files."
        )
    for folder in (path / "checkpoints", path):
        for name in (f"{INTERRUPTED}.ckpt", "last.ckpt"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"resume={resume}: the folder holds no checkpoints/{INTERRUPTED}.ckpt or checkpoints/last.ckpt (the run "
        f"stopped before its first checkpoint, or this is not a run folder; it holds "
        f"{sorted(p.name for p in path.iterdir())}). Start that run again instead of resuming it."
    )


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def with_run_overrides(argv: list[str]) -> list[str]:
    """``resume=RUN`` on the command line brings back that run's own overrides (``RUN/.hydra/overrides.yaml``).

    Overrides given now win over the saved ones (``resume=RUN trainer.max_epochs=10`` trains longer); where the run
    wrote and what it resumed from are never inherited. Left as is: multiruns, and runs without saved overrides.
    """
    args = argv[1:]
    resumes = [a for a in args if a.startswith("resume=")]
    if len(resumes) != 1 or any(a in ("-m", "--multirun") for a in args):
        return argv
    value = resumes[0].split("=", 1)[1]
    try:
        saved = run_folder(find_checkpoint(value)) / ".hydra" / "overrides.yaml"
    except FileNotFoundError:
        return argv  # train() reports it, with the fix
    if not saved.is_file():
        return argv
    parser = OverridesParser.create()
    try:
        given = {o.key_or_group for o in parser.parse_overrides([a for a in args if not a.startswith("-")])}
        old = [str(o) for o in OmegaConf.to_container(OmegaConf.load(saved))]
        inherited = [
            o.input_line
            for o in parser.parse_overrides(old)
            if o.key_or_group not in given and o.key_or_group not in _NOT_INHERITED
        ]
    except Exception:  # noqa: BLE001 - a malformed override: let Hydra report it in its own words
        return argv
    if inherited:
        print(f"resume={value}: continuing with that run's overrides: {' '.join(inherited)}", flush=True)
    return [argv[0], *inherited, *args]


def check_resumable(checkpoint_path: Path, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """Refuse to resume a checkpoint into a different model, optimiser or data split, saying what differs.

    Batch and image sizes may change (with a warning): the run then differs from one uninterrupted run.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    errors, warnings = [], []

    def compare(label: str, then: Any, now: Any, into: list[str]) -> None:
        if then != now:
            into.append(f"{label}: {then!r} in the checkpoint, {now!r} now")

    saved_model = checkpoint.get("hyper_parameters", {})
    for key in ("backbone", "num_classes", "freeze", "head_lr_mult"):
        if key in saved_model:
            compare(f"model.{key}", saved_model[key], model.hparams.get(key), errors)
    saved_data = checkpoint.get("datamodule_hyper_parameters", {})
    if "root" in saved_data:
        compare("data.root", str(Path(saved_data["root"]).resolve()), str(Path(datamodule.root).resolve()), errors)
    for key in ("val_fraction", "split_seed", "skip_corrupt"):
        if key in saved_data:
            compare(f"data.{key}", saved_data[key], datamodule.hparams.get(key), errors)
    for key in ("batch_size", "image_size", "resize_size"):
        if key in saved_data:
            compare(f"data.{key}", saved_data[key], datamodule.hparams.get(key), warnings)

    saved_groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups", [])
    factory = getattr(model, "optimizer_factory", None)
    if saved_groups and hasattr(model, "parameter_groups"):
        names_now = [g["name"] for g in model.parameter_groups(1.0)]
        compare("optimizer parameter groups", [g.get("name") for g in saved_groups], names_now, errors)
        if isinstance(factory, functools.partial):
            probe = factory([torch.nn.Parameter(torch.zeros(1))])
            missing = sorted(set(probe.defaults) - set(saved_groups[0]))
            if missing:
                errors.append(f"optimizer: the checkpoint's has no {missing}, so it is not {type(probe).__name__}")
    if errors:
        raise ValueError(
            f"Cannot resume {str(checkpoint_path)!r}: it was saved by a different setup ("
            + "; ".join(errors)
            + "). Resume with the original run's settings: resume=RUN_DIR brings them back by itself; with "
            "ckpt_path=, repeat the original overrides (RUN_DIR/.hydra/overrides.yaml lists them)."
        )
    if warnings:
        log.warning(
            "Resuming %s with changed settings (%s): the result will differ from one uninterrupted run.",
            checkpoint_path,
            "; ".join(warnings),
        )
