"""Copy a run's validation split into a folder that ``finetune.evaluate`` can score, to choose on validation.

    python scripts/val_split_folder.py VAL data=folder data.root=PHOTOS [data.split_seed=... data.val_fraction=...]
    python -m finetune.evaluate ckpt_path=CKPT data=folder data.root=VAL tta=full

The split is the one ``finetune.train`` and ``finetune.soup`` use for the same data settings (the DataModule makes
it), so a setting that only evaluation has, such as ``tta=``, can be chosen on the photos a run selected on, never on
the test split. The photos are copied into ``VAL/test/<class>/``; an existing, non-empty ``VAL`` is refused.
``VAL/validation_split.json`` records where they came from (the data root and the split settings): the shift
benchmark on ``data.root=VAL`` keeps that record, and ``scripts/select_recipe.py`` ranks recipes only on such copies.

    python -m finetune.robustness ckpt_path=CKPT data=folder data.root=VAL split=test   # shifted validation photos
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, even where another copy is installed


def write_val_folder(output: Path, overrides: list[str]) -> int:
    """Copy the validation photos of the data the ``overrides`` describe into ``output/test/<class>/``; their count."""
    from finetune import atomic
    from finetune.data.splits import SPLIT_SETTINGS, VALIDATION_RECORD
    from finetune.errors import OverwriteError, SettingError
    from finetune.harness.writable import check_apart, check_writable
    from finetune.run import build_datamodule, compose_config

    cfg = compose_config(overrides)
    check_apart({f"the output folder {str(output)!r}": output}, {f"data.root={cfg.data.root}": cfg.data.root})
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OverwriteError(f"{str(output)!r} already exists and is not an empty folder: choose another output.")
    check_writable(output, "output")  # a read-only folder, or a file in its path: said before the copying
    images = build_datamodule(cfg)
    images.setup("fit")
    val = images.val_set
    if not hasattr(val, "indices"):  # data.cache wraps the split: copy from the folder, not from a cache
        raise SettingError("pass data.cache=none: the validation photos are copied from the folder.")
    for index in val.indices:
        path, target = val.dataset.samples[index]
        name = val.dataset.classes[target]
        within = Path(path).relative_to(Path(val.dataset.root) / name)  # a class's subfolders kept: no name clashes
        destination = output / "test" / name / within
        atomic.copy_file(path, destination)  # each photo whole or not at all
    record = {
        "data_root": str(Path(images.root).resolve()),
        **{key: images.hparams.get(key) for key in SPLIT_SETTINGS},
        "classes": list(val.dataset.classes),
        "images": len(val.indices),
    }
    atomic.write_json(output / VALIDATION_RECORD, record)  # last: a copy cut short has no record
    return len(val.indices)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="the folder to write (VAL/test/<class>/<photo>)")
    parser.add_argument("overrides", nargs="+", help="the runs' data settings, e.g. data=folder data.root=PHOTOS")
    args = parser.parse_args(argv)
    from finetune.errors import UserError

    try:
        count = write_val_folder(args.output, args.overrides)
    except UserError as error:  # a mistake: one line, exit code 2; a bug keeps its traceback
        parser.exit(2, f"Error: {error}\n")
    print(f"Copied {count} validation photos into {args.output.resolve() / 'test'}")


if __name__ == "__main__":
    main()
