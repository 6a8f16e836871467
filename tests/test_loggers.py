"""logger=csv|tensorboard|wandb|mlflow, alone or several at once: each writes its files offline, with the run's
config as hyperparameters, the per-epoch metrics, and the results.json numbers at the end."""

import builtins
import csv
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from finetune.loggers import log_config, log_results, results_metrics, wandb_offline
from finetune.run import assemble, build_trainer
from finetune.scoring import Scorer

from .conftest import compose_config, tiny_overrides

RESULTS = {"status": "completed", "val/acc": 0.75, "test/acc": 0.625, "test/loss": 0.5, "epochs": 1, "seed": 0}


def _run_and_log(tmp_path: Path, tiny_folder: Path, logger: str) -> tuple[Path, dict]:
    """One short training run with ``logger``, logging config and results where ``finetune.train`` does."""
    cfg = compose_config(
        [f"logger={logger}", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    run = assemble(cfg)
    log_config(run.trainer.loggers, cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    tested = run.trainer.test(Scorer(run.model), datamodule=run.datamodule)[0]
    results = {**RESULTS, "test/acc": tested["test/acc"], "test/loss": tested["test/loss"]}
    log_results(run.trainer.loggers, results)
    return tmp_path, results


def test_csv_logger_writes_config_epochs_and_results(tmp_path, tiny_folder):
    out, results = _run_and_log(tmp_path, tiny_folder, "csv")
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert any(row.get("val/acc") for row in rows) and any(row.get("train/loss") for row in rows)
    final = [row for row in rows if row.get("results/test/acc")]
    assert len(final) == 1 and float(final[0]["results/test/acc"]) == pytest.approx(results["test/acc"])
    hparams = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["backbone"] == "resnet18" and hparams["data"]["batch_size"] == 4
    assert hparams["results/status"] == "completed"


def test_tensorboard_logger_writes_config_epochs_and_results(tmp_path, tiny_folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = _run_and_log(tmp_path, tiny_folder, "tensorboard")
    scalars = {}
    for events in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars.update({tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]})
    assert {"val/acc", "train/loss", "results/test/acc", "results/val/acc"} <= scalars.keys()
    assert scalars["results/test/acc"][-1].value == pytest.approx(results["test/acc"])
    hparams = yaml.safe_load((out / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["model"]["backbone"] == "resnet18" and hparams["optimizer"]["lr"] == pytest.approx(6.4e-3)


def test_mlflow_logger_writes_a_local_file_store(tmp_path, tiny_folder, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, results = _run_and_log(tmp_path, tiny_folder, "mlflow")
    store = out / "logs" / "mlflow"  # ${paths.log_dir}/mlflow
    runs = [p for p in store.glob("*/*") if (p / "meta.yaml").is_file()]
    assert len(runs) == 1
    run = runs[0]
    assert (run / "params" / "model" / "backbone").read_text() == "resnet18"
    assert (run / "params" / "results" / "status").read_text() == "completed"
    assert (run / "tags" / "mlflow.runName").read_text() == "finetune"
    assert (run / "metrics" / "val" / "acc").is_file()
    last = (run / "metrics" / "results" / "test" / "acc").read_text().split()
    assert float(last[1]) == pytest.approx(results["test/acc"])  # "<timestamp> <value> <step>"
    assert yaml.safe_load((run / "meta.yaml").read_text())["status"] == 3  # RunStatus.FINISHED


def test_wandb_logger_runs_offline_without_an_api_key(tmp_path, tiny_folder, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, results = _run_and_log(tmp_path, tiny_folder, "wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "an offline run folder, since no API key is set"
    wanted = (b"val/acc", b"results/test/acc", b"resnet18", b"completed")  # metrics, config, results
    deadline = time.monotonic() + 120  # W&B's service process writes the file; on a loaded machine it can lag
    while True:
        records = b"".join(path.read_bytes() for path in runs[0].glob("run-*.wandb"))
        if all(text in records for text in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for text in wanted:
        assert text in records, text
    import wandb

    assert wandb.run is None, "log_results finishes the run, so the next job of a multirun gets its own"


def test_wandb_goes_online_only_when_the_environment_says_so():
    assert wandb_offline({}) is True
    assert wandb_offline({"WANDB_API_KEY": "x" * 40}) is False
    assert wandb_offline({"WANDB_MODE": "online"}) is False


def test_several_loggers_at_once(tmp_path):
    listed = compose_config(["logger=[csv,tensorboard]", f"paths.output_dir={tmp_path}"])
    assert set(listed.logger) == {"csv", "tensorboard"}
    added = compose_config(["+logger=mlflow", f"paths.output_dir={tmp_path}"])
    assert set(added.logger) == {"csv", "mlflow"}
    assert compose_config(["logger=wandb"]).logger.keys() == {"wandb"}
    assert not compose_config(["logger=[]"]).get("logger")
    loggers = [instantiate(c) for c in listed.logger.values()]
    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger", "TensorBoardLogger"]


@pytest.mark.parametrize("logger, package, extra", [("wandb", "wandb", "trackers"), ("mlflow", "mlflow", "trackers")])
def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, logger, package, extra):
    real_import = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.setattr(builtins, "__import__", missing)
    cfg = compose_config([f"logger={logger}", f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}"])
    with pytest.raises(
        Exception, match=rf"logger={logger} needs the {package} package: pip install 'finetune\[{extra}\]'"
    ):
        build_trainer(cfg)


def test_results_metrics_are_the_numbers_of_results_json():
    metrics = results_metrics({**RESULTS, "fit_seconds": 3.5, "best_checkpoint": "a.ckpt", "history": [{"x": 1}]})
    assert metrics == {
        "results/val/acc": 0.75,
        "results/test/acc": 0.625,
        "results/test/loss": 0.5,
        "results/epochs": 1.0,
        "results/fit_seconds": 3.5,
    }
    assert results_metrics({"val/acc": None, "status": "failed"}) == {}
