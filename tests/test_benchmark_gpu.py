"""scripts/benchmark_gpu.py --smoke: every row and loader measurement runs on a CPU; a spent budget skips rows."""

from __future__ import annotations

import importlib.util
import json
import logging
import time

import pytest
import torch

from .conftest import REPO

spec = importlib.util.spec_from_file_location("benchmark_gpu", REPO / "scripts" / "benchmark_gpu.py")
benchmark_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark_gpu)


@pytest.fixture
def restore_process_settings(monkeypatch):
    """The script quietens Lightning's loggers and may wrap torch.compile for the whole process."""
    monkeypatch.setattr(torch, "compile", torch.compile)
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    torch._dynamo.reset()


def test_smoke_runs_every_row_and_loader_and_writes_the_table(tmp_path, capsys, restore_process_settings):
    out = tmp_path / "smoke.json"
    report = benchmark_gpu.main(["--smoke", "--backbones", "resnet18", "--json", str(out)])
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == list(benchmark_gpu.ROWS)
    for name, row in rows.items():
        assert row["status"] == "OK", (name, row.get("error"))
        assert row["images"] == 3 * 4 and row["seconds"] > 0  # --timed 3 batches of 4 in smoke mode
    assert rows["step compiled"]["compiled"] and rows["device+compile"]["compiled"]
    assert not rows["step"]["compiled"]
    assert set(report["loaders"]) == set(benchmark_gpu.LOADERS)
    assert all(run["images"] > 0 and run["images_per_s"] > 0 for runs in report["loaders"].values() for run in runs)
    assert json.loads(out.read_text())["rows"][-1]["row"] == "step compiled"  # rewritten after the last row
    printed = capsys.readouterr().out
    assert "resnet18      device ddp      OK" in printed and "s/2000 img" in printed
    assert not torch.distributed.is_initialized()  # the DDP row leaves no process group behind


def test_a_spent_budget_skips_rows_and_still_reports(tmp_path, capsys, restore_process_settings):
    out = tmp_path / "budget.json"
    report = benchmark_gpu.main(["--smoke", "--rows", "step,loader", "--budget", "1", "--json", str(out)])
    assert [row["status"] for row in report["rows"]] == ["SKIPPED"] * 4  # two rows, two backbones
    assert "the row needs" in report["rows"][0]["error"]
    assert json.loads(out.read_text())["rows"] == report["rows"]
    assert "SKIPPED" in capsys.readouterr().out


def test_a_row_that_overruns_is_stopped_and_the_next_one_runs(tmp_path, monkeypatch, restore_process_settings):
    def run_row(args, backbone, name, workdir):
        if name == "step":
            time.sleep(30)  # a hung row (a DDP start that never returns, say)
        return {"images": 12, "seconds": 1.0, "images_per_s": 12.0, "compiled": False}

    monkeypatch.setattr(benchmark_gpu, "run_row", run_row)
    started = time.perf_counter()
    argv = ["--smoke", "--backbones", "resnet18", "--rows", "step,step NCHW", "--loader-repeats", "0"]
    report = benchmark_gpu.main([*argv, "--row-timeout", "2"])
    assert [row["status"] for row in report["rows"]] == ["TIMEOUT", "OK"]
    assert "stopped after 2s" in report["rows"][0]["error"]
    assert time.perf_counter() - started < 25
