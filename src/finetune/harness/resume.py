"""Continuing runs (claiming a new run's folder is :mod:`finetune.harness.claim`).

- :func:`resume_checkpoint`: the checkpoint that ``resume=RUN_DIR_OR_CKPT`` (or Lightning's ``ckpt_path=``) names.
- :func:`with_run_overrides`: ``resume=RUN_DIR`` brings back that run's own command-line overrides.
- :func:`check_resumable`: a checkpoint only continues the setup that wrote it.
- :func:`check_left_to_train`: a resume of a run that already reached its epoch or step limit is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from finetune.data.transforms import PREPROCESSING, Preprocessing
from finetune.errors import PathError, ResumeError, SettingError
from finetune.harness.checkpoint_io import CheckpointFolderError, check_checkpoint_file, load_checkpoint
from finetune.harness.checkpointing import EPOCHS_ADDED, FORMAT, FORMAT_KEY, RECIPE, recipe
from finetune.harness.exits import fail
from finetune.harness.run_folder import CHECKPOINTS, INTERRUPTED, LAST, RunFolder
from finetune.param_groups import Grouping

log = logging.getLogger(__name__)

# Overrides of the earlier run that a resumed run must not inherit: where it writes, and what it resumes from.
_NOT_INHERITED = {"resume", "ckpt_path", "paths.output_dir", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"}


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint to continue from: ``resume=RUN_DIR_OR_CKPT`` or Lightning's own ``ckpt_path=CKPT``."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume and ckpt_path:
        raise SettingError(f"Pass resume= or ckpt_path=, not both (got resume={resume}, ckpt_path={ckpt_path}).")
    if resume:
        return find_checkpoint(resume)
    if not ckpt_path:
        return None
    try:
        check_checkpoint_file(Path(ckpt_path), "ckpt_path")
    except CheckpointFolderError as err:
        raise CheckpointFolderError(
            f"{err} To continue the run in that folder from its latest state, pass resume={ckpt_path} instead."
        ) from None
    return Path(ckpt_path)


def find_checkpoint(resume: str | Path) -> Path:
    """The checkpoint that ``resume=`` names: a ``.ckpt`` file, or a run folder's latest checkpoint.

    In a run folder that is ``checkpoints/interrupted.ckpt`` (written only when the run was stopped, so always the
    newest state) or else ``checkpoints/last.ckpt`` (the end of the last finished epoch).
    """
    path = Path(resume)
    if path.is_file():
        check_checkpoint_file(path, "resume")  # an exported model, an image, ...: said what it is
        return path
    if not path.is_dir():
        raise PathError(
            f"resume={resume}: no such run folder or checkpoint file. Pass a run's folder (logs/runs/<...>, or a "
            f"multirun job's folder) or one of its {CHECKPOINTS}/*.ckpt files."
        )
    unreadable = []
    for candidate in RunFolder(path).resume_candidates():
        if candidate.is_file():
            try:
                load_checkpoint(candidate, mmap=True)
                return candidate
            except ValueError as err:
                log.warning("resume=%s: skipping %s: %s", resume, candidate, err)
                unreadable.append(str(candidate))
    if unreadable:
        raise ResumeError(
            f"resume={resume}: every checkpoint to continue from is unreadable ({', '.join(unreadable)}; see the "
            "warnings above). Start that run again, or resume from another of its checkpoints by file name."
        )
    raise PathError(
        f"resume={resume}: the folder holds no {CHECKPOINTS}/{INTERRUPTED} or {CHECKPOINTS}/{LAST} (the run "
        f"stopped before its first checkpoint, or this is not a run folder; it holds "
        f"{sorted(p.name for p in path.iterdir())}). Start that run again instead of resuming it."
    )


def check_left_to_train(cfg: DictConfig, checkpoint_path: Path) -> None:
    """Refuse to continue ``checkpoint_path`` (what ``resume=`` or ``ckpt_path=`` named: :func:`resume_checkpoint`)
    when its run already reached ``trainer.max_epochs`` (or ``trainer.max_steps``).

    Lightning would train 0 epochs, test again and write a new run folder, as if something had been trained. The
    epochs done are the fit loop's ``processed`` count, which is what Lightning compares with ``max_epochs`` on resume.
    """
    setting = "resume" if cfg.get("resume") else "ckpt_path"
    trainer: Mapping[str, Any] = cfg.trainer
    checkpoint = load_checkpoint(checkpoint_path, mmap=True, setting=setting)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs, steps = progress.get("processed"), checkpoint.get("global_step")
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    added = checkpoint.get(EPOCHS_ADDED, 0)  # e.g. SWA's BatchNorm epoch after the last one
    if isinstance(epochs, int) and isinstance(max_epochs, int) and max_epochs != -1 and epochs >= max_epochs + added:
        reached = f"trainer.max_epochs={max_epochs} ({epochs} epoch(s) done)"
        longer = f"trainer.max_epochs={epochs + max(1, max_epochs // 2)}"
    elif isinstance(steps, int) and isinstance(max_steps, int) and max_steps != -1 and steps >= max_steps:
        reached = f"trainer.max_steps={max_steps} ({steps} step(s) done)"
        longer = f"trainer.max_steps={2 * steps}"
    else:
        return
    run = RunFolder.of_checkpoint(checkpoint_path)
    best = _best_checkpoint(run) or f"{run.checkpoints}/<its best epochNN-val_acc*.ckpt>"
    raise ResumeError(
        f"{setting}={cfg.get(setting)}: nothing left to train, that run already reached {reached}. To train it "
        f"longer, resume with a larger limit ({setting}={cfg.get(setting)} {longer}); to test it again, "
        f"python -m finetune.evaluate ckpt_path={best}."
    )


def _best_checkpoint(run: RunFolder) -> str | None:
    """The best checkpoint a finished run recorded in its ``results.json``, if that file still exists."""
    try:
        best = json.loads(run.results.read_text()).get("best_checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return best if isinstance(best, str) and Path(best).is_file() else None


def with_run_overrides(argv: list[str]) -> list[str]:
    """``resume=RUN`` on the command line brings back that run's own overrides (``RUN/.hydra/overrides.yaml``).

    Overrides given now win over the saved ones (``resume=RUN trainer.max_epochs=10`` trains longer); where the run
    wrote and what it resumes from are never inherited. Left as is: multiruns. A run folder without saved
    overrides is refused before anything else happens.
    """
    args = argv[1:]
    resumes = [a for a in args if a.startswith("resume=")]
    if len(resumes) != 1 or any(a in ("-m", "--multirun") for a in args):
        return argv
    value = resumes[0].split("=", 1)[1]
    try:
        run = RunFolder.of_checkpoint(find_checkpoint(value))
        saved = run.overrides
    except (FileNotFoundError, ValueError):
        return argv  # train() reports it, with the fix
    if not saved.is_file():
        fail(
            f"resume={value}: {saved} does not exist, so that run's settings cannot be brought back (it was "
            "not started by finetune.train, or its .hydra folder was removed). Continue it with "
            "ckpt_path=CHECKPOINT and the run's original overrides repeated on the command line."
        )
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
    inherited = anchor_paths(inherited, run, given)
    if inherited:
        print(f"resume={value}: continuing with that run's overrides: {' '.join(inherited)}", flush=True)
    return [argv[0], *inherited, *args]


# Settings that name input files or folders: a relative value means "relative to the folder the run started in".
PATH_SETTINGS = ("data.root", "data.cache_dir", "paths.data_dir", "pretrained_weights", "model.weights")
_WEIGHT_SETTINGS = ("pretrained_weights", "model.weights")  # also take names (imagenet, DEFAULT): files only


def run_cwd(run: RunFolder) -> Path | None:
    """The folder a run was started in (Hydra's ``runtime.cwd`` in ``RUN/.hydra/hydra.yaml``), if recorded."""
    record = run.hydra / "hydra.yaml"
    if not record.is_file():
        return None
    try:
        cwd = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.cwd", default=None)
    except Exception:  # noqa: BLE001 - an unreadable record: nothing to anchor to
        return None
    return Path(str(cwd)) if cwd else None


def anchored(value: Any, key: str, cwd: Path) -> str | None:
    """``value`` of the path setting ``key`` made absolute against ``cwd``, or ``None`` if it is no relative path
    (absolute, an interpolation, empty, or a weights name such as ``imagenet``)."""
    if not isinstance(value, str) or not value or "${" in value or value.startswith("~"):
        return None
    if Path(value).is_absolute():
        return None
    path = cwd / value
    if key in _WEIGHT_SETTINGS and not path.is_file():
        return None
    return str(path)


def anchor_paths(inherited: list[str], run: RunFolder, given: set[str]) -> list[str]:
    """The inherited overrides with their relative input paths made absolute against the folder the run started
    in, plus those path settings of its config that were relative (``paths.data_dir: data``): a resume started in
    another folder reads the same data and weights, not whatever those names mean there."""
    cwd = run_cwd(run)
    if cwd is None:
        return inherited
    parser = OverridesParser.create()
    out, seen = [], set(given)
    for line in inherited:
        (override,) = parser.parse_overrides([line])
        key = override.key_or_group
        seen.add(key)
        path = anchored(override.value(), key, cwd) if key in PATH_SETTINGS else None
        out.append(line if path is None else f"{line.split('=', 1)[0]}={_quoted(path)}")
    config = run.hydra / "config.yaml"
    if config.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(config), resolve=False)  # interpolations as written
        for key in PATH_SETTINGS:
            if key not in seen:
                path = anchored(_literal(saved, key), key, cwd)
                if path is not None:
                    out.append(f"{key}={_quoted(path)}")
    return out


