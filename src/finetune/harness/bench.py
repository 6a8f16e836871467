"""What the scripts under ``scripts/`` share: the machine a figure came from, their common overrides, a timed window.

Here rather than beside the scripts because the tests load each script from its file, where a sibling module would
not import. A run's own speed is :class:`finetune.harness.throughput.Throughput` (``+callbacks=throughput``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from finetune.harness.results import environment
from finetune.harness.throughput import read_clock

# machine() key -> distribution name in environment()["versions"]
VERSION_KEYS = {"python": "python", "torch": "torch", "torchvision": "torchvision", "lightning": "pytorch-lightning"}


def machine(device: str = "cpu") -> dict[str, Any]:
    """What produced a figure: CPU, cores, load, versions and git commit (:func:`finetune.harness.results.environment`);
    with ``device="cuda"`` also the first GPU's name (``gpu``), the GPU count (``gpus``) and CUDA's version."""
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"os": platform.platform(), "cpu": cpu, "cpus": os.cpu_count()}
    info["cpus_available"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["load_average"] = os.getloadavg()
    found = environment()
    info.update({key: found["versions"].get(name) for key, name in VERSION_KEYS.items()}, git=found["git"])
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def common_overrides(
    experiment: str,
    data: str | Path,
    backbone: str,
    weights: str | None,
    batch_size: int,
    num_workers: int | str,
    accelerator: str,
    output_dir: str | Path | None = None,
) -> list[str]:
    """The overrides every script's runs start from: an experiment on a class folder, quiet, no sanity check.

    Defined once so that the scripts measure the same template; each adds what its rows vary.
    """
    overrides = [f"experiment={experiment}", "data=folder", f"data.root={data}", f"data.batch_size={batch_size}"]
    overrides += [f"data.num_workers={num_workers}", f"model.backbone={backbone}", f"model.weights={weights or 'null'}"]
    overrides += [f"trainer.accelerator={accelerator}", "trainer.num_sanity_val_steps=0"]
    overrides += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    if output_dir is not None:
        overrides += [f"paths.output_dir={output_dir}", f"paths.log_dir={output_dir}/logs"]
    return overrides


class TimedBatches(pl.Callback):
    """``clock()`` around ``batches`` training batches after ``warmup`` ones (counted across epochs), then stop.

    Unlike :class:`~finetune.harness.throughput.Throughput`, which times whole epochs after warm-up epochs, this times
    a window of batches, as a benchmark's ``--warmup``/``--batches`` ask. The clock starts at the start of the first
    timed batch, or with ``include_first_wait`` at the end of the last warm-up batch (so that the wait for the
    first timed batch, its loading and device augmentation, counts too); the device is synchronised before each
    reading. ``images`` counts the timed batches' targets; ``threads`` is torch's thread count as the window opened.
    """

    def __init__(
        self, warmup: int, batches: int, clock: Callable[[], Any] = time.perf_counter, include_first_wait: bool = False
    ) -> None:
        self.warmup, self.batches, self.clock = warmup, batches, clock
        self.include_first_wait = include_first_wait
        self.start: Any = None
        self.end: Any = None
        self.seen = self.images = 0
        self.threads: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.seen == self.warmup and not self.include_first_wait:
            self._open(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.images += len(batch[-1])  # the targets: (images, targets) after any device augmentation
        if self.seen == self.warmup and self.include_first_wait:
            self._open(pl_module)
        elif self.seen == self.warmup + self.batches:
            self.end = read_clock(pl_module, self.clock)
            trainer.should_stop = True

    @property
    def seconds(self) -> float | None:
        """The window's wall seconds, with the default clock; ``None`` until it closed."""
        return None if self.end is None else self.end - self.start

    def _open(self, pl_module: pl.LightningModule) -> None:
        self.start, self.threads = read_clock(pl_module, self.clock), torch.get_num_threads()
