"""The recipes under DDP (2 CPU processes, gloo): after the unfreeze the backbone trains as one across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from .conftest import make_image_folder, run_cli

DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


class RankWeights(pl.Callback):
    """Test-only: every rank saves its parameters at the end of every training epoch."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().clone() for name, p in pl_module.net.named_parameters()}
        torch.save(weights, self.folder / f"epoch{trainer.current_epoch}_rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp"), n_train=10)


def common(data: Path, log_dir: Path) -> list[str]:
    return [
        "data=folder",
        f"data.root={data}",
        "data.image_size=32",
        "data.resize_size=36",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_fraction=0.2",
        "model.weights=null",
        "model.backbone=mobilenet_v3_small",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
        f"paths.log_dir={log_dir}",
    ]


@pytest.mark.slow
def test_after_the_unfreeze_every_rank_trains_the_same_backbone(tmp_path, data):
    """Cached-feature epochs (the backbone outside the graph), then image epochs, EMA on: DDP must sync it all."""
    weights = tmp_path / "weights"
    run_cli(
        module="finetune.train",
        timeout=900,
        args=[
            *DDP,
            "+callbacks=[unfreeze,ema]",
            "callbacks.unfreeze.epoch=1",
            "features=cached",
            "callbacks.ema.decay=0.9",
            "optimizer.momentum=0.9",
            "trainer.max_epochs=2",
            "+callbacks.rank_weights._target_=tests.test_recipes_ddp.RankWeights",
            f"+callbacks.rank_weights.folder={weights}",
        ]
        + common(data, tmp_path / "logs"),
    )
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["epochs"] == 2
    epochs = [[torch.load(weights / f"epoch{e}_rank{r}.pt") for r in (0, 1)] for e in (0, 1)]
    for rank0, rank1 in epochs:
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), name  # one model, not one per rank
    head = {n for n in epochs[0][0] if n.startswith("classifier.3.")}
    moved = [n for n in epochs[0][0] if n not in head and not torch.equal(epochs[0][0][n], epochs[1][0][n])]
    assert len(moved) > 10  # the backbone did train after the unfreeze (and ranks still agree)


@pytest.mark.slow
def test_lr_find_under_ddp_keeps_the_ratio_and_writes_one_result(tmp_path, data):
    done = run_cli(
        module="finetune.lr_find",
        timeout=900,
        args=[*DDP, "lr_find.num_training=14", "lr_find.early_stop_threshold=null"] + common(data, tmp_path),
    )
    (folder,) = (tmp_path / "lr_find").iterdir()
    result = json.loads((folder / "lr_find.json").read_text())
    assert len(result["steps"]) == 14
    for step in result["steps"]:
        assert step["groups"]["head"] == pytest.approx(10 * step["groups"]["backbone"], rel=1e-12)
    assert done.stdout.count("Suggested learning rate") == 1  # printed by rank 0 only
