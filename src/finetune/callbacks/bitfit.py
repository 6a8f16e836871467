"""BitFit: only the backbone's biases and norms train, with the new head: ``+callbacks=bitfit``.

When fitting starts (``setup("fit")``, before the optimizer is built) every other backbone weight stops requiring a
gradient; the trained parameters stay in the backbone's group(s), so ``optimizer.lr``, ``model.head_lr_mult``,
``model.groups`` and ``callbacks.unfreeze`` apply to them. Norms are the parameters of BatchNorm, LayerNorm, GroupNorm
and like layers (:func:`finetune.param_groups.norm_and_bias_names`, the rule ``model.groups.norm_bias_weight_decay``
uses too). BatchNorm statistics still follow the data, as in fine-tuning. Nothing changes in the network's structure:
checkpoints are the plain model's.
"""

from __future__ import annotations

import pytorch_lightning as pl
from omegaconf import DictConfig

from finetune.errors import SettingError
from finetune.param_groups import norm_and_bias_names


class BitFit(pl.Callback):
    """Freezes every backbone parameter but the biases and the norms' for the fit."""

    defines_trainable = True  # which parameters train: finetune.lr_find keeps it

    def __init__(self) -> None:
        self.frozen: list = []

    @staticmethod
    def check_settings(node: DictConfig, cfg: DictConfig) -> None:
        freeze = cfg.model.get("freeze") if cfg.get("model") else None
        if freeze not in (None, "none"):
            raise SettingError(
                f"callbacks.bitfit trains the backbone's biases and norms, but model.freeze={freeze!r} trains the "
                "head only: use model.freeze=none."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.frozen:
            return
        kept = norm_and_bias_names(pl_module.net)
        head = {id(p) for p in pl_module.head_parameters()}
        self.frozen = [
            p
            for name, p in pl_module.net.named_parameters()
            if id(p) not in head and name not in kept and p.requires_grad
        ]
        for param in self.frozen:
            param.requires_grad_(False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for param in self.frozen:
                param.requires_grad_(True)
            self.frozen = []
