"""Checks of an image folder before training: every image decodes (``data.verify_images``, ``data.skip_corrupt``),
and byte-identical images across splits or classes are named (``data.duplicates``)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune.data.download import file_digest
from finetune.data.images import load_rgb, preview, printable
from finetune.errors import DataError
from finetune.progress import track

log = logging.getLogger(__name__)

# data.duplicates: what byte-identical images across train/test or across classes do (within a class: a warning).
DUPLICATES = ("warn", "refuse", "ignore")


def find_corrupt_images(paths: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """``{path: reason}`` for the images :func:`load_rgb` cannot read (corrupt, truncated, not an image, odd mode).

    Every image is decoded once; JPEGs at 1/8 scale (``draft``), which still reads the whole file, so a
    truncated one is caught. Decoding releases the GIL, so a few threads share the work.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(
            track(pool.map(_image_problem, paths), total=len(paths), description="Checking images", unit="images")
        )
    return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason}


def corrupt_images(split_dir: Path, by_class: dict[str, list[str]], verify: bool, skip: bool) -> dict[str, str]:
    """``{path: reason}`` of the split's images that do not decode (none unchecked with ``verify=False``).

    Raises naming them, unless ``skip`` (``data.skip_corrupt``): then warns, and raises only for an emptied class.
    """
    paths = [path for images in by_class.values() for path in images]
    corrupt = find_corrupt_images(paths) if verify else {}
    if corrupt:
        listing = preview([f"{path} ({reason})" for path, reason in sorted(corrupt.items())], limit=10)
        if not skip:
            raise DataError(
                f"{len(corrupt)} corrupt or truncated image(s) in {str(split_dir)!r}: {listing}. "
                "Replace or delete them, or pass data.skip_corrupt=true to train without them."
            )
        emptied = [name for name, images in by_class.items() if all(path in corrupt for path in images)]
        if emptied:
            raise DataError(f"Every image of class(es) {emptied} in {str(split_dir)!r} is corrupt.")
        log.warning("Skipping %d corrupt or truncated image(s) (data.skip_corrupt=true): %s", len(corrupt), listing)
    return corrupt


def find_duplicates(
    layout: dict[str, dict[str, list[str]]], workers: int | None = None
) -> list[list[tuple[str, str, str]]]:
    """Groups of byte-identical images in ``{split: {class: [paths]}}``, each a sorted list of ``(split, class,
    path)``. Only files that share their size with another are read (and hashed), so a folder of distinct photos
    costs one ``stat`` per file."""
    by_size: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
    for split, classes in layout.items():
        for name, paths in classes.items():
            for path in paths:
                try:
                    by_size[os.path.getsize(path)].append((split, name, path))
                except OSError:
                    continue  # gone or unreadable: the image check names it
    candidates = [entry for same_size in by_size.values() if len(same_size) > 1 for entry in same_size]
    if not candidates:
        return []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_content_digest, [path for _, _, path in candidates]))
    same: dict[tuple[int, str], list[tuple[str, str, str]]] = defaultdict(list)
    for entry, digest in zip(candidates, digests, strict=True):
        if digest is not None:
            same[(os.path.getsize(entry[2]), digest)].append(entry)
    return sorted(sorted(group) for group in same.values() if len(group) > 1)


def _content_digest(path: str) -> str | None:
    try:
        return file_digest(path, "sha1")
    except OSError:
        return None


def report_duplicates(groups: list[list[tuple[str, str, str]]], root: Path, policy: str) -> None:
    """Warn about byte-identical images, naming the files (relative to ``root``); with ``policy="refuse"``
    (``data.duplicates``) a test image that is also in train, or an image in two classes, is an error instead.

    A copy within one class (same split) is only ever a warning: it counts twice, and in train its copies can land
    on both sides of the train/val split.
    """
    if policy == "ignore" or not groups:
        return
    conflicts, leaks, repeats = [], [], []
    for group in groups:
        splits, classes = {split for split, _, _ in group}, {name for _, name, _ in group}
        listing = " == ".join(os.path.relpath(path, root) for _, _, path in group)
        (conflicts if len(classes) > 1 else leaks if len(splits) > 1 else repeats).append(listing)
    problems = []
    if leaks:
        problems.append(
            f"{len(leaks)} test image(s) are byte-identical copies of training images, so the test score is "
            f"partly measured on images the model trained on: {preview(leaks, limit=10, sep='; ')}."
        )
    if conflicts:
        problems.append(
            f"{len(conflicts)} image(s) are in more than one class (the same file under different labels): "
            f"{preview(conflicts, limit=10, sep='; ')}."
        )
    if problems and policy == "refuse":
        raise DataError(
            f"Duplicate images in {printable(root)!r}: {' '.join(problems)} Delete the copies that do not belong "
            "(each image in one class of one split), or set data.duplicates=warn to go on with a warning."
        )
    for problem in problems:
        log.warning("%s Delete the copies that do not belong (data.duplicates=refuse makes this an error).", problem)
    if repeats:
        log.warning(
            "%d image(s) are stored more than once in the same class (they count twice, and in train the copies can "
            "land in both the training and the validation split): %s.",
            len(repeats),
            preview(repeats, limit=10, sep="; "),
        )


def _image_problem(path: str) -> str | None:
    try:
        load_rgb(path, draft=True)
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(err).__name__}: {err}"
    return None
