"""finetune.report: a sweep's results.json files -> statistics, table.md, table.csv, curves.png and comparison.md."""

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.harness.run_folder import RunFolder
from finetune.report import (
    FigureUnavailable,
    ReportError,
    curve,
    find_jobs,
    load_sweep,
    to_csv,
    to_markdown,
    write_report,
)
from finetune.stats import Stat, gap, summarize

from .sweeps import make_full_sweep, results_for, write_job, write_multirun_yaml


@pytest.fixture
def full_sweep(tmp_path) -> Path:
    return make_full_sweep(tmp_path / "sweep")


def test_summarize_is_mean_and_sample_std():
    assert summarize([0.90, 0.92, 0.94]) == Stat(pytest.approx(0.92), pytest.approx(0.02), 3)
    assert summarize([0.5]) == Stat(0.5, None, 1)
    assert summarize([]) == Stat(None, None, 0)


def test_gap_is_difference_of_means_with_its_standard_error():
    result = gap(Stat(0.92, 0.02, 3), Stat(0.65, 0.05, 3))
    assert result.mean == pytest.approx(0.27)
    assert result.std == pytest.approx(math.sqrt((0.02**2 + 0.05**2) / 3))  # 0.03109
    assert gap(Stat(0.9, None, 1), Stat(0.6, 0.1, 3)).std is None


def test_table_holds_means_stds_and_the_finetune_minus_scratch_gap(full_sweep):
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

    text = to_csv(sweep)
    assert text.splitlines()[0] == (
        "kind,name,seeds,expected_seeds,test_acc_mean,test_acc_std,val_acc_mean,val_acc_std,"
        "epochs_mean,epochs_std,fit_seconds_mean,fit_seconds_std"
    )
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(text))}
    assert list(rows) == ["finetune", "scratch", "frozen", "finetune - scratch", "finetune - frozen"]
    assert (rows["finetune"]["kind"], rows["finetune"]["seeds"], rows["finetune"]["expected_seeds"]) == (
        "experiment",
        "3",
        "3",
    )
    assert float(rows["finetune"]["test_acc_mean"]) == pytest.approx(0.92)
    assert float(rows["finetune"]["test_acc_std"]) == pytest.approx(0.02)
    assert float(rows["finetune"]["fit_seconds_mean"]) == pytest.approx(110.0)
    assert float(rows["scratch"]["fit_seconds_std"]) == 0.0
    assert (rows["finetune - scratch"]["kind"], rows["finetune - scratch"]["seeds"]) == ("gap", "3")
    assert float(rows["finetune - scratch"]["test_acc_mean"]) == pytest.approx(0.27)
    assert float(rows["finetune - scratch"]["test_acc_std"]) == pytest.approx(0.031091, abs=1e-6)
    assert float(rows["finetune - scratch"]["val_acc_mean"]) == pytest.approx(0.21)
    assert rows["finetune - scratch"]["epochs_mean"] == "" and rows["finetune - scratch"]["fit_seconds_std"] == ""


def test_curves_average_the_seeds_per_epoch(full_sweep):
    jobs = load_sweep(full_sweep).completed("finetune")
    epochs, mean, std = curve(jobs, "train/loss")
    assert epochs == [1, 2]  # 1-based, as the book plots them
    assert mean == pytest.approx([0.7, 0.4]) and std == pytest.approx([0.1, 0.1])


def test_failed_interrupted_and_missing_jobs_are_named_and_not_averaged(tmp_path):
    sweep = tmp_path / "sweep"
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
    assert [row.split(",")[2:4] for row in to_csv(loaded).splitlines()[1:4]] == [["3", "3"], ["1", "3"], ["2", "3"]]


def test_a_duplicate_completed_job_is_a_problem(full_sweep):
    write_job(full_sweep, 9, "scratch", 1, results_for("scratch", 1))
    [problem] = load_sweep(full_sweep).problems
    assert problem.startswith("duplicate: scratch seed 1 completed 2 times") and "9_scratch_seed1" in problem


