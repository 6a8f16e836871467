"""scripts/benchmark.py runs end to end (on tiny data) and reports every figure it promises; no speed is asserted."""

import importlib.util
import logging

import pytest
import torch

from .conftest import REPO


@pytest.fixture
def restore_process_settings():
    """The script sets torch's thread count and quietens Lightning's loggers for the whole process."""
    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in ("pytorch_lightning", "lightning.pytorch")}
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.slow
def test_benchmark_runs_every_variant_and_prints_the_ratios(tmp_path, tiny_folder, capsys, restore_process_settings):
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    argv = ["--data", str(tiny_folder), "--backbone", "mobilenet_v2", "--weights", "none", "--batch-size", "4"]
    argv += ["--image-size", "32", "--num-workers", "0", "--threads", "1", "--warmup", "1", "--batches", "1"]
    argv += ["--repeats", "1", "--frozen-epochs", "2", "--json", str(tmp_path / "report.json")]
    report = benchmark.main(argv)

    assert list(report["training"]) == benchmark.ALL_VARIANTS
    for runs in report["training"].values():
        assert len(runs) == 1 and runs[0]["images"] == 4 and runs[0]["seconds"] > 0 and runs[0]["threads"] == 1
        assert runs[0]["main_peak_mib"] > 50 and runs[0]["tree_peak_mib"] >= runs[0]["main_peak_mib"]
        assert runs[0]["cpu_seconds"] > 0 and runs[0]["other_cores"] >= 0
    assert set(report["loading"]) == {"plain", "datamodule", "datamodule cache=memory", "datamodule cache=disk"}
    assert all(run["images"] > 0 for runs in report["loading"].values() for run in runs)
    assert [len(report["frozen"][k]["epoch_seconds"]) for k in ("uncached", "cached")] == [2, 2]
    out = capsys.readouterr().out
    assert "template+fast / plain:" in out and "uncached / cached features:" in out
    assert (tmp_path / "report.json").is_file()
