"""Train, then test the best checkpoint: ``python -m finetune.train [hydra overrides]``.

Examples::

    python -m finetune.train                                   # the book: ResNet-18, d2l hot dogs
    python -m finetune.train experiment=scratch trainer.max_epochs=10
    python -m finetune.train -m experiment=finetune,scratch,frozen seed=0,1,2
    python -m finetune.train resume=logs/runs/<run>             # continue a stopped run, in a new folder
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from finetune import atomic
from finetune.errors import UserError
from finetune.harness.checkpoint_io import load_checkpoint
from finetune.harness.checkpointing import InterruptCheckpoint
from finetune.harness.claim import claim_run_folder
from finetune.harness.distributed import StopRequested, job_scope, lost_ranks
from finetune.harness.divergence import DivergenceStop
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell, user_error_in, user_errors
from finetune.harness.overrides import sweep_params_from_argv
from finetune.harness.results import (
    ParameterCount,
    fit_record,
    run_results,
    summary,
    to_number,
    write_json_atomic,
    write_test_report,
)
from finetune.harness.resume import (
    check_left_to_train,
    check_resumable,
    resume_checkpoint,
    with_run_overrides,
)
from finetune.harness.run_folder import RunFolder, keep_claimed
from finetune.harness.run_settings import check_seed, is_zero_shot
from finetune.harness.run_state import EpochHistory, RngState
from finetune.harness.signals import SignalStop
from finetune.loggers import log_config, log_results
from finetune.run import CONFIG_DIR, Run, assemble, compose_config
from finetune.scoring import TEMPERATURE, Scorer
from finetune.temperature import calibrate_checkpoint

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train (selecting on val), test the best checkpoint once, and write ``results.json``.

    ``results.json`` says ``"status"``: ``completed``; ``interrupted`` (Ctrl+C or SIGTERM, under DDP to any one
    rank: every process then exits with 130 or 143, after saving ``checkpoints/interrupted.ckpt``); or ``failed``,
    with the error (under DDP naming a rank that died, when rank 0 can tell).
    """
    pl.seed_everything(check_seed(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path is not None:
        check_left_to_train(cfg, ckpt_path)  # before the folder is claimed: a refused resume leaves none
    claim_run_folder(output_dir)
    absolute_input_paths(cfg)
    history, parameters = EpochHistory(), ParameterCount()
    trainer: pl.Trainer | None = None
    fitted: dict[str, Any] | None = None
    start = time.perf_counter()
    test_metrics: dict[str, float] = {}
    test_report: dict[str, Any] | None = None
    calibration: dict[str, Any] = {}
    try:
        # DivergenceStop before EpochHistory: an epoch that ends on a nan loss is never recorded.
        callbacks = [DivergenceStop(), history, RngState(), InterruptCheckpoint(output_dir), SignalStop(), parameters]
        run = assemble(cfg, callbacks)
        trainer = run.trainer
        log_config(trainer.loggers, cfg)  # the whole composed config, for trackers that compare runs
        if ckpt_path is not None:
            check_resumable(ckpt_path, run.model, run.images, cfg)  # reads it safely first: never unpickles code
            log.info("Resuming from %s", ckpt_path)
        keep_claimed()  # training starts: a failure from here on keeps the folder and its record
        if is_zero_shot(cfg):
            fitted = zero_shot(run, output_dir)
        else:
            trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True)
            # Read everything from the fit now: testing a checkpoint restores the callbacks' state as of that epoch.
            fitted = fit_record(trainer, history.history)
        fit_seconds = time.perf_counter() - start
        best = fitted["best_checkpoint"]  # None after fast_dev_run or without checkpointing: the weights in hand
        checkpoint = load_checkpoint(best) if best else {"state_dict": run.model.state_dict()}
        run.model.load_state_dict(checkpoint["state_dict"])
        if cfg.get("calibrate", True) and best:
            # The best checkpoint gets its temperature (fitted on val) before anything scores it. After a resume
            # the best may be the earlier run's file: that one is never rewritten, a calibrated copy lands here.
            target = calibrated_checkpoint_path(Path(best), output_dir)
            calibration = calibrate_checkpoint(run.model, run.datamodule, checkpoint)
            if trainer.is_global_zero:
                atomic.torch_save(checkpoint, target)
            trainer.strategy.barrier("calibrated")
            best = fitted["best_checkpoint"] = str(target)
        if cfg.get("test_after_fit", True):
            scorer = Scorer(run.model, checkpoint.get(TEMPERATURE, 1.0))
            test_metrics = trainer.test(scorer, datamodule=run.datamodule)[0]
            # Per class, confusion matrix, AUROC, ECE in results.json; confusion_matrix.png, top_losses.png.
            test_report = write_test_report(scorer, run.images, output_dir, trainer.is_global_zero)
    except BaseException as err:
        fitted = fitted or fit_record(trainer, history.history)
        seconds = time.perf_counter() - start
        exit_code = _record_stop(err, trainer, cfg, output_dir, fitted, seconds, ckpt_path, parameters.record)
        if exit_code:
            raise SystemExit(exit_code) from err
        raise

    results = run_results(
        cfg, output_dir, "completed", fitted, test_metrics, fit_seconds, ckpt_path, test_report, parameters.record
    )
    results.update(calibration)
    if trainer.is_global_zero:
        write_json_atomic(RunFolder(output_dir).results, results)
        log_results(trainer.loggers, results)
        tell(summary(results))
    return results


def zero_shot(run: Run, output_dir: Path) -> dict[str, Any]:
    """A zero-shot run (``trainer.max_epochs=0``, the head the pretrained classifier's rows): nothing is fitted; the
    model is validated as it is and saved as ``checkpoints/zero_shot.ckpt``, which then goes where a fit's best
    checkpoint would: calibrated on validation, tested once, and usable as a soup's ingredient (``method=wise``
    between it and a fine-tune that started from it)."""
    metrics = run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)[0]
    path = RunFolder(output_dir).zero_shot_checkpoint
    run.trainer.save_checkpoint(path, weights_only=False)  # with the class names, preprocessing and recipe record
    return {
        "val/acc": to_number(metrics.get("val/acc")),
        "best_checkpoint": str(path),
        "last_checkpoint": None,
        "history": [],
    }


