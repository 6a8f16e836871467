"""Sweep folders as a ``finetune.train`` multirun leaves them, with hand-picked numbers, for the report tests."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.harness.run_folder import RunFolder

EXPERIMENTS = ("finetune", "scratch", "frozen")
# Hand-picked numbers whose means and sample stds are easy to check by hand.
TEST_ACC = {"finetune": [0.90, 0.92, 0.94], "scratch": [0.60, 0.70, 0.65], "frozen": [0.88, 0.88, 0.88]}
VAL_ACC = {"finetune": [0.95, 0.93, 0.91], "scratch": [0.70, 0.72, 0.74], "frozen": [0.90, 0.90, 0.90]}
FIT_SECONDS = {"finetune": [100.0, 110.0, 120.0], "scratch": [90.0, 90.0, 90.0], "frozen": [50.0, 60.0, 70.0]}
TRAIN_LOSS = {"finetune": [[0.6, 0.3], [0.8, 0.5], [0.7, 0.4]]}  # per seed, per epoch


def write_job(sweep: Path, number: int, experiment: str, seed: int, results: dict | None, **extra) -> Path:
    """A job folder: .hydra/overrides.yaml (written when a job starts), and results.json when it finished."""
    run = RunFolder(sweep / f"{number}_{experiment}_seed{seed}")  # conf/hydra/default.yaml's sweep.subdir
    run.hydra.mkdir(parents=True)
    run.overrides.write_text(f"- experiment={experiment}\n- seed={seed}\n")
    if results is not None:
        run.results.write_text(json.dumps({**results, **extra}))
    return run.path


def results_for(experiment: str, seed: int) -> dict:
    """results.json of a completed run, two epochs."""
    losses = TRAIN_LOSS.get(experiment, [[1.0, 0.9]] * 3)[seed]
    history = [
        {"epoch": e, "train/loss": loss, "train/acc": 0.5, "val/loss": 0.5, "val/acc": VAL_ACC[experiment][seed] - 0.1}
        for e, loss in enumerate(losses)
    ]
    return {
        "experiment": experiment,
        "backbone": "mobilenet_v2",
        "seed": seed,
        "val/acc": VAL_ACC[experiment][seed],
        "test/acc": TEST_ACC[experiment][seed],
        "test/loss": 0.3,
        "epochs": len(history),
        "fit_seconds": FIT_SECONDS[experiment][seed],
        "history": history,
    }


def write_multirun_yaml(sweep: Path, experiments: str, seeds: str) -> None:
    """The part of Hydra's multirun.yaml that the report reads: the sweep's own overrides."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n"
        f"    - experiment={experiments}\n    - seed={seeds}\n    - trainer.max_epochs=2\n"
    )


def make_full_sweep(sweep: Path) -> Path:
    """finetune, scratch, frozen x seeds 0, 1, 2, all completed."""
    for number, (experiment, seed) in enumerate((e, s) for e in EXPERIMENTS for s in (0, 1, 2)):
        write_job(sweep, number, experiment, seed, results_for(experiment, seed))
    write_multirun_yaml(sweep, ",".join(EXPERIMENTS), "0,1,2")
    return sweep
