"""``data.image_size`` against a network: a size it cannot take is refused before any data is read, and one far
below its pretrained size gets a warning."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from finetune.errors import SettingError

log = logging.getLogger(__name__)


def check_input_size(net: nn.Module, backbone: str, image_size: int) -> None:
    """Refuse ``data.image_size`` when ``net`` cannot take ``image_size`` x ``image_size`` images: a ViT built for one
    size, or layers without padding that shrink a small image to nothing (AlexNet below 63 pixels, Inception v3
    below 75). One blank image goes through the network in eval mode before any data is read; otherwise the first
    batch would fail with torch's message, which names no setting. Every module's mode is put back as it was.
    Call it before compiling ``net``.
    """
    parameter = next(net.parameters(), None)
    blank = torch.zeros(1, 3, image_size, image_size, device=parameter.device if parameter is not None else None)
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            net(blank if parameter is None else blank.to(parameter.dtype))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError) as err:
        from finetune.backbones import preprocessing  # the family that builds it

        pretrained = preprocessing(backbone)["image_size"]
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError(
            f"data.image_size={image_size}: {backbone} cannot take {image_size}x{image_size} images ({reason}). Use "
            f"its pretrained size, data.image_size={pretrained} (or null), or another size it takes."
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training


def check_pretrained_size(image_size: int, backbone: str, weights: Any, pretrained_size: int) -> None:
    """Warn when pretrained weights will see crops under half the size they were pretrained at.

    A fine-tuned network adapts to a moderately different resolution, but under half of it every object appears at
    under half the scale the pretrained filters learnt, and a stride-32 network's last map shrinks from 7x7 (224)
    to 4x4 or less, and the transfer from pretraining weakens: a linear probe of frozen ImageNet MobileNetV2 features
    on the Kaggle hot dog photos (500 test images) scored 0.884 at 224, 0.882 at 160, 0.846 at 112, 0.790 at 64 and
    0.708 at 32. Small crops can be the point of an experiment (speed), hence a warning, not an error. Random
    weights (``model.weights=null``) have no size of their own.
    """
    if weights is not None and image_size * 2 < pretrained_size:
        log.warning(
            "data.image_size=%d is under half the size %s's pretrained weights were trained at (%d): they see every "
            "object at under half the scale they learnt, and transfer less. Use data.image_size=null (%d), or at "
            "least %d, unless small crops are the point.",
            image_size,
            backbone,
            pretrained_size,
            pretrained_size,
            (pretrained_size + 1) // 2,
        )