def absolute_input_paths(cfg: DictConfig) -> None:
    """Make a relative ``data.root`` (and ``data.cache_dir``, a ``model.weights`` file) absolute, as of the folder the
    run starts in: its checkpoints then record where its data was, for a resume or an evaluation started elsewhere."""
    data = cfg.get("data")
    for key in ("root", "cache_dir"):
        if data is None or key not in data or OmegaConf.is_missing(data, key):
            continue  # a missing data.root is refused by the setting checks, by name
        value = data[key]
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[key] = str(Path(value).absolute())
    weights = OmegaConf.select(cfg, "model.weights", default=None)
    if isinstance(weights, str) and not Path(weights).is_absolute() and Path(weights).is_file():
        cfg.model.weights = str(Path(weights).absolute())


def calibrated_checkpoint_path(best: Path, output_dir: Path) -> Path:
    """Where the calibrated best checkpoint goes: the file itself when this run wrote it, else into this run's
    ``checkpoints/`` (the best of a resumed run can be the earlier run's, which stays as it was)."""
    if best.resolve().is_relative_to(output_dir.resolve()):
        return best
    return RunFolder(output_dir).checkpoints / best.name


def _record_stop(
    err: BaseException,
    trainer: pl.Trainer | None,
    cfg: DictConfig,
    output_dir: Path,
    fitted: dict[str, Any],
    seconds: float,
    ckpt_path: Path | None,
    parameters: dict[str, int | None] | None = None,
) -> int:
    """Write ``results.json`` for a run that did not complete; the exit code for an interruption, else 0."""
    signum = _interrupting_signal(err, trainer)
    status = "interrupted" if signum else "failed"
    results = run_results(cfg, output_dir, status, fitted, {}, seconds, ckpt_path, parameters=parameters)
    interrupted = RunFolder(output_dir).interrupted_checkpoint
    results["interrupted_checkpoint"] = str(interrupted) if signum and interrupted.is_file() else None
    lost = None if signum else lost_ranks(trainer)  # under DDP, a rank that died is the likely cause: name it
    shown = user_error_in(err) or err  # a user's mistake as itself, not as Hydra's instantiate wrapped it
    results["error"] = None if signum else f"{lost + ': ' if lost else ''}{type(shown).__name__}: {shown}"[:4000]
    if rank_zero_only.rank == 0:
        try:
            write_json_atomic(RunFolder(output_dir).results, results)
        except OSError as write_error:  # a full disk: say so, and keep the error that stopped the run the one shown
            log.error("Could not write %s either: %s", RunFolder(output_dir).results, write_error)
        if trainer is not None:
            log_results(trainer.loggers, results)  # trackers see the stopped run's status too
    if not signum:
        if not isinstance(err, UserError):  # a user's mistake is said once, by its Error: line (harness.exits)
            log.error("Run failed: %s (output folder %s)", results["error"], output_dir)
        return 0
    log.warning("Interrupted by %s. %s", signal.Signals(signum).name, how_to_continue(output_dir, ckpt_path))
    return 128 + signum  # the shell's convention: 130 for Ctrl+C, 143 for SIGTERM


