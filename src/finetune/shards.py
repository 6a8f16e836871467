"""Write streaming shards: ``python -m finetune.shards data=folder data.root=IMAGES output=SHARDS``.

The image folder is split as a run on it splits it (``data.split_seed``, ``data.val_fraction``,
``data.folds``/``data.fold``) and its images pass the same checks; each split's encoded image files go into LitData
chunks under ``SHARDS/{train,val,test}/`` and ``SHARDS/manifest.json`` records the classes, the split settings and
per split the counts and a digest of the file list (:func:`finetune.data.shards.write_shards`). Train on them with
``data=shards data.root=SHARDS``.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.data.loading import resolve_num_workers
from finetune.data.shards import ShardsDataModule, write_shards
from finetune.errors import SettingError
from finetune.harness import private
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.writable import check_apart, check_writable
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
    check_apart({f"output={cfg.output}": cfg.output}, {f"data.root={cfg.data.root}": cfg.data.root})
    if "://" not in str(cfg.output):  # a URI is refused by name in write_shards
        check_writable(cfg.output, "output")  # a file in its path, or a read-only folder: said before the work
    images = build_datamodule(cfg)
    workers = max(1, resolve_num_workers(cfg.num_workers))
    with private.litdata_interruptible():  # Ctrl+C: nothing written, exit code 130 (LitData's own: exit code 0)
        manifest = write_shards(images, cfg.output, bool(cfg.overwrite), cfg.chunk_bytes, workers)
    counts = ", ".join(f"{split} {record['count']}" for split, record in manifest["splits"].items())
    tell(f"Wrote shards of {len(manifest['classes'])} classes ({counts} images) to {cfg.output}")
    return manifest


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="shards")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    try:
        shards(cfg)
    except KeyboardInterrupt:
        print(f"Interrupted: nothing was written to {cfg.output} (shards appear whole or not at all).", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
