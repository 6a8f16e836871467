"""Helpers for the tests of trained-model use: a tiny trained run, a hand-built classifier, configs, subprocesses."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.transforms import CLASSES, PREPROCESSING, Preprocessing, eval_transform
from finetune.features import head_input
from finetune.module import FineTuneModule
from finetune.train import train

from .conftest import compose_config, make_image_folder, run_cli, tiny_overrides

IMAGE_SIZE, RESIZE_SIZE = 32, 36
_TRAINED: dict[str, dict] = {}


def trained_run(
    tmp_path_factory: pytest.TempPathFactory, cache_features: bool = False, eval_resize: str = "square"
) -> dict:
    """A 2-epoch run on a tiny cat/dog folder (once per session): its results, plus ``root`` (the data).

    The learning rate is low enough that the probabilities stay away from 0 and 1 (so comparisons mean something).
    """
    key = ("frozen" if cache_features else "finetune") + ("" if eval_resize == "square" else f"_{eval_resize}")
    if key not in _TRAINED:
        root = make_image_folder(tmp_path_factory.mktemp("data"), n_train=10, n_test=4)
        out = tmp_path_factory.mktemp(f"run_{key}")
        extra = ["experiment=frozen", "features=cached", "data.augmentation=null"] if cache_features else []
        extra.append(f"data.eval_resize={eval_resize}")
        overrides = ["trainer.max_epochs=2", "optimizer.lr=0.002", "model.head_lr_mult=1", *extra]
        results = train(compose_config(overrides + tiny_overrides(root, out)))
        assert results["status"] == "completed", results.get("error")
        _TRAINED[key] = {**results, "root": root}
    return _TRAINED[key]


def predict_config(ckpt: Path, inputs: str | Path, output_dir: Path, *extra: str):
    overrides = [
        f"ckpt_path={ckpt}",
        f"inputs={inputs}",
        f"paths.output_dir={output_dir}",
        "num_workers=0",
        "batch_size=3",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    return compose_config(overrides, config_name="predict")


def eval_config(ckpt: Path, root: Path, output_dir: Path, *extra: str):
    overrides = [
        "data=folder",
        f"data.root={root}",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"ckpt_path={ckpt}",
        f"paths.output_dir={output_dir}",
        *extra,
    ]
    return compose_config(overrides, config_name="eval")


# --- a classifier whose every prediction is chosen by hand ------------------------------------------------------
def flat_colour_folder(root: Path, test_counts: dict[str, int], seed: int = 0) -> list[Path]:
    """``root/{train,test}/<class>/`` of flat-colour images (one per class in train); the test images, in order."""
    rng = np.random.default_rng(seed)
    test_images = []
    for split, counts in (("train", dict.fromkeys(test_counts, 1)), ("test", test_counts)):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = rng.integers(0, 256, size=3, dtype=np.uint8)
                path = root / split / name / f"{name}_{i:02d}.png"
                Image.fromarray(np.broadcast_to(colour, (36 + i, 40, 3)).copy()).save(path)
                if split == "test":
                    test_images.append(path)
    return test_images


def hand_built_checkpoint(path: Path, classes: list[str], images: list[Path], logits: torch.Tensor) -> Path:
    """A ResNet-18 checkpoint whose head is solved so that ``images`` (through the eval transform) give ``logits``.

    The random backbone's features of the few images are linearly independent, so a least-squares head reproduces
    the chosen logits to ~1e-5: every prediction and probability of the test is known in advance.
    """
    torch.manual_seed(0)
    model = FineTuneModule(num_classes=len(classes), backbone="resnet18", weights=None).eval()
    transform = eval_transform(IMAGE_SIZE, RESIZE_SIZE)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        features = head_input(model.net, model.head_name, batch).double()
        weight = torch.linalg.lstsq(features, logits.double()).solution.T
        model.net.fc.weight.copy_(weight.float())
        model.net.fc.bias.zero_()
        got = model(batch)
    assert torch.allclose(got, logits.float(), atol=1e-3), (got - logits).abs().max()
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        CLASSES: classes,
        PREPROCESSING: Preprocessing.of(IMAGE_SIZE, RESIZE_SIZE).to_dict(),
    }
    torch.save(checkpoint, path)
    return path


# --- processes, files -----------------------------------------------------------------------------------------
def run_module(module: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository, this checkout's sources first (outcome not checked)."""
    return run_cli(args, timeout=timeout, check=False, module=module)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class Evil:
    """A pickle payload: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 2}, "payload": Evil(marker)}, path)
    return path