def how_to_continue(output_dir: Path, resumed_from: Path | None) -> str:
    """What to run after an interruption: ``resume=`` where a checkpoint to continue from exists, else start again.

    Before its first training step (while the data is checked or features are cached) a run saves no checkpoint:
    ``resume=`` of its folder would find nothing, so the advice is to start it again (or to resume the checkpoint
    this run itself resumed from, which is still the latest state).
    """
    if any(p.is_file() for p in RunFolder(output_dir).resume_candidates()):
        return f"Continue with: python -m finetune.train resume={output_dir}"
    if resumed_from is not None:
        return (
            f"It stopped before its first checkpoint, so {output_dir} holds nothing to resume; {resumed_from} is "
            f"still the latest state. Continue with: python -m finetune.train resume={resumed_from}"
        )
    return (
        f"It stopped before its first checkpoint (before the first training step, e.g. while caching features), so "
        f"there is nothing to resume: start the run again with the same command (its overrides are in "
        f"{RunFolder(output_dir).overrides})."
    )


def _interrupting_signal(err: BaseException, trainer: pl.Trainer | None) -> int:
    """SIGINT or SIGTERM if ``err`` is how the run was stopped by one (Lightning turns them into SystemExit), else 0."""
    if isinstance(err, StopRequested):  # DDP: every rank stops on the signal that one of them received
        return err.signum
    if trainer is not None and trainer.received_sigterm:
        return signal.SIGTERM
    if isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt):
        return signal.SIGINT
    return signal.SIGTERM if isinstance(err, SystemExit) else 0


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@ends_user_errors_cleanly
def hydra_main(cfg: DictConfig) -> float | None:
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    with job_scope():  # DDP ranks start from this job (multiruns included), and leave nothing behind
        results = train(cfg)
    return results["val/acc"]  # what a Hydra sweeper optimises: validation, never test


def check_resume_before_start(args: list[str]) -> None:
    """Refuse a resume that :func:`train` would refuse (no checkpoint there, nothing left to train) before Hydra makes
    a run folder for it, on the config the run would have. Left to :func:`train`: multiruns, Hydra's own flags, and
    overrides that do not compose (Hydra says what is wrong with them)."""
    if not any(a.startswith(("resume=", "ckpt_path=")) for a in args) or any(a.startswith("-") for a in args):
        return
    try:
        cfg = compose_config(args)
    except Exception:  # noqa: BLE001 - reported by Hydra, in its own words, when it composes the run
        return
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path is not None:
        check_left_to_train(cfg, ckpt_path)


def main() -> None:
    """The command line: ``resume=RUN_DIR`` first brings back that run's own overrides, ``hydra.sweeper.params.K=V``
    becomes the sweep override ``K=V`` (which Hydra takes), a resume that cannot continue is refused, then Hydra
    runs."""
    with user_errors():  # a refused resume or sweep override, before Hydra starts (and makes a run folder)
        sys.argv = sweep_params_from_argv(with_run_overrides(sys.argv))
        check_resume_before_start(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
