"""The comparison: aggregation of a sweep's results.json files, the report files, and the launch path end to end."""

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.compare import (
    CompareError,
    Stat,
    curve,
    find_jobs,
    gap,
    load_sweep,
    main,
    summarize,
    sweep_command,
    to_csv,
    to_markdown,
    write_report,
)

from .conftest import REPO, tiny_overrides

# Hand-picked numbers whose means and sample stds are easy to check by hand.
TEST_ACC = {"finetune": [0.90, 0.92, 0.94], "scratch": [0.60, 0.70, 0.65], "frozen": [0.88, 0.88, 0.88]}
VAL_ACC = {"finetune": [0.95, 0.93, 0.91], "scratch": [0.70, 0.72, 0.74], "frozen": [0.90, 0.90, 0.90]}
FIT_SECONDS = {"finetune": [100.0, 110.0, 120.0], "scratch": [90.0, 90.0, 90.0], "frozen": [50.0, 60.0, 70.0]}
TRAIN_LOSS = {"finetune": [[0.6, 0.3], [0.8, 0.5], [0.7, 0.4]]}  # per seed, per epoch


def write_job(sweep: Path, number: int, experiment: str, seed: int, results: dict | None, **extra) -> Path:
    """A job folder as Hydra and finetune.train leave it: .hydra/overrides.yaml, and results.json when it finished."""
    folder = sweep / f"{number}_{experiment}_seed{seed}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- experiment={experiment}\n- seed={seed}\n")
    if results is not None:
        (folder / "results.json").write_text(json.dumps({**results, **extra}))
    return folder


def results_for(experiment: str, seed: int) -> dict:
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
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n"
        f"    - experiment={experiments}\n    - seed={seeds}\n    - trainer.max_epochs=2\n"
    )


@pytest.fixture
def full_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    number = 0
    for experiment in ("finetune", "scratch", "frozen"):
        for seed in (0, 1, 2):
            write_job(sweep, number, experiment, seed, results_for(experiment, seed))
            number += 1
    write_multirun_yaml(sweep, "finetune,scratch,frozen", "0,1,2")
    return sweep


def test_summarize_is_mean_and_sample_std():
    assert summarize([0.90, 0.92, 0.94]) == Stat(pytest.approx(0.92), pytest.approx(0.02), 3)
    assert summarize([0.5]) == Stat(0.5, None, 1)
    assert summarize([]) == Stat(None, None, 0)


def test_gap_is_difference_of_means_with_its_standard_error():
    result = gap(Stat(0.92, 0.02, 3), Stat(0.65, 0.05, 3))
    assert result.mean == pytest.approx(0.27)
    assert result.std == pytest.approx(math.sqrt((0.02**2 + 0.05**2) / 3))  # 0.03109
    assert gap(Stat(0.9, None, 1), Stat(0.6, 0.1, 3)).std is None


def test_table_holds_means_stds_and_the_finetune_minus_scratch_gap(full_sweep, tmp_path):
    sweep = load_sweep(full_sweep)
    assert (sweep.experiments, sweep.seeds, sweep.problems) == (["finetune", "scratch", "frozen"], [0, 1, 2], [])

    table = to_markdown(sweep)
    # finetune test 0.90/0.92/0.94 -> 0.920 ± 0.020; val 0.95/0.93/0.91 -> 0.930 ± 0.020; fit 100/110/120 -> 110 ± 10
    assert "| finetune | 3/3 | 0.920 ± 0.020 | 0.930 ± 0.020 | 2.0 ± 0.0 | 110 ± 10 |" in table
    # scratch test 0.60/0.70/0.65 -> 0.650 ± 0.050; val 0.70/0.72/0.74 -> 0.720 ± 0.020
    assert "| scratch | 3/3 | 0.650 ± 0.050 | 0.720 ± 0.020 | 2.0 ± 0.0 | 90 ± 0 |" in table
    # gap test 0.27 ± sqrt((0.02² + 0.05²)/3) = 0.031; val 0.21 ± sqrt((0.02² + 0.02²)/3) = 0.016
    assert "| finetune - scratch | +0.270 ± 0.031 | +0.210 ± 0.016 |" in table
    assert "| finetune - frozen | +0.040 ± 0.012 | +0.030 ± 0.012 |" in table
    assert "Incomplete" not in table and "Backbone: mobilenet_v2." in table

    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(to_csv(sweep)))}
    assert float(rows["finetune"]["test_acc_mean"]) == pytest.approx(0.92)
    assert float(rows["finetune"]["test_acc_std"]) == pytest.approx(0.02)
    assert float(rows["scratch"]["fit_seconds_std"]) == 0.0
    assert rows["finetune - scratch"]["kind"] == "gap"
    assert float(rows["finetune - scratch"]["test_acc_mean"]) == pytest.approx(0.27)
    assert float(rows["finetune - scratch"]["test_acc_std"]) == pytest.approx(0.031091, abs=1e-6)
    assert rows["finetune - scratch"]["epochs_mean"] == ""


