"""DDP under Hydra: every rank of a run, or of one multirun job, composes that job's config and shares its folder.

Lightning's ``strategy=ddp`` starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` appended
(``_hydra_subprocess_cmd`` in ``lightning_fabric/strategies/launchers/subprocess_script.py``). In a multirun
``sys.argv`` still holds ``-m`` and the sweep lists, so every extra rank starts a *whole new sweep* in a new folder
and joins whichever job happens to be listening: wrong results, stray folders, exit code 0
(Lightning-AI/pytorch-lightning#11300; the fix #11617 was reverted, #18175 is still open; hydra#2070). Under a
launcher that runs jobs in worker processes (joblib, submitit's local executor) ``sys.argv`` is not even ours.

:func:`rank_command` builds the command from the job instead: ``python -m finetune.train``, the job's config source,
the job's own overrides (``hydra.overrides.task``, no sweep lists) and its output folder as ``hydra.run.dir``.
:func:`job_scope` puts it in Lightning's place for one job and, after the job, tears the process group down and
restores the launcher's environment variables, so the next job of a sequential sweep starts a fresh DDP group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ENTRY_MODULE = "finetune.train"
# What Lightning's launcher sets in the launching process for its children; a later job must not inherit them.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides that describe the sweep (or that rank_command sets itself), never a single rank's run.
_SWEEP_KEYS = ("hydra.mode", "hydra.sweep", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper")
_OWN_KEYS = ("hydra.run.dir", "hydra.job.name", "hydra.output_subdir", "hydra.job.chdir")


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command and working directory that start DDP rank ``local_rank`` of the current Hydra job."""
    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", ENTRY_MODULE, f"--config-name={hydra_cfg.job.config_name}"]
    for source in hydra_cfg.runtime.config_sources:
        location = source.path if source.schema == "file" else f"{source.schema}://{source.path}"
        if source.provider == "main":
            command.append(f"--config-path={location}")
        elif source.provider == "command-line":
            command.append(f"--config-dir={location}")
    command += [o for o in hydra_cfg.overrides.hydra if not _key(o).startswith(_SWEEP_KEYS + _OWN_KEYS)]
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir={_quote(_output_dir(hydra_cfg))}",  # the job's folder, never a new one
        f"hydra.job.name=train_ddp_process_{local_rank}",  # the rank's log: <output_dir>/train_ddp_process_N.log
        "hydra.output_subdir=null",  # rank 0 already wrote .hydra/
        f"hydra.job.chdir={'true' if hydra_cfg.job.chdir else 'false'}",
    ]
    return command, hydra_cfg.runtime.cwd


def install() -> bool:
    """Make Lightning's subprocess launcher start extra ranks with :func:`rank_command`; False if it cannot."""
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    from pytorch_lightning.strategies.launchers import subprocess_script as pl_launcher

    for module in (pl_launcher, fabric_launcher):  # the Trainer's, and Fabric's for scripts that use it
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = rank_command
    patched = getattr(pl_launcher, "_hydra_subprocess_cmd", None) is rank_command
    if not patched:
        log.warning(
            "This Lightning version has no _hydra_subprocess_cmd to replace: trainer.strategy=ddp inside a Hydra "
            "multirun (-m) would start stray sweeps. Run DDP jobs as single runs, or pin pytorch-lightning<=2.6."
        )
    return patched


@contextlib.contextmanager
def job_scope() -> Iterator[None]:
    """One Hydra job's DDP lifetime: ranks started from the job itself, and nothing left behind for the next job."""
    install()
    saved = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has finished this job before rank 0 moves on to the next one
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _output_dir(hydra_cfg: DictConfig) -> str:
    # Set once Hydra runs a job; a config from hydra.compose has none, so fall back to Lightning's choice.
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", throw_on_missing=False)
    return str(output_dir) if output_dir else str(hydra_cfg.run.dir)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _quote(value: str) -> str:
    """A Hydra override value that stays one string (spaces, commas, quotes)."""
    return "'" + value.replace("'", "\\'") + "'"
