"""Hydra launchers: the documented SLURM command composes to consistent settings, submitit runs a sweep."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from finetune.train import main

from .conftest import (
    assert_counted_accuracy,
    compose_with_hydra,
    count_correct,
    run_cli,
    tiny_overrides,
    without,
)

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]' (or '.[dev]')")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[cluster]' (or '.[dev]')")

# docs/scaling.md's multi-node command, minus its sweep.
SLURM = [
    "hydra/launcher=slurm",
    "trainer.accelerator=gpu",
    "trainer.strategy=ddp",
    "trainer.num_nodes=2",
    "trainer.devices=4",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.timeout_min=240",
]


def print_cfg(monkeypatch, capsys, args: list[str]) -> dict:
    """What ``python -m finetune.train ARGS`` prints, run in this process (same Hydra CLI path, no new interpreter)."""
    monkeypatch.setattr(sys, "argv", ["finetune-train", *args])
    main()
    return yaml.safe_load(capsys.readouterr().out)


def test_cfg_job_and_cfg_hydra_print_the_slurm_settings(monkeypatch, capsys):
    job = print_cfg(monkeypatch, capsys, [*SLURM, "--cfg", "job"])
    assert {k: job["trainer"][k] for k in ("accelerator", "strategy", "num_nodes", "devices")} == {
        "accelerator": "gpu",
        "strategy": "ddp",
        "num_nodes": 2,
        "devices": 4,
    }
    launcher = print_cfg(monkeypatch, capsys, [*SLURM, "--cfg", "hydra"])["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["timeout_min"]) == ("gpu", 240)
    # The job's size is the Trainer's, by interpolation: one place to set it, no way for the two to disagree.
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (
        "${trainer.num_nodes}",
        "${trainer.devices}",
        "${trainer.devices}",
    )


def test_slurm_launcher_resolves_to_one_task_per_gpu_on_every_node():
    cfg = compose_with_hydra(SLURM)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)

    local = compose_with_hydra(["hydra/launcher=slurm_local", "trainer.devices=2"]).hydra.launcher
    assert (local.nodes, local.gpus_per_node, local.tasks_per_node) == (1, 2, 1)  # Lightning starts the ranks

    parallel = compose_with_hydra(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"]).hydra.launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 3


@pytest.mark.slow
def test_submitit_local_multirun_runs_both_experiments_in_their_own_folders(tmp_path, tiny_folder):
    done = run_cli(
        [
            "-m",
            "hydra/launcher=slurm_local",
            "experiment=finetune,frozen",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            *count_correct("${paths.output_dir}/counts.json"),  # each job counts into its own folder
            *without(tiny_overrides(tiny_folder, tmp_path), "paths.output_dir"),
        ]
    )
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    results = sorted(sweep_dir.glob("*/results.json"))
    assert [r.parent.name for r in results] == ["0_finetune_seed0", "1_frozen_seed0"]
    for path, experiment in zip(results, ("finetune", "frozen"), strict=True):
        result = json.loads(path.read_text())
        assert result["experiment"] == experiment and result["epochs"] == 1
        counted = json.loads((path.parent / "counts.json").read_text())["test"]
        assert_counted_accuracy(result["test/acc"], counted, total=8)  # the 8 test images of tiny_folder
    assert list((sweep_dir / ".submitit").iterdir()), "the jobs went through submitit"
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr


@pytest.mark.slow
def test_parallel_launcher_runs_jobs_whose_loaders_have_worker_processes(tmp_path, tiny_folder):
    """joblib's loky workers make loky the default start method; DataLoader workers must still start."""
    overrides = without(tiny_overrides(tiny_folder, tmp_path), "paths.output_dir", "data.num")
    run_cli(
        [
            "-m",
            "hydra/launcher=parallel",
            "experiment=finetune,frozen",
            "data.num_workers=1",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            *overrides,
        ]
    )
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/results.json")}
    assert statuses == {"0_finetune_seed0": "completed", "1_frozen_seed0": "completed"}


@pytest.mark.slow
def test_parallel_launcher_runs_the_fast_paths_whose_cache_builders_have_worker_processes(tmp_path, tiny_folder):
    """The image cache and the feature cache build with their own loaders: they too must start under loky."""
    overrides = without(tiny_overrides(tiny_folder, tmp_path), "paths.output_dir", "data.num")
    run_cli(
        [
            "-m",
            "hydra/launcher=parallel",
            "experiment=frozen",
            "features=cached",
            "data.cache=none,memory",
            "data.num_workers=1",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            *overrides,
        ]
    )
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/results.json")}
    assert statuses == {"0_frozen_seed0": "completed", "1_frozen_seed0": "completed"}
