"""scripts/gpu_check.py's plumbing, on the CPU: a real training row, and a failing row that does not stop the rest."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from .conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

pytestmark = pytest.mark.slow  # every row is a `python -m finetune.train` subprocess


def test_cpu_smoke_trains_a_row_through_finetune_train(tmp_path, capsys):
    code = gpu_check.main(["--cpu-smoke", "--configs", "16-mixed,fp32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = tmp_path.glob("*/fp32")
    speed = json.loads((run_dir / "throughput.json").read_text())
    assert speed["precision"] == "32-true" and speed["images_per_s"] > 0 and speed["step_images_per_s"] > 0
    assert speed["epochs_measured"] == 1 and speed["train_images"] == 16  # epoch 0 is warm-up, 8 steps of 4
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2 and results["overrides"][0] == "experiment=finetune"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:1].isalnum()}
    assert rows["fp32"][0] == "OK" and rows["16-mixed"][0] == "SKIPPED"
    # The table shows the run's own files, in the script's number format (4 decimals below 100, none above:
    # how many digits images/s gets depends on the machine's speed).
    assert rows["fp32"][1:7] == [
        gpu_check._fmt(value)
        for value in (
            speed["images_per_s"],
            speed["step_images_per_s"],
            results["history"][-1]["train/loss"],
            results["history"][-1]["val/acc"],
            results["test/acc"],
            results["test/loss"],
        )
    ]


def test_a_configuration_that_fails_is_reported_and_the_exit_code_says_so(tmp_path, capsys):
    code = gpu_check.main(["--cpu-smoke", "--configs", "bf16-mixed", "--timeout", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "bf16-mixed: FAILED timed out after 1s" in out
    assert (next(tmp_path.glob("*")) / "bf16-mixed.log").is_file()
