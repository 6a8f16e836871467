"""Write streaming shards: ``python -m finetune.shards data=folder data.root=IMAGES output=SHARDS``.

The image folder is split as a run on it splits it (``data.split_seed``, ``data.val_fraction``,
``data.folds``/``data.fold``) and its images pass the same checks; each split's encoded image files go into LitData
chunks under ``SHARDS/{train,val,test}/`` and ``SHARDS/manifest.json`` records the classes, the split settings and
per split the counts and a digest of the file list (:func:`finetune.data.shards.write_shards`). Train on them with
``data=shards data.root=SHARDS``.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.data.loading import resolve_num_workers
from finetune.data.shards import ShardsDataModule, write_shards
from finetune.errors import SettingError
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.run import CONFIG_DIR, build_datamodule


def shards(cfg: DictConfig) -> dict[str, Any]:
    """Write ``cfg.data``'s image folder as shards into ``cfg.output``; return the manifest."""
    if str(cfg.data.get("_target_", "")).endswith(ShardsDataModule.__name__):
        raise SettingError(
            "finetune.shards writes shards from an image folder: use data=folder data.root=IMAGES (or data=hotdog), "
            "not data=shards."
        )
    if isinstance(cfg.overwrite, str) or not isinstance(cfg.overwrite, bool):
        raise SettingError(f"overwrite must be true or false, got {cfg.overwrite!r}.")
    images = build_datamodule(cfg)
    workers = max(1, resolve_num_workers(cfg.num_workers))
    manifest = write_shards(images, cfg.output, bool(cfg.overwrite), cfg.chunk_bytes, workers)
    counts = ", ".join(f"{split} {record['count']}" for split, record in manifest["splits"].items())
    tell(f"Wrote shards of {len(manifest['classes'])} classes ({counts} images) to {cfg.output}")
    return manifest


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="shards")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    shards(cfg)


if __name__ == "__main__":
    main()