def _literal(tree: Any, key: str) -> Any:
    """The value at the dotted ``key`` of a plain nested dict, or ``None``."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _quoted(path: str) -> str:
    """A path as an override value: bare where Hydra's grammar allows it, else quoted."""
    if re.fullmatch(r"[\w./+\-@:]+", path):
        return path
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_resumable(
    checkpoint_path: Path, model: pl.LightningModule, datamodule: pl.LightningDataModule, cfg: DictConfig
) -> None:
    """Refuse to resume a checkpoint into a different model, recipe, optimiser or data split, saying what differs.

    Batch and image sizes may change (with a warning): the run then differs from one uninterrupted run.
    """
    checkpoint = load_checkpoint(checkpoint_path, mmap=True)  # weights_only: a crafted file cannot run code
    if checkpoint.get(FORMAT_KEY) != FORMAT:
        raise ResumeError(
            f"Cannot resume {str(checkpoint_path)!r}: it was written by another version of finetune (format "
            f"{checkpoint.get(FORMAT_KEY, 'before 2')}, this version writes {FORMAT}), whose recipe settings this one "
            "cannot check. Evaluate, predict or export it as it is, or start the run again."
        )
    errors, warnings = [], []

    def compare(label: str, then: Any, now: Any, into: list[str]) -> None:
        if then != now:
            into.append(f"{label}: {then!r} in the checkpoint, {now!r} now")

    saved_model = checkpoint.get("hyper_parameters", {})
    for key in ("backbone", "num_classes", "freeze", "head_lr_mult"):
        compare(f"model.{key}", saved_model.get(key), model.hparams.get(key), errors)
    groups = [Grouping.of(g).to_dict() for g in (saved_model.get("groups"), model.hparams.get("groups"))]
    compare("model.groups", *groups, errors)  # a checkpoint from before model.groups: null, the book's two groups
    then, now = checkpoint.get(RECIPE) or {}, recipe(cfg)
    for key in sorted(set(then) | set(now)):
        compare(key, then.get(key), now.get(key), errors)
    saved_data = checkpoint.get("datamodule_hyper_parameters", {})
    if "root" in saved_data:  # runs record an absolute data.root (finetune.train makes it absolute)
        then = Path(saved_data["root"])
        compare("data.root", str(then.resolve()), str(Path(datamodule.root).resolve()), errors)
    for key in ("val_fraction", "split_seed", "skip_corrupt", "folds", "fold"):
        if key in saved_data:
            compare(f"data.{key}", saved_data[key], datamodule.hparams.get(key), errors)
    for key in ("batch_size", "augmentation"):
        if key in saved_data:
            compare(f"data.{key}", saved_data[key], datamodule.hparams.get(key), warnings)
    if checkpoint.get(PREPROCESSING):  # the eval preprocessing in effect, nulls filled
        then, now = Preprocessing.from_dict(checkpoint[PREPROCESSING]), datamodule.preprocessing
        for key in Preprocessing.keys():
            compare(f"data.{key}", getattr(then, key), getattr(now, key), warnings)

    saved_groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups", [])
    if saved_groups and hasattr(model, "parameter_groups"):
        names_now = [g["name"] for g in model.parameter_groups()]
        compare("optimizer parameter groups", [g.get("name") for g in saved_groups], names_now, errors)
    optimizer = getattr(model.optimizer_factory, "func", model.optimizer_factory)
    compare("optimizer", checkpoint.get("optimizer_class"), f"{optimizer.__module__}.{optimizer.__qualname__}", errors)
    schedulers_then = len(checkpoint.get("lr_schedulers") or [])
    compare("scheduler (count)", schedulers_then, int(model.scheduler_config is not None), errors)
    if errors:
        raise ResumeError(
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
