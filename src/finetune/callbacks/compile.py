"""``torch.compile`` the network: ``+callbacks=compile``.

``nn.Module.compile`` compiles ``net`` in place, so the state_dict keys stay those of ``net`` and checkpoints load
uncompiled. Compiling is lazy: where torch.compile is refused at once, or fails on the first steps, the run says so
once and runs eagerly. A head trained on cached features (``features=cached``) is not worth compiling.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from finetune.features import FeatureCacheDataModule
from finetune.harness.private import COMPILE_ERRORS, run_eagerly
from finetune.scoring import Scorer

log = logging.getLogger(__name__)


class Compile(pl.Callback):
    recipe = False  # how the network runs, not what it computes: a resume may add or drop it

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pl_module.model if isinstance(pl_module, Scorer) else pl_module  # testing: the model it scores
        datamodule = trainer.datamodule
        if isinstance(datamodule, FeatureCacheDataModule) and not datamodule.staged:
            log.info("callbacks.compile with features=cached: the backbone runs once per split, uncompiled.")
        elif not getattr(model, "compiled", False):
            compile_network(model)


def compile_network(model: pl.LightningModule) -> bool:
    """Compile ``model.net`` in place; ``model`` then calls it through a guard that falls back to eager once."""
    try:
        model.net.compile()
    except Exception as err:  # noqa: BLE001 - e.g. "Dynamo is not supported on Python 3.x", or Windows
        run_eagerly(model.net)
        model.compiled = False
        _say_uncompiled(err)
        return False
    forward = type(model).forward.__get__(model)  # the class's forward, which calls the compiled net

    def guarded(inputs: torch.Tensor) -> torch.Tensor:
        if model.compiled:
            try:
                return forward(inputs)
            except COMPILE_ERRORS as err:
                run_eagerly(model.net)
                model.compiled = False
                _say_uncompiled(err)
        return forward(inputs)

    model.forward = guarded
    model.compiled = True
    return True


def _say_uncompiled(err: BaseException) -> None:
    text = str(err).strip()
    log.warning(
        "callbacks.compile: torch.compile fails here (%s: %s); running uncompiled. Drop the compile callback to "
        "silence this.",
        type(err).__name__,
        text.splitlines()[0][:300] if text else "",
    )
