"""Shared fixtures: tiny generated image folders, Hydra composition, and the real data in ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"
KAGGLE_HOTDOG = SHARED / "data" / "hotdog-kaggle"
MOBILENET_V2_WEIGHTS = SHARED / "weights" / "mobilenet_v2-imagenet-features.pth"


def make_image_folder(root: Path, classes=("cat", "dog"), n_train: int = 10, n_test: int = 4, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/*.png``: noise images whose mean colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 128, size=(36 + i % 5, 40, 3), dtype=np.uint8)
                pixels[..., index % 3] += 120
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


def tiny_overrides(root: Path, output_dir: Path) -> list[str]:
    """Overrides that make any experiment run in seconds on the CPU."""
    return [
        "data=folder",
        f"data.root={root}",
        "data.image_size=32",
        "data.resize_size=36",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_fraction=0.2",
        "model.weights=null",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
        f"paths.output_dir={output_dir}",
        f"paths.log_dir={output_dir}/logs",
    ]


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose like ``python -m finetune.train`` would, with Hydra's own config set for interpolations."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # the run itself never sees Hydra's node, as under @hydra.main
    return cfg


def needs_shared(*paths: Path):
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"real data/weights not found: {', '.join(missing)}")
