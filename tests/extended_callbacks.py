"""A recipe extra as a researcher adds one (``src/finetune/callbacks/<name>.py``): a Lightning callback that checks its
own settings in ``check_settings(node, cfg)``. ``tests/test_extending.py`` names it in a ``conf/callbacks/`` file of
its own instead of adding one to the package."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from finetune.checks import check_number


class ShrinkHead(pl.Callback):
    """The head's weight multiplied by ``factor`` after every optimizer step: a crude weight decay of the head alone."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    @staticmethod
    def check_settings(node: DictConfig, cfg: DictConfig) -> None:
        """Called by the assembly before any data is read."""
        factor = node.get("factor")
        check_number("callbacks.shrink_head.factor", factor, "in [0, 1]", lambda x: 0 <= x <= 1, "e.g. 0.5.")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch, idx) -> None:
        with torch.no_grad():
            pl_module.net.get_submodule(pl_module.head_name).weight.mul_(self.factor)
