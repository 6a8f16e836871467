"""Nothing runs code from a file, and no run writes into another run's folder."""

from __future__ import annotations

import hashlib
import logging
import pathlib
import re
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from finetune.evaluate import evaluate
from finetune.harness.resume import find_checkpoint, with_run_overrides
from finetune.harness.run_folder import RunFolder
from finetune.train import train

from .conftest import compose_config, run_cli, start_cli, tiny_overrides, without


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload(marker)}, path)
    return path


def test_the_crafted_checkpoint_really_runs_its_payload_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)  # what the template must never do
    assert marker.exists()


@pytest.mark.parametrize("entry", ["resume", "ckpt_path"])
def test_resume_and_ckpt_path_never_unpickle_code(tmp_path, tiny_folder, entry):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "old" / "checkpoints" / "last.ckpt", marker)
    cfg = compose_config([f"{entry}={path}", "trainer.max_epochs=1"] + tiny_overrides(tiny_folder, tmp_path / "new"))
    with pytest.raises(ValueError, match=rf"Cannot read checkpoint '{path}'.*never unpickled"):
        train(cfg)
    assert not marker.exists()


def test_model_weights_never_unpickle_code(tmp_path, tiny_folder):
    marker = tmp_path / "marker"
    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    overrides = tiny_overrides(tiny_folder, tmp_path / "run") + [f"model.weights={path}", "trainer.max_epochs=1"]
    cfg = compose_config(overrides)
    assert cfg.model.weights == str(path)
    with pytest.raises(Exception, match=rf"Could not read weights file '{path}'"):
        train(cfg)
    assert not marker.exists()


def test_a_corrupt_interrupted_checkpoint_is_skipped_for_a_good_last_one(tmp_path, caplog):
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {}}, run.last_checkpoint)
    run.interrupted_checkpoint.write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="finetune.harness.resume"):
        assert find_checkpoint(run.path) == run.last_checkpoint
    assert f"skipping {run.interrupted_checkpoint}" in caplog.text


def test_a_corrupt_checkpoint_is_named_and_the_other_one_suggested(tmp_path, tiny_folder):
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {}}, run.checkpoints / "epoch03-val_acc0.9000.ckpt")
    run.last_checkpoint.write_bytes(b"\x00" * 100)
    cfg = compose_config([f"ckpt_path={run.last_checkpoint}"] + tiny_overrides(tiny_folder, tmp_path / "new"))
    with pytest.raises(ValueError, match=r"Cannot read checkpoint '.*last.ckpt'.*other checkpoint\(s\): .*epoch03"):
        train(cfg)


def test_resume_of_a_folder_without_hydra_record_says_so_first(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {}}, run.last_checkpoint)
    with pytest.raises(SystemExit) as stop:
        with_run_overrides(["train.py", f"resume={run.path}"])
    assert stop.value.code == 2
    assert re.search(r"^Error: resume=.*\.hydra/overrides.yaml does not exist.*ckpt_path=", capsys.readouterr().err)


def test_a_folder_is_claimed_by_exactly_one_of_many_concurrent_claims(tmp_path):
    folder = RunFolder(tmp_path / "run")
    outcomes: list[str] = []
    barrier = threading.Barrier(16)

    def claim() -> None:
        barrier.wait()
        try:
            folder.claim()
            outcomes.append("claimed")
        except FileExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["claimed"] + ["refused"] * 15


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _cli_overrides(tiny_folder: Path, run_dir: Path) -> list[str]:
    return without(tiny_overrides(tiny_folder, run_dir), "paths.") + [
        "trainer.fast_dev_run=true",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_a_refused_rerun_leaves_the_earlier_folder_byte_identical(tmp_path, tiny_folder):
    run_dir = tmp_path / "run"
    run_cli(_cli_overrides(tiny_folder, run_dir))
    before = _fingerprint(run_dir)
    assert {".hydra/overrides.yaml", "results.json", ".claim"} <= set(before)
    second = run_cli(_cli_overrides(tiny_folder, run_dir) + ["seed=7"], check=False)
    assert second.returncode == 2  # a user error: one Error: line, no traceback
    assert "Traceback" not in second.stderr
    assert f"Output folder '{run_dir}' already holds a run" in second.stderr
    assert _fingerprint(run_dir) == before


@pytest.mark.slow
def test_two_runs_started_at_once_into_one_folder_one_runs_and_the_other_refuses(tmp_path, tiny_folder):
    run_dir = tmp_path / "run"
    processes = [
        start_cli(_cli_overrides(tiny_folder, run_dir) + [f"seed={seed}"], stderr=subprocess.PIPE) for seed in (1, 2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], outputs
    refused = next(err for p, (_, err) in zip(processes, outputs, strict=True) if p.returncode == 2)
    assert "already holds a run" in refused
    winner = next(p for p in processes if p.returncode == 0)
    assert f"seed={(1, 2)[processes.index(winner)]}" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        ("optimizer=adamw", r"optimizer: 'torch.optim.sgd.SGD' in the checkpoint, 'torch.optim.adamw.AdamW' now"),
        ("scheduler=cosine", r"scheduler \(count\): 0 in the checkpoint, 1 now"),
        ("experiment=frozen", r"model.freeze: 'none' in the checkpoint, 'backbone' now"),
    ],
)
def test_resuming_into_a_different_setup_says_what_differs(tmp_path, tiny_folder, change, message):
    first = ["trainer.max_epochs=1", "trainer.limit_train_batches=1"] + tiny_overrides(tiny_folder, tmp_path / "a")
    train(compose_config(first))
    last = RunFolder(tmp_path / "a").last_checkpoint
    again = [f"ckpt_path={last}", "trainer.max_epochs=2"] + tiny_overrides(tiny_folder, tmp_path / "b") + [change]
    with pytest.raises(ValueError, match=rf"Cannot resume '{last}': it was saved by a different setup \(.*{message}"):
        train(compose_config(again))


def test_evaluate_never_writes_into_a_training_runs_folder(tmp_path, tiny_folder):
    run = tmp_path / "run"
    train(compose_config(["trainer.max_epochs=1", "trainer.limit_train_batches=1"] + tiny_overrides(tiny_folder, run)))
    before = _fingerprint(run)
    overrides = without(tiny_overrides(tiny_folder, run), "model.", "trainer.max_epochs")
    cfg = compose_config([f"ckpt_path={RunFolder(run).last_checkpoint}"] + overrides, config_name="eval")
    with pytest.raises(FileExistsError, match=rf"Output folder '{run}' already holds a run"):
        evaluate(cfg)
    assert _fingerprint(run) == before