def test_curves_average_the_seeds_per_epoch(full_sweep):
    jobs = load_sweep(full_sweep).completed("finetune")
    epochs, mean, std = curve(jobs, "train/loss")
    assert epochs == [1, 2]  # 1-based, as the book plots them
    assert mean == pytest.approx([0.7, 0.4]) and std == pytest.approx([0.1, 0.1])


def test_failed_interrupted_and_missing_jobs_are_named_and_not_averaged(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    write_multirun_yaml(sweep, "finetune,scratch,frozen", "0,1,2")
    number = 0
    for experiment in ("finetune", "scratch", "frozen"):
        for seed in (0, 1, 2):
            if (experiment, seed) == ("scratch", 1):
                write_job(sweep, number, experiment, seed, None)  # crashed: started, never wrote results.json
            elif (experiment, seed) == ("scratch", 2):
                write_job(sweep, number, experiment, seed, results_for(experiment, seed), status="interrupted")
            elif (experiment, seed) == ("frozen", 2):
                pass  # the sweep stopped before this job
            else:
                write_job(sweep, number, experiment, seed, results_for(experiment, seed))
            number += 1

    loaded = load_sweep(sweep)
    problems = loaded.problems
    assert len(problems) == 3
    assert problems[0].startswith("failed: scratch seed 1") and "no results.json" in problems[0]
    assert problems[1].startswith("failed: scratch seed 2") and "'interrupted'" in problems[1]
    assert problems[2].startswith("missing: frozen seed 2")

    table = to_markdown(loaded)
    assert "| scratch | 1/3 | 0.600 | 0.700 | 2.0 | 90 |" in table  # only seed 0 counts, and the table says so
    assert "| frozen | 2/3 | 0.880 ± 0.000 |" in table
    assert "Incomplete sweep: 3 problem(s)" in table
    assert all(f"- {p}" in table for p in problems)


def test_results_without_a_metric_count_as_failed(tmp_path):
    sweep = tmp_path / "sweep"
    results = results_for("finetune", 0) | {"test/acc": None}
    write_job(sweep, 0, "finetune", 0, results)
    write_job(sweep, 1, "finetune", 1, None).joinpath("results.json").write_text("{truncated")
    loaded = load_sweep(sweep, ["finetune"], [0, 1])
    assert [p.split(": ", 2)[2] for p in loaded.problems] == [
        "results.json has no numeric 'test/acc' (got None)",
        "unreadable results.json (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    ]
    assert loaded.completed("finetune") == []


def test_expected_grid_comes_from_the_sweep_or_the_caller(full_sweep):
    (full_sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - experiment=finetune,scratch\n    - seed=range(0,2)\n"
    )
    sweep = load_sweep(full_sweep)
    assert (sweep.experiments, sweep.seeds, sweep.problems) == (["finetune", "scratch"], [0, 1], [])
    assert {(j.experiment, j.seed) for j in sweep.ignored} == {("frozen", s) for s in (0, 1, 2)} | {
        ("finetune", 2),
        ("scratch", 2),
    }
    asked = load_sweep(full_sweep, ["finetune", "scratch", "frozen", "mine"], [0])
    assert asked.problems == ["missing: mine seed 0 (no job folder: the sweep never got to it)"]


def test_job_identity_falls_back_to_hydra_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    folder = sweep / "custom-subdir"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- experiment=frozen\n- seed=2\n- trainer.max_epochs=1\n")
    [job] = find_jobs(sweep)
    assert (job.experiment, job.seed, job.results) == ("frozen", 2, None) and "no results.json" in job.problem


def test_a_folder_of_sweeps_or_nothing_is_a_clear_error(full_sweep, tmp_path):
    with pytest.raises(CompareError, match="does not exist"):
        find_jobs(tmp_path / "nope")
    with pytest.raises(CompareError, match=r"holds several sweeps; pass one of: .*sweep"):
        find_jobs(tmp_path)


def test_report_files_are_written_and_the_figure_is_a_real_png(full_sweep, tmp_path):
    out = tmp_path / "docs"
    paths = write_report(load_sweep(full_sweep), out)
    assert [p.name for p in paths] == ["table.md", "table.csv", "curves.png", "comparison.md"]
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 300
        assert len(image.getcolors(maxcolors=1_000_000)) > 50  # drawn on, not a blank canvas
    doc = (out / "comparison.md").read_text()
    assert (out / "table.md").read_text() in doc and "![" in doc and "(curves.png)" in doc
    assert "python -m finetune.train -m experiment=finetune,scratch,frozen seed=0,1,2 trainer.max_epochs=2" in doc


def test_cli_from_exits_1_on_an_incomplete_sweep_and_0_on_a_complete_one(full_sweep, tmp_path, capsys):
    assert main(["--from", str(full_sweep), "--out", str(tmp_path / "a")]) == 0
    assert "| finetune | 3/3 | 0.920 ± 0.020 |" in capsys.readouterr().out
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0

    (full_sweep / "4_scratch_seed1" / "results.json").unlink()
    assert main(["--from", str(full_sweep), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "1 expected job(s) missing or failed" in err and "failed: scratch seed 1" in err

    assert main(["data=folder", "--from", str(full_sweep), "model.backbone=resnet18"]) == 2
    assert "--from aggregates an existing sweep" in capsys.readouterr().err


def test_sweep_command_passes_overrides_through_and_guards_its_own_keys(tmp_path):
    command = sweep_command(["finetune", "scratch"], [0, 1], tmp_path, ["pretrained_weights=/w.pth", "data=folder"])
    assert command[1:] == [
        "-m",
        "finetune.train",
        "-m",
        "experiment=finetune,scratch",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
        "pretrained_weights=/w.pth",
        "data=folder",
    ]
    assert sweep_command(["frozen"], [0], Path("a b,c"), [])[-1] == "hydra.sweep.dir='a b,c'"
    for bad, flag in (
        ("seed=3", "--seeds"),
        ("experiment=scratch", "--experiments"),
        ("hydra.sweep.dir=x", "--sweep-dir"),
    ):
        with pytest.raises(CompareError, match=flag):
            sweep_command(["finetune"], [0], tmp_path, [bad])


def test_launch_refuses_a_used_sweep_dir_and_unknown_experiments(full_sweep, tmp_path, capsys):
    assert main(["--sweep-dir", str(full_sweep), "trainer.max_epochs=1"]) == 2
    assert "never writes over earlier results" in capsys.readouterr().err
    assert main(["--sweep-dir", str(tmp_path / "new"), "--experiments", "finetune,scrach"]) == 2
    assert "Unknown experiment(s) ['scrach']" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_compare_script_launches_the_sweep_and_writes_the_report(tmp_path, tiny_folder):
    """3 experiments x 1 seed, one training batch each: the real launch path, end to end."""
    overrides = [o for o in tiny_overrides(tiny_folder, tmp_path) if not o.startswith("paths.output_dir")]
    sweep_dir, out = tmp_path / "sweep", tmp_path / "out"
    command = [
        sys.executable,
        "scripts/compare.py",
        "--seeds",
        "0",
        "--sweep-dir",
        str(sweep_dir),
        "--out",
        str(out),
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        *overrides,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep_dir.glob("*/results.json")) == [
        "0_finetune_seed0",
        "1_scratch_seed0",
        "2_frozen_seed0",
    ]
    for experiment in ("finetune", "scratch", "frozen"):
        assert f"| {experiment} | 1/1 |" in done.stdout
    assert "| finetune - scratch |" in done.stdout
    assert all((out / name).stat().st_size > 0 for name in ("table.md", "table.csv", "curves.png", "comparison.md"))
    record = json.loads((sweep_dir / "compare.json").read_text())
    assert record["returncode"] == 0 and record["seeds"] == [0] and record["machine"]["cpus"] >= 1
    assert record["command"].startswith("python scripts/compare.py --seeds 0")
    assert record["command"] in (out / "comparison.md").read_text()
