"""LoRA: low-rank adapters train in place of the backbone's weights: ``+callbacks=lora callbacks.lora.rank=8``.

``pip install 'finetune[peft]'``. When fitting starts (``setup("fit")``, before the optimizer is built) the
``peft`` library wraps the backbone's layers in LoRA adapters: every ``nn.Linear`` and every 1x1 ``nn.Conv2d``
outside the head by default (a timm ViT's ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; a CNN's pointwise
convolutions), or the modules ``callbacks.lora.targets`` names. timm fuses a ViT's query, key and value projections
into one ``qkv`` Linear: its adapter is one rank-``rank`` update of all three, targeted as ``qkv`` (there are no
separate ``q_proj``/``v_proj`` modules to name). The adapters and the new head train; every other weight, norms
included, is frozen (BatchNorm statistics still follow the data, as in fine-tuning). The adapters train in the
backbone's group(s), so ``optimizer.lr``, ``model.head_lr_mult``, ``model.groups`` and ``callbacks.unfreeze`` apply
to them as to the backbone they adapt.

Checkpoints are the plain model's: ``state_dict`` holds the merged weights ``W + B A (alpha / rank)`` under the
network's own names, so evaluate, predict, export, calibrate and soups read a LoRA checkpoint like any other. What a
resume needs beside it (each adapted layer's frozen weights and its adapters, unmerged) is under ``lora_state``; a
resume restores them exactly. When fitting ends the adapters are merged into the network for good.

Weight averaging (``ema``, ``swa``) averages the wrapped network, whose checkpoints this callback would have to
merge in their stead: that pair is refused by name.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import StochasticWeightAveraging, WeightAveraging
from torch import nn

from finetune.checks import check_int, check_number, configured_callbacks
from finetune.errors import MissingPackageError, SettingError

STATE = "lora_state"  # the checkpoint's key for what a resume needs beside the merged weights
ADAPTER = "default"  # peft's name for the one adapter


class LoRA(pl.Callback):
    """Rank-``rank`` adapters (scaled by ``alpha / rank``; ``alpha`` null: ``rank``) on ``targets`` (null: every
    Linear and 1x1 convolution outside the head), with ``dropout`` on their input."""

    defines_trainable = True  # which parameters train: finetune.lr_find keeps it

    def __init__(
        self, rank: int = 8, alpha: float | None = None, dropout: float = 0.0, targets: list[str] | None = None
    ) -> None:
        _check(rank, alpha, dropout)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets = list(targets) if targets else None
        self.tuner: nn.Module | None = None

    @staticmethod
    def check_settings(node: DictConfig, cfg: DictConfig) -> None:
        """Its numbers, peft installed, a backbone that trains, no weight averaging beside it."""
        _check(node.get("rank"), node.get("alpha"), node.get("dropout", 0.0))
        if importlib.util.find_spec("peft") is None:
            raise MissingPackageError("callbacks.lora needs the peft package: pip install 'finetune[peft]'.")
        freeze = cfg.model.get("freeze") if cfg.get("model") else None
        if freeze not in (None, "none"):
            raise SettingError(
                f"callbacks.lora adapts the backbone, but model.freeze={freeze!r} trains the head only: use "
                "model.freeze=none (the adapters then train, the backbone's own weights stay frozen)."
            )
        averaging = configured_callbacks(cfg, (WeightAveraging, StochasticWeightAveraging))
        if averaging:
            raise SettingError(
                f"callbacks.lora cannot be combined with callbacks.{averaging[0]}: the average would be of the "
                "network wrapped in adapters, and its checkpoints would not hold merged weights. Drop one of them."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.tuner is not None:
            return
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        targets = self.targets or default_targets(pl_module.net, pl_module.head_name)
        if not targets:
            raise SettingError(
                f"callbacks.lora: model.backbone={pl_module.hparams.backbone} has no nn.Linear or 1x1 convolution "
                "outside its head to adapt. Name modules with callbacks.lora.targets, or use +callbacks=bitfit."
            )
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout, target_modules=targets
        )
        try:
            self.tuner = LoraModel(pl_module.net, config, ADAPTER)  # wraps the layers of net in place
        except ValueError as err:  # targets that match no module, or modules peft cannot adapt
            raise SettingError(f"callbacks.lora.targets={self.targets}: {err}") from None
        for param in pl_module.head_parameters():
            param.requires_grad_(True)  # peft leaves only the adapters trainable
        pl_module.strict_loading = False  # a resume's merged weights: on_load_checkpoint loads the unmerged ones

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        if self.tuner is None:
            return
        state = checkpoint["state_dict"]
        layers = lora_layers(pl_module)
        checkpoint[STATE] = {k: v for k, v in state.items() if _unmerged_key(k, layers)}
        checkpoint["state_dict"] = merged_state_dict(state, layers)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        if self.tuner is None:
            return
        if STATE not in checkpoint:
            raise SettingError(
                "callbacks.lora: this checkpoint holds no LoRA adapters (it was not trained with callbacks.lora), "
                "so it cannot be continued with them. Resume without callbacks.lora."
            )
        own = pl_module.state_dict()
        pl_module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k in own} | checkpoint[STATE])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.tuner is not None:
            self.tuner.merge_and_unload()  # the plain network, merged weights under their own names
            self.tuner = None
            pl_module.strict_loading = True


def _check(rank: Any, alpha: Any, dropout: Any) -> None:
    check_int("callbacks.lora.rank", rank, 1, "the rank of each adapter, e.g. 8")
    if alpha is not None:
        check_number("callbacks.lora.alpha", alpha, "> 0 or null", lambda x: x > 0, "Null scales by 1.")
    check_number("callbacks.lora.dropout", dropout, "in [0, 1)", lambda x: 0 <= x < 1, "0 is usual.")


def default_targets(net: nn.Module, head_name: str) -> list[str]:
    """The module names of every ``nn.Linear`` and 1x1 ``nn.Conv2d`` (not grouped) outside the head."""
    return [
        name
        for name, module in net.named_modules()
        if name != head_name
        and not name.startswith(f"{head_name}.")
        and (
            isinstance(module, nn.Linear)
            or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1)
        )
    ]


def lora_layers(pl_module: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers by their name in ``pl_module`` (``net.blocks.0.attn.qkv``)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in pl_module.named_modules() if isinstance(module, LoraLayer)}


def _unmerged_key(key: str, layers: dict[str, nn.Module]) -> bool:
    layer, _, rest = key.rpartition(".base_layer.")
    return (bool(layer) and layer in layers) or any(key.startswith(f"{name}.lora_") for name in layers)


@torch.no_grad()
def merged_state_dict(state: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``state`` (the wrapped network's) as the plain network's: each adapted layer's ``weight`` is its frozen weight
    plus its adapters' update (exactly what peft's merge computes), its other tensors under their own names, and the
    adapters themselves left out."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer, _, rest = key.rpartition(".base_layer.")
        if layer in layers:
            if rest == "weight":
                value = value + layers[layer].get_delta_weight(ADAPTER).to(value.dtype)
            merged[f"{layer}.{rest}"] = value
        elif not any(key.startswith(f"{name}.lora_") for name in layers):
            merged[key] = value
    return merged
