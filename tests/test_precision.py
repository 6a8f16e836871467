"""Mixed precision and channels_last through the template's own config keys, on the CPU."""

from __future__ import annotations

import json
import math

import pytorch_lightning as pl
import torch
from torch import nn

from finetune.callbacks.channels_last import ChannelsLast
from finetune.module import FineTuneModule
from finetune.train import train

from .conftest import assert_counted_accuracy, compose_config, count_correct, tiny_overrides


def _run(tmp_path, tiny_folder, extra: list[str]) -> dict:
    cfg = compose_config(
        ["experiment=finetune", "trainer.fast_dev_run=true", *extra, *count_correct(tmp_path / "counts.json")]
        + tiny_overrides(tiny_folder, tmp_path)
    )
    results = train(cfg)
    assert json.loads((tmp_path / "results.json").read_text())["test/loss"] == results["test/loss"]
    # fast_dev_run tests one batch of 4; the count uses the logits the test step computed (bfloat16 ones too)
    assert_counted_accuracy(results["test/acc"], json.loads((tmp_path / "counts.json").read_text())["test"], 4)
    return results


class Fitting(pl.Callback):
    """Test-only: ``Fitting.started`` once fitting starts (forwards before it, such as the check of data.image_size
    when the run is assembled, are not steps and run outside the trainer's precision)."""

    started = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Fitting.started = True


def test_bf16_mixed_trains_and_tests_in_bfloat16_on_cpu(tmp_path, tiny_folder):
    head_dtypes: list[torch.dtype] = []

    def record(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Linear) and Fitting.started:
            head_dtypes.append(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        fitting = "+callbacks.fitting._target_=tests.test_precision.Fitting"
        results = _run(tmp_path, tiny_folder, ["trainer.precision=bf16-mixed", fitting])
    finally:
        handle.remove()
        Fitting.started = False
    assert head_dtypes and set(head_dtypes) == {torch.bfloat16}  # autocast was on for train, val and test
    assert math.isfinite(results["test/loss"])  # test/acc: checked against its own count in _run
    assert math.isfinite(results["history"][0]["train/loss"])


def _pair() -> tuple[FineTuneModule, FineTuneModule]:
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        modules.append(FineTuneModule(num_classes=2, backbone="resnet18", weights=None))
    ChannelsLast().setup(None, modules[1], "fit")
    return modules[0], modules[1]


def test_channels_last_gives_the_same_outputs_and_gradients_as_contiguous():
    plain, fast = _pair()
    conv = fast.net.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([0, 1, 1, 0])
    outputs = {}
    for name, module in (("plain", plain), ("fast", fast)):
        logits = module(images)
        module.criterion(logits, targets).backward()
        outputs[name] = (logits.detach(), module.net.conv1.weight.grad, module.net.fc.weight.grad)
    for got, want in zip(outputs["fast"], outputs["plain"], strict=True):
        assert_close_to_scale(got, want)
    plain.eval(), fast.eval()
    assert_close_to_scale(fast(images), plain(images))


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-4) -> None:
    """Equal up to float32 rounding, measured against the tensor's scale.

    Another memory format picks other conv kernels, so the sums round differently. Through 18 layers the
    *contiguous* model itself is off its float64 twin by up to ~4e-5 of the largest value (gradients), and
    channels_last by ~8e-5; an elementwise rtol would fail on tiny entries for no reason.
    """
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * want.abs().max()


def test_channels_last_run_feeds_nhwc_batches_to_nhwc_weights(tmp_path, tiny_folder):
    formats: list[tuple[bool, bool]] = []

    def record(module: nn.Module, inputs) -> None:
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:  # the first convolution
            formats.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                            module.weight.is_contiguous(memory_format=torch.channels_last)))  # fmt: skip

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        results = _run(tmp_path, tiny_folder, ["+callbacks=channels_last"])
    finally:
        handle.remove()
    assert math.isfinite(results["test/loss"]) and results["epochs"] == 1
    # Before the fit, the image-size check sends one blank image through the plain network; from the fit on, every
    # batch (train, val and test) is NHWC and meets NHWC weights.
    start = formats.index((True, True))
    assert start <= 1 and len(formats) - start >= 3 and set(formats[start:]) == {(True, True)}
