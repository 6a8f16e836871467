"""DDP through Trainer flags: 2 CPU processes (gloo) give a single process's numbers and write one folder per run.

Why the comparison is exact rather than "close", and what it does not cover:

- every image is one flat colour, so RandomResizedCrop and the flip leave it unchanged: the per-process random
  streams of the augmentation cannot make the two runs differ (asserted below, not assumed);
- the global batch is the whole training split (2 x 9 under DDP, 18 in one process), so each epoch is one step
  and the order in which DistributedSampler and RandomSampler deal the samples does not matter;
- ``experiment=frozen`` keeps every BatchNorm in eval mode: a BatchNorm in train mode normalises with per-device
  batch statistics (9 images, not 18), which no setting makes equal on CPU (SyncBatchNorm needs a GPU), so
  ``finetune`` under DDP is checked for completing and for its files, not for equal numbers;
- val (5 images) and test (7) do not divide by 2: the numbers only match if no sample is padded in twice.

What is left is float summation order, hence ``rel=1e-4``: a padded duplicate or a missing gradient average
moves these losses by several percent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import read_write
from PIL import Image
from pytorch_lightning.strategies import DDPStrategy

from finetune.data import train_transform
from finetune.errors import SettingError
from finetune.harness.distributed import check_launcher, rank_command
from finetune.train import train

from .conftest import REPO, compose_config, compose_with_hydra, run_cli

TOL = {"rel": 1e-4, "abs": 1e-6}
PER_DEVICE, GLOBAL = 9, 18


def make_flat_image_folder(root: Path, n_train=(10, 13), n_test=(4, 3), seed: int = 0) -> Path:
    """``root/{train,test}/{a,b}/*.png``, each image a single colour that depends on its class."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", n_train), ("test", n_test)):
        for index, (name, n) in enumerate(zip("ab", counts, strict=True)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = rng.integers(0, 120, size=3, dtype=np.uint8)
                colour[index] += 120
                pixels = np.broadcast_to(colour, (36 + i % 5, 40, 3)).copy()
                Image.fromarray(pixels).save(root / split / name / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    return make_flat_image_folder(tmp_path_factory.mktemp("flat"))


def overrides(root: Path, log_dir: Path, batch_size: int) -> list[str]:
    return [
        "data=folder",
        f"data.root={root}",
        "data.image_size=32",
        "data.resize_size=36",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "data.val_fraction=0.2",  # 2 + 3 of 10 + 13 train images: val 5, train 18
        "model.weights=null",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
        f"paths.log_dir={log_dir}",
    ]


def single_process(root: Path, tmp_path: Path, experiment: str) -> dict:
    cfg = compose_config(
        [f"experiment={experiment}", f"paths.output_dir={tmp_path / experiment}"]
        + overrides(root, tmp_path / "logs", GLOBAL)
    )
    return train(cfg)


def assert_same_numbers(ddp: dict, single: dict) -> None:
    assert ddp["epochs"] == single["epochs"] == 3
    for key in ("val/acc", "test/acc", "test/loss"):
        assert ddp[key] == pytest.approx(single[key], **TOL), key
    for got, want in zip(ddp["history"], single["history"], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], **TOL), (got["epoch"], key)
    losses = [e["train/loss"] for e in single["history"]]
    assert len(set(losses)) == 3, "training must move the loss, or the comparison shows nothing"


def test_flat_images_are_unchanged_by_the_training_augmentation(flat_folder):
    image = Image.open(next((flat_folder / "train" / "a").iterdir()))
    views = []
    for seed in range(4):
        torch.manual_seed(seed)
        views.append(train_transform(32)(image))
    assert all(torch.equal(views[0], view) for view in views[1:])


@pytest.mark.slow
def test_two_process_ddp_run_matches_one_process_and_writes_one_folder(flat_folder, tmp_path):
    log_dir = tmp_path / "logs"
    done = run_cli(
        ["experiment=frozen", "trainer.strategy=ddp", "trainer.devices=2"] + overrides(flat_folder, log_dir, PER_DEVICE)
    )
    (run_dir,) = (log_dir / "runs").iterdir()  # exactly one folder, although two processes started Hydra
    assert sorted(p.name for p in log_dir.iterdir()) == ["runs"]
    ddp = json.loads((run_dir / "results.json").read_text())
    assert ddp["output_dir"] == str(run_dir)
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 logged into the run's folder
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        [Path(ddp["best_checkpoint"]).name, "last.ckpt"]
    )
    assert done.stdout.count("[frozen] resnet18") == 1  # the summary comes from rank 0 only

    assert_same_numbers(ddp, single_process(flat_folder, tmp_path / "single", "frozen"))


@pytest.mark.slow
def test_ddp_inside_a_multirun_keeps_each_job_in_its_own_folder(flat_folder, tmp_path):
    """The trap: Lightning re-runs sys.argv (with -m and the sweep) for rank 1; each rank must run its own job."""
    log_dir = tmp_path / "logs"
    done = run_cli(
        ["-m", "experiment=finetune,frozen", "trainer.strategy=ddp", "trainer.devices=2"]
        + overrides(flat_folder, log_dir, PER_DEVICE)
    )
    assert sorted(p.name for p in log_dir.iterdir()) == ["multiruns"]
    (sweep_dir,) = (log_dir / "multiruns").iterdir()  # no second sweep started by a rank
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0_finetune_seed0", "1_frozen_seed0"]
    results = {job: json.loads((sweep_dir / job / "results.json").read_text()) for job in jobs}
    for job, result in results.items():
        assert result["output_dir"] == str(sweep_dir / job) and result["epochs"] == 3
        assert (sweep_dir / job / "train_ddp_process_1.log").is_file()
        assert len(list((sweep_dir / job / "checkpoints").iterdir())) == 2
    assert done.stdout.count("[frozen] resnet18") == 1 and done.stdout.count("[finetune] resnet18") == 1
    # finetune trains BatchNorm on per-device batches: it completes (no unused-parameter error), numbers differ.
    # The second job had to build a new process group with new ranks: its numbers show it did so correctly.
    assert_same_numbers(results["1_frozen_seed0"], single_process(flat_folder, tmp_path / "single", "frozen"))


def test_rank_command_reruns_the_job_not_the_sweep(tmp_path):
    """What a multirun job's rank 1 runs: that job's overrides and folder, no -m, no sweep or launcher settings."""
    cfg = compose_with_hydra(
        ["hydra.mode=MULTIRUN", "hydra/launcher=joblib", "hydra.verbose=true", "experiment=frozen", "seed=3"]
    )
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(tmp_path / "it's job 0")
    HydraConfig.instance().set_config(cfg)

    command, cwd = rank_command(1)
    assert command == [
        sys.executable,
        "-m",
        "finetune.train",
        "--config-name=train",
        f"--config-path={REPO / 'conf'}",
        "hydra.verbose=true",
        "experiment=frozen",
        "seed=3",
        f"hydra.run.dir='{tmp_path}/it\\'s job 0'",
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
        "hydra.job.chdir=false",
    ]
    assert cwd == cfg.hydra.runtime.cwd


@pytest.mark.parametrize(
    ("strategy", "instead"),
    [
        ("ddp_spawn", "ddp"),
        ("ddp_spawn_find_unused_parameters_true", "ddp_find_unused_parameters_true"),
        ("ddp_fork", "ddp"),
        ("ddp_notebook", "ddp"),
        ("{_target_:pytorch_lightning.strategies.DDPStrategy,start_method:spawn}", "ddp"),
    ],
)
def test_strategies_that_start_their_ranks_inside_the_run_are_refused_naming_ddp(
    flat_folder, tmp_path, strategy, instead
):
    """Lightning's multiprocessing launcher runs each fit and test in new processes and returns only rank 0's
    metrics: the calibration, the test report and results.json of such a run would be wrong or missing."""
    cfg = compose_config(
        [f"trainer.strategy={strategy}", "trainer.devices=2", f"paths.output_dir={tmp_path / 'run'}"]
        + overrides(flat_folder, tmp_path / "logs", PER_DEVICE)
    )
    refused = rf"^trainer.strategy=.* starts its processes .* Use trainer.strategy={instead} "
    with pytest.raises(SettingError, match=refused):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was trained


def test_a_trainer_with_the_multiprocessing_launcher_is_refused_however_it_was_made():
    """A strategy object (or strategy=auto in a notebook, where Lightning picks ddp_fork) is caught on the Trainer."""
    refused = r"DDPStrategy \(Lightning's multiprocessing launcher\) .* Use trainer.strategy=ddp "
    with pytest.raises(SettingError, match=refused):
        check_launcher(pl.Trainer(strategy=DDPStrategy(start_method="spawn"), accelerator="cpu", devices=2))
    for accepted in (pl.Trainer(strategy="ddp", accelerator="cpu", devices=2), pl.Trainer(accelerator="cpu")):
        check_launcher(accepted)


@pytest.mark.slow
def test_ddp_spawn_on_the_command_line_ends_in_one_error_line(flat_folder, tmp_path):
    done = run_cli(
        ["trainer.strategy=ddp_spawn", "trainer.devices=2"] + overrides(flat_folder, tmp_path / "logs", PER_DEVICE),
        check=False,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("Error: trainer.strategy=ddp_spawn starts its processes")
    assert "Use trainer.strategy=ddp " in done.stderr and "Traceback" not in done.stderr