def test_results_without_a_metric_or_truncated_count_as_failed(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, "finetune", 0, results_for("finetune", 0) | {"test/acc": None})
    RunFolder(write_job(sweep, 1, "finetune", 1, None)).results.write_text("{truncated")
    write_job(sweep, 2, "finetune", 2, results_for("finetune", 2) | {"history": None})
    write_job(sweep, 3, "finetune", 3, {"status": "failed", "error": "PathError: data.root does not exist"})
    loaded = load_sweep(sweep, ["finetune"], [0, 1, 2, 3])
    assert [p.split(": ", 2)[2] for p in loaded.problems] == [
        "results.json has no numeric 'test/acc' (got None)",
        "unreadable results.json (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "results.json has no per-epoch 'history' list",
        "results.json says status 'failed', not 'completed': PathError: data.root does not exist",  # the why, too
    ]
    assert loaded.completed("finetune") == []
    assert "| finetune | 0/4 | n/a | n/a | n/a | n/a |" in to_markdown(loaded)


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

    (full_sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - trainer.max_epochs=2\n")
    defaults = load_sweep(full_sweep)  # conf/train.yaml's experiment and seed
    assert (defaults.experiments, defaults.seeds) == (["finetune"], [0])
    (full_sweep / "multirun.yaml").unlink()
    unknown = load_sweep(full_sweep)  # not launched as a multirun: the comparison's own grid
    assert (unknown.experiments, unknown.seeds) == (["finetune", "scratch", "frozen"], [0, 1, 2])


@pytest.mark.parametrize(
    ("overrides", "identity"),
    [
        ("- experiment=frozen\n- seed=2\n- trainer.max_epochs=1\n", ("frozen", 2)),
        ("- +seed=3\n- data.root='a b,c'\n", ("finetune", 3)),  # conf/train.yaml's default experiment
        ("- experiment=scratch\n", ("scratch", 0)),  # and default seed
        ("- experiment=scratch\n- seed=abc\n", (None, None)),
        ("- experiment=scratch\n- seed=0,1\n", (None, None)),  # a sweep is not one job
        ("- 'experiment=[unclosed'\n", (None, None)),  # not Hydra's syntax
        ("experiment: scratch\n", (None, None)),  # not a list of overrides
    ],
)
def test_job_identity_falls_back_to_the_hydra_overrides(tmp_path, overrides, identity):
    run = RunFolder(tmp_path / "sweep" / "custom-subdir")  # a folder name that says nothing
    run.hydra.mkdir(parents=True)
    run.overrides.write_text(overrides)
    [job] = find_jobs(tmp_path / "sweep")
    assert (job.experiment, job.seed, job.results) == (*identity, None) and "no results.json" in job.problem


def test_jobs_come_in_job_number_order_and_other_folders_are_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    for number in (10, 9, 2):
        write_job(sweep, number, "finetune", number, None)
    (sweep / "notes").mkdir()
    names = [job.folder.name for job in find_jobs(sweep)]
    assert names == ["2_finetune_seed2", "9_finetune_seed9", "10_finetune_seed10"]


def test_a_folder_of_sweeps_or_nothing_is_a_clear_error(full_sweep, tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        find_jobs(tmp_path / "nope")
    with pytest.raises(ReportError, match=r"holds several sweeps; pass one of: .*sweep"):
        find_jobs(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"No job folders in .*empty'.*\.hydra/ and results\.json\)\.$"):
        find_jobs(tmp_path / "empty")


def test_report_files_are_written_and_the_figure_is_a_real_png(full_sweep, tmp_path):
    out = tmp_path / "docs"
    paths = write_report(load_sweep(full_sweep), out)
    assert paths == [out / name for name in ("table.md", "table.csv", "curves.png", "comparison.md")]
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 300
        assert len(image.getcolors(maxcolors=1_000_000)) > 50  # drawn on, not a blank canvas
    doc = (out / "comparison.md").read_text()
    assert (out / "table.md").read_text() in doc and "![" in doc and "(curves.png)" in doc
    assert "python -m finetune.train -m experiment=finetune,scratch,frozen seed=0,1,2 trainer.max_epochs=2" in doc
    assert "Machine: not recorded" in doc and f"Sweep folder: `{full_sweep}`" in doc
    assert (out / "table.csv").read_text() == to_csv(load_sweep(full_sweep))

    record = {"command": "python scripts/compare.py --seeds 0", "machine": {"cpus": 2}}
    (full_sweep / "compare.json").write_text(json.dumps(record))
    doc = write_report(load_sweep(full_sweep), out)[3].read_text()
    assert "Command: `python scripts/compare.py --seeds 0`" in doc and "Machine: cpus: 2" in doc


def test_without_matplotlib_the_tables_are_written_and_the_missing_figure_is_an_error(
    full_sweep, tmp_path, monkeypatch
):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "curves.png").write_bytes(b"an older sweep's figure")
    for name in ["matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed: `import matplotlib` fails

    sweep = load_sweep(full_sweep)
    with pytest.raises(FigureUnavailable) as raised:
        write_report(sweep, out)
    assert str(raised.value) == "curves.png needs matplotlib: pip install 'finetune[figures]'"
    assert isinstance(raised.value, ReportError) and isinstance(raised.value.__cause__, ImportError)
    assert raised.value.written == [out / "table.md", out / "table.csv", out / "comparison.md"]
    assert (out / "table.md").read_text() == to_markdown(sweep)
    assert (out / "table.csv").read_text() == to_csv(sweep)
    assert "| finetune | 3/3 | 0.920 ± 0.020 |" in (out / "comparison.md").read_text()
    assert not (out / "curves.png").exists()  # not left to pass for this sweep's figure
