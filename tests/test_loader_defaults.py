"""Loader settings that fit the machine: data.num_workers=auto by default, pinned memory only for CUDA devices."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from finetune.data import ImageFolderDataModule
from finetune.data.loading import available_cores, local_ranks, pin_memory, resolve_num_workers

from .conftest import compose_config


@pytest.fixture
def sixteen_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_auto_is_the_available_cores_shared_among_the_local_ranks(sixteen_cores, monkeypatch):
    assert available_cores() == 16
    assert resolve_num_workers("auto") == 16
    ddp = pl.Trainer(accelerator="cpu", devices=4, strategy="ddp", logger=False)  # no process starts before fit
    assert local_ranks(ddp) == 4 and resolve_num_workers("auto", ddp) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's word wins
    assert resolve_num_workers("auto", ddp) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert resolve_num_workers("auto") == 1  # never zero: at least one worker
    assert resolve_num_workers(3, ddp) == 3 and resolve_num_workers(0) == 0  # a number is taken as given


def test_the_default_config_says_auto_and_the_datamodule_resolves_it(sixteen_cores, tiny_folder):
    assert compose_config([])["data"]["num_workers"] == "auto"
    dm = ImageFolderDataModule(tiny_folder, image_size=32, batch_size=4)
    assert dm.hparams.num_workers == "auto" and dm.num_workers == 16
    dm.hparams.num_workers = 0  # keep this test free of worker processes
    dm.setup("fit")
    dm.hparams.num_workers = "auto"
    dm.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    loader = dm.val_dataloader()
    assert loader.num_workers == 8 and loader.persistent_workers
    assert not loader.pin_memory  # a CPU run never pins


def test_pinned_memory_follows_the_trainers_device():
    cuda = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert pin_memory(cuda) is True and pin_memory(cpu) is False
    assert pin_memory(None) == torch.cuda.is_available()


@pytest.mark.parametrize("value", ["many", -1, 2.5, True, None])
def test_a_bad_num_workers_is_refused_by_its_config_name(tiny_folder, value):
    with pytest.raises(ValueError, match=r"data\.num_workers must be an integer >= 0 .*or auto"):
        ImageFolderDataModule.check_settings({"root": tiny_folder, "num_workers": value})
