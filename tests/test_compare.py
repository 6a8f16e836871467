"""scripts/compare.py: the command line, the multirun it launches, and the launch path end to end."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, tiny_overrides
from .sweeps import make_full_sweep

spec = importlib.util.spec_from_file_location("compare_script", REPO / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


@pytest.fixture
def full_sweep(tmp_path) -> Path:
    return make_full_sweep(tmp_path / "sweep")


def test_cli_from_exits_1_on_an_incomplete_sweep_and_0_on_a_complete_one(full_sweep, tmp_path, capsys):
    assert compare.main(["--from", str(full_sweep), "--out", str(tmp_path / "a")]) == 0
    assert "| finetune | 3/3 | 0.920 ± 0.020 |" in capsys.readouterr().out
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0

    (full_sweep / "4_scratch_seed1" / "results.json").unlink()
    assert compare.main(["--from", str(full_sweep), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "1 expected job(s) missing or failed" in err and "failed: scratch seed 1" in err

    assert compare.main(["data=folder", "--from", str(full_sweep), "model.backbone=resnet18"]) == 2
    assert "--from aggregates an existing sweep" in capsys.readouterr().err
    assert compare.main(["--from", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sweep_command_passes_overrides_through_and_guards_its_own_keys(tmp_path):
    command = compare.sweep_command(
        ["finetune", "scratch"], [0, 1], tmp_path, ["pretrained_weights=/w.pth", "data=folder"]
    )
    assert command == [
        sys.executable,
        "-m",
        "finetune.train",
        "-m",
        "experiment=finetune,scratch",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
        "pretrained_weights=/w.pth",
        "data=folder",
    ]
    assert compare.sweep_command(["frozen"], [0], Path("a b,c"), [])[-1] == "hydra.sweep.dir='a b,c'"
    for bad, flag in (
        ("seed=3", "--seeds"),
        ("+seed=3", "--seeds"),
        ("experiment=scratch", "--experiments"),
        ("hydra.sweep.dir=x", "--sweep-dir"),
        ("-m", "always launches a multirun"),
        ("trainer.max_epochs=[1", "Hydra cannot parse the overrides"),
    ):
        with pytest.raises(compare.CompareError, match=flag):
            compare.sweep_command(["finetune"], [0], tmp_path, [bad])


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("logs/multiruns/2024-01-01_00-00-00.000000_compare", "logs/multiruns/2024-01-01_00-00-00.000000_compare"),
        ("a b,c", "'a b,c'"),  # a comma would make a sweep
        ("it's", r"'it\'s'"),
        ("ends\\", r"'ends\\'"),
        ("C:\\x y", r"'C:\x y'"),  # a backslash not before a quote stays single
    ],
)
def test_hydra_value_quotes_so_that_hydra_reads_the_path_back(path, value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert compare.hydra_value(path) == value
    assert OverridesParser.create().parse_override(f"hydra.sweep.dir={value}").value() == path


def test_hydra_value_refuses_an_interpolation():
    with pytest.raises(compare.CompareError, match="plainer path"):
        compare.hydra_value("runs/${now:%H}")


def test_default_sweep_dir_follows_paths_log_dir():
    assert compare.default_sweep_dir([]).parent == Path("logs/multiruns")
    assert compare.default_sweep_dir(["data=folder", "paths.log_dir='/x y'"]).parent == Path("/x y/multiruns")
    assert compare.default_sweep_dir(["++paths.log_dir=/z"]).name.endswith("_compare")
    assert compare.default_sweep_dir(["++paths.log_dir=/z"]).parent == Path("/z/multiruns")


def test_launch_refuses_a_used_sweep_dir_and_unknown_experiments(full_sweep, tmp_path, capsys):
    assert compare.main(["--sweep-dir", str(full_sweep), "trainer.max_epochs=1"]) == 2
    assert "never writes over earlier results" in capsys.readouterr().err
    assert compare.main(["--sweep-dir", str(tmp_path / "new"), "--experiments", "finetune,scrach"]) == 2
    assert "Unknown experiment(s) ['scrach']" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_launch_records_the_run_and_a_missing_matplotlib_fails_the_report_loudly(
    full_sweep, tmp_path, monkeypatch, capsys
):
    """The launch path with the training replaced by a copy of finished jobs, and matplotlib not installed."""
    launched, run = [], subprocess.run

    def fake_training(command, **kwargs):
        if command[:4] != [sys.executable, "-m", "finetune.train", "-m"]:
            return run(command, **kwargs)  # e.g. platform's `uname -p`: only the sweep is faked
        launched.append(command)
        sweep_dir = Path(command[6].removeprefix("hydra.sweep.dir="))
        shutil.copytree(full_sweep, sweep_dir, dirs_exist_ok=True)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_training)
    monkeypatch.setattr(compare.shutil, "which", lambda name: None)  # no nvidia-smi to ask
    for name in ["matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    sweep_dir, out = tmp_path / "new", tmp_path / "out"

    assert compare.main(["--sweep-dir", str(sweep_dir), "--out", str(out), "trainer.max_epochs=2"]) == 1
    captured = capsys.readouterr()
    assert [c[4:] for c in launched] == [
        ["experiment=finetune,scratch,frozen", "seed=0,1,2", f"hydra.sweep.dir={sweep_dir}", "trainer.max_epochs=2"]
    ]
    needs = "curves.png needs matplotlib: pip install 'finetune[figures]'"
    assert captured.err.startswith(f"compare: {needs} (the tables will be written without it)")  # before the sweep
    assert f"compare: {needs}, then rerun scripts/compare.py --from {sweep_dir} --out {out}" in captured.err
    assert "| finetune | 3/3 | 0.920 ± 0.020 |" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "table.csv", "table.md"]
    record = json.loads((sweep_dir / "compare.json").read_text())
    assert record["returncode"] == 0 and record["seeds"] == [0, 1, 2] and record["machine"]["cpus"] >= 1
    assert record["command"] == f"python scripts/compare.py --sweep-dir {sweep_dir} --out {out} trainer.max_epochs=2"
    assert record["command"] in (out / "comparison.md").read_text()


@pytest.mark.slow
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
