"""A backbone family of one tiny network, as a researcher would add one: ``build`` and ``preprocessing`` in a file,
and its prefix in ``finetune.backbones.FAMILIES`` (the tests add it there for the test's length)."""

from __future__ import annotations

from torch import nn

from finetune.backbones import new_head


def build(name: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str]:
    """``tiny/cnn``: two convolutions, pooled, and the new head (no pretrained weights exist)."""
    if name != "tiny/cnn" or pretrained:
        raise ValueError(f"the tiny family has only tiny/cnn, with random weights (asked: {name}, {pretrained=})")
    features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), new_head(16, num_classes))
    return model, "3"


def preprocessing(name: str, image_size: int | None = None) -> dict:
    size = image_size or 48
    return {
        "image_size": size,
        "resize_size": size + 8,
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "nearest",
    }
