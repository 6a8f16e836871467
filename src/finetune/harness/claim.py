"""A run never starts in a folder that holds another run.

- :func:`claim_run_folder`: own a run's folder, atomically, or refuse it (it holds a run, another process claimed it
  first, it cannot be written, its name is too long for the filesystem).
- :class:`ClaimRunFolder`: the Hydra callback that does it before Hydra writes ``.hydra/`` and the log into the folder;
  a multirun checks its sweep folder instead.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write
from pytorch_lightning.utilities import rank_zero_only

from finetune.errors import OverwriteError, PathError, UserError
from finetune.harness.exits import fail
from finetune.harness.run_folder import CLAIM, HYDRA, RunFolder
from finetune.harness.writable import check_name_lengths, check_writable

# Run folders that ClaimRunFolder claimed in this process for the run about to start.
_CLAIMED_BY_HYDRA: set[Path] = set()


def claim_run_folder(output_dir: str | Path, log_dir: str | Path | None = None) -> None:
    """Own ``output_dir`` for this run, or refuse: it holds another run, or another process claimed it first, or it
    cannot be written (naming ``paths.log_dir`` when the folder is made below ``log_dir``).

    Only the global rank 0 claims: the other DDP ranks run in rank 0's folder.
    """
    if rank_zero_only.rank != 0:
        return
    check_name_lengths(output_dir, "The run folder (hydra.run.dir, paths.output_dir)", _LONG_RUN_FOLDER)
    folder = RunFolder(Path(output_dir))
    if folder.path.resolve() in _CLAIMED_BY_HYDRA:
        _CLAIMED_BY_HYDRA.discard(folder.path.resolve())
        return  # this run's own claim, made by ClaimRunFolder before Hydra wrote .hydra/ into it
    found = folder.holds_a_run()
    if _is_this_multirun_job(folder.path):
        found = [f for f in found if f != f"{HYDRA}/"]  # Hydra's record of this very job, written as it started
    if not found:
        _check_run_folder_writable(folder.path, log_dir)  # e.g. below a read-only paths.log_dir: before any work
        try:
            folder.claim()
            return
        except FileExistsError:
            found = [CLAIM]  # another run claimed it between the check and the claim
    raise OverwriteError(
        f"Output folder {str(output_dir)!r} already holds a run ({', '.join(found)}); a run never writes into "
        f"another run's folder. To continue that run, pass resume={output_dir} (it writes to a new folder); "
        "otherwise leave hydra.run.dir and paths.output_dir unset so that every run gets a new folder."
    )


_LONG_RUN_FOLDER = (
    "A run's folder is named <date>_<time>_<name> below paths.log_dir/runs/ (a multirun job's "
    "<number>_<name>_seed<seed> below hydra.sweep.dir): pass a shorter name=, or a shorter hydra.run.dir, "
    "paths.output_dir or paths.log_dir."
)


def _check_run_folder_writable(folder: Path, log_dir: str | Path | None) -> None:
    if log_dir is not None and folder.absolute().is_relative_to(Path(log_dir).expanduser().absolute()):
        check_writable(folder, "paths.log_dir", log_dir)  # the folder the user chose; the run's name is Hydra's
        return
    try:
        check_writable(folder, "paths.output_dir")
    except PathError as err:
        hint = "A run's folder is made below paths.log_dir unless paths.output_dir is given."
        raise PathError(f"{err} ({hint})") from None


def _is_this_multirun_job(folder: Path) -> bool:
    """Whether ``folder`` is the current multirun job's own folder (its sweep folder was checked at the start)."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", throw_on_missing=False)
    is_multirun = str(hydra_cfg.mode) == str(RunMode.MULTIRUN)
    return is_multirun and output_dir is not None and Path(output_dir).resolve() == folder.resolve()


class ClaimRunFolder(HydraCallback):
    """Hydra callback: claim the run folder (or refuse) before Hydra writes ``.hydra/`` and the log into it.

    A multirun checks its sweep folder instead: a reused ``hydra.sweep.dir`` whose job folders hold runs is
    refused before any job starts (except a search continuing its study there); each job then claims its own
    folder when it starts.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # the folder's name may use ${hydra:...}; Hydra sets it next anyway
        try:
            claim_run_folder(config.hydra.run.dir, OmegaConf.select(config, "paths.log_dir", default=None))
        except UserError as err:
            fail(str(err))  # a SystemExit: Hydra turns a callback's Exception into a mere warning
        _CLAIMED_BY_HYDRA.add(Path(config.hydra.run.dir).resolve())

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:
            return
        HydraConfig.instance().set_config(config)
        sweep = Path(config.hydra.sweep.dir)
        try:  # the jobs' folders are made by Hydra before any job could refuse a name too long for the filesystem
            job = sweep / _job_folder(config)
            check_name_lengths(job, "A multirun job's folder (hydra.sweep.dir, hydra.sweep.subdir)", _LONG_RUN_FOLDER)
        except UserError as err:
            fail(str(err))
        if _continues_a_search(config, sweep):
            return  # hparams_search: the study goes on in its folder; new trials get new job folders
        taken = (
            sorted(p.name for p in sweep.iterdir() if p.is_dir() and RunFolder(p).holds_a_run())
            if sweep.is_dir()
            else []
        )
        if taken:
            fail(
                f"sweep folder {str(sweep)!r} already holds runs ({', '.join(taken[:5])}); a multirun never "
                "writes into an earlier sweep. Leave hydra.sweep.dir unset so that every multirun gets a new folder."
            )


def _job_folder(config: DictConfig) -> str:
    """The first job's folder name (``hydra.sweep.subdir`` with job number 0), or ``""`` where it cannot be told."""
    try:
        probe = copy.deepcopy(config)
        with read_write(probe.hydra.job):
            probe.hydra.job.num = 0
        return str(probe.hydra.sweep.subdir or "")
    except Exception:  # noqa: BLE001 - a subdir that needs more than the job number: checked as the job starts
        return ""


def _continues_a_search(config: DictConfig, sweep: Path) -> bool:
    """A search (``hparams_search=``) whose study database is in ``sweep``: running it again continues the study."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return target.startswith("hydra_plugins.finetune_optuna_sweeper.") and (sweep / "optuna.db").is_file()
