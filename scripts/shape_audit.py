#!/usr/bin/env python
"""Does a photo's shape give its class away? Counts of square, landscape and portrait photos per split and class.

    python scripts/shape_audit.py PATH [--json FILE]

PATH holds ``train/<class>/*`` and ``test/<class>/*`` (as ``data=folder data.root=PATH``). The book's eval
transform squashes every photo to a square, so a photo's shape shows up as distortion that a model can learn.
The "shape rule" below predicts each orientation's most common training class: its accuracy on train is what the
shape alone is worth on validation folds; on test (or on photos from elsewhere) it can be worth much less. Where
the rule beats the class prior by a wide margin, evaluate with ``data.eval_resize=shorter_side``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from finetune import atomic
from finetune.data.folders import scan_image_folder
from finetune.data.images import displayed_size

ORIENTATIONS = ("square", "landscape", "portrait")


def orientation(path: str) -> str:
    """``square`` | ``landscape`` | ``portrait`` from the image header (no decoding), as shown: EXIF orientation
    applied, as training reads the image."""
    with Image.open(path) as image:
        width, height = displayed_size(image)
    return "square" if width == height else "landscape" if width > height else "portrait"


def audit(root: Path) -> dict:
    """Per split and class, the orientation counts; the shape rule fitted on train and its accuracy on each split."""
    layout, _ = scan_image_folder(root)
    counts = {
        split: {name: dict(Counter(orientation(p) for p in paths)) for name, paths in classes.items()}
        for split, classes in layout.items()
    }
    train = counts["train"]
    rule = {
        shape: max(sorted(train), key=lambda name: train[name].get(shape, 0))
        for shape in ORIENTATIONS
        if any(train[name].get(shape, 0) for name in train)
    }
    report: dict = {"counts": counts, "rule": rule, "rule_accuracy": {}, "prior_accuracy": {}}
    for split, classes in counts.items():
        total = sum(sum(c.values()) for c in classes.values())
        right = sum(n for name, c in classes.items() for shape, n in c.items() if rule.get(shape) == name)
        report["rule_accuracy"][split] = right / total
        report["prior_accuracy"][split] = max(sum(c.values()) for c in classes.values()) / total
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder holding train/<class>/ and test/<class>/")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    try:
        report = audit(args.root)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| split | class | square | landscape | portrait |\n|---|---|---:|---:|---:|")
    for split, classes in report["counts"].items():
        for name, c in classes.items():
            print(f"| {split} | {name} | " + " | ".join(str(c.get(s, 0)) for s in ORIENTATIONS) + " |")
    print("\nshape rule (fitted on train): " + ", ".join(f"{s} -> {n}" for s, n in report["rule"].items()))
    for split in report["counts"]:
        print(
            f"{split}: the shape rule is right on {report['rule_accuracy'][split]:.3f} of the photos "
            f"(always guessing the largest class: {report['prior_accuracy'][split]:.3f})"
        )
    if args.json:
        atomic.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
