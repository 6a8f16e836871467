"""A device out-of-memory error names the batch size and the settings that need less memory."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from finetune.module import FineTuneModule
from finetune.run import assemble
from finetune.train import train

from .conftest import compose_config, tiny_overrides

ALLOCATION = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _raise_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(ALLOCATION)


def test_out_of_memory_in_the_forward_pass_is_explained_in_the_runs_results(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(FineTuneModule, "forward", _raise_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train(compose_config(tiny_overrides(tiny_folder, tmp_path / "run") + ["trainer.max_epochs=1"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"
    error = results["error"]
    assert error.startswith("OutOfMemoryError: " + ALLOCATION)  # the original message first
    assert "a batch of 4 images per device (data.batch_size)" in error
    for advice in ("data.batch_size=2 trainer.accumulate_grad_batches=2", "trainer.precision=bf16-mixed"):
        assert advice in error
    assert "+callbacks=channels_last" in error


def test_out_of_memory_in_the_backward_pass_is_explained_once(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(pl.LightningModule, "backward", _raise_out_of_memory)
    overrides = tiny_overrides(tiny_folder, tmp_path / "run")
    overrides += ["trainer.max_epochs=1", "trainer.precision=bf16-mixed", "+callbacks=channels_last"]
    overrides += ["trainer.accumulate_grad_batches=2"]
    run = assemble(compose_config(overrides))
    with pytest.raises(torch.OutOfMemoryError) as raised:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    message = str(raised.value)
    assert message.count("Out of device memory") == 1
    assert "precision bf16-mixed" in message and "data.batch_size=2 trainer.accumulate_grad_batches=4" in message
    # Settings already in use are not suggested again.
    assert "- trainer.precision=bf16-mixed" not in message and "- +callbacks=channels_last" not in message
    assert message.startswith(ALLOCATION)  # the original message first, the advice after it
