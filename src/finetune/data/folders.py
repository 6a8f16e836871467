"""The image folder on disk: ``train/<class>/`` and ``test/<class>/`` (or, to evaluate, ``<class>/`` alone), its
class folders and their images; files that are no images, images outside a class, and run folders are named."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.data.images import is_image_file, preview, printable
from finetune.errors import DataError, PathError

log = logging.getLogger(__name__)

# What marks a run's folder (finetune.harness.run_folder spells these; the data code does not import the harness):
# a run written inside the data (hydra.run.dir=D/train/hot_dog/run1) is skipped, never read as images of a class.
RUN_FOLDER_MARKERS = (".hydra", ".claim", "results.json", "eval_results.json")


def scan_image_folder(root: Path, require_test: bool = True) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """``{split: {class: [image paths]}}`` for ``train`` and ``test``, and the non-image files found beside them.

    Raises with the folder to fix when a split is missing, holds no class folders, has a class folder without
    images, or when train and test do not have the same classes. ``require_test=False`` (a run that never tests):
    a missing ``test/`` is fine, and the result has ``train`` alone; a ``test/`` that is there is still checked.
    """
    found: dict[str, dict[str, list[str]]] = {}
    others: list[str] = []
    for split in ("train", "test"):
        split_dir = root / split
        if split == "test" and not require_test and not split_dir.exists():
            break
        if not split_dir.is_dir():
            kind = "a file, not a folder" if split_dir.exists() else "missing"
            without_test = " (or train without a test split: test_after_fit=false)" if split == "test" else ""
            raise PathError(
                f"{str(root)!r} has no {split}/ folder ({split}/ is {kind}). The dataset folder must hold "
                f"train/<class>/ and test/<class>/ image folders{without_test}; found "
                f"{sorted(p.name for p in root.iterdir())}."
            )
        found[split] = _scan_classes(split_dir, f"{split}/", others, "both train/ and test/")
    if "test" in found and sorted(found["train"]) != sorted(found["test"]):
        raise DataError(
            f"Train and test classes differ in {str(root)!r}: train {sorted(found['train'])}, "
            f"test {sorted(found['test'])}. Both splits need the same class folders."
        )
    return found, others


def evaluation_folder(root: Path) -> Path:
    """The folder of class folders that evaluation scores: ``root/test`` when there is one, else ``root`` itself
    (a plain ``<class>/<image>`` folder). A ``root`` with ``train/`` but no ``test/`` is refused."""
    if (root / "test").is_dir():
        return root / "test"
    if (root / "train").is_dir():
        raise PathError(
            f"{str(root)!r} has a train/ folder but no test/ folder to evaluate on. Evaluate a folder holding "
            "test/<class>/<image>, or one holding <class>/<image> directly."
        )
    return root


def scan_test_folder(root: Path) -> tuple[dict[str, list[str]], list[str], Path]:
    """``({class: [image paths]}, non-image files, the folder scanned)`` of the images evaluation scores:
    ``root/test/<class>/`` or ``root/<class>/`` (:func:`evaluation_folder`); no ``train/`` needed."""
    folder = evaluation_folder(root)
    others: list[str] = []
    layout = "test/" if folder != root else ""
    return _scan_classes(folder, layout, others, "that folder"), others, folder


def _scan_classes(split_dir: Path, layout: str, others: list[str], delete_from: str) -> dict[str, list[str]]:
    """``{class: [image paths]}`` of ``split_dir``'s class folders (sorted, recursive); non-images go to ``others``.

    ``layout`` is how the class folders are spelled in messages (``"train/"``, or ``""`` for ``<class>/``).
    """
    runs: list[str] = []  # run folders found among the class folders or inside them: skipped
    classes = []
    loose = []  # files beside the class folders: in no class
    for entry in sorted(os.scandir(split_dir), key=lambda entry: entry.name):
        if entry.is_dir():
            if is_run_folder(entry.path):
                runs.append(entry.path)
            else:
                classes.append(entry.name)
        else:
            loose.append(entry.name)
    if not classes and runs:
        raise DataError(
            f"{str(split_dir)!r} holds no class folders, only the output of earlier runs ({preview(runs)}). Move "
            f"those run folders out of the data, and put each class's images in {layout}<class>/<image>."
        )
    if not classes:
        raise DataError(
            f"{str(split_dir)!r} holds no class folders (it holds {preview(loose)}). Put each class's images "
            f"in a folder of its own: {layout}<class>/<image>, e.g. {layout}hot_dog/1.jpg."
        )
    # Files beside the class folders belong to no class: images among them are named on their own (they look like
    # data but are not used), the rest join the non-image files that the caller reports.
    stray = [name for name in loose if is_image_file(name)]
    others += [os.path.join(split_dir, name) for name in loose if not is_image_file(name)]
    if stray:
        log.warning(
            "Ignoring %d image(s) directly in %s, outside the class folders: they belong to no class, so they are "
            "not used: %s. Move each into %s<class>/, or delete them.",
            len(stray),
            printable(split_dir),
            preview(stray),
            layout,
        )
    same = defaultdict(list)
    for name in classes:
        same[name.casefold()].append(name)
    for names in (names for names in same.values() if len(names) > 1):
        log.warning(
            "Class folders %s in %s differ only in case: they are separate classes. If they are one class, merge "
            "them into one folder.",
            " and ".join(repr(name) for name in names),
            printable(split_dir),
        )
    found: dict[str, list[str]] = {}
    for name in classes:
        images = []
        for folder, files in _walk(os.path.join(split_dir, name), runs):
            for file in sorted(files):
                path = os.path.join(folder, file)  # the same string ImageFolder builds
                (images if is_image_file(path) else others).append(path)
        if not images:
            raise DataError(
                f"Class folder {os.path.join(split_dir, name)!r} holds no images (files ending in "
                f"{', '.join(IMG_EXTENSIONS)}). Add its images, or delete the folder from {delete_from}."
            )
        found[name] = images
    if runs:
        log.warning(
            "Skipping %d run folder(s) inside the data, whose figures would otherwise be read as images of a "
            "class: %s. Move them out of data.root (runs go to paths.log_dir/runs/ unless hydra.run.dir says "
            "otherwise).",
            len(runs),
            preview(runs),
        )
    return found


def _walk(top: str, runs: list[str]) -> list[tuple[str, list[str]]]:
    """``(folder, files)`` of ``sorted(os.walk(top))`` (ImageFolder's order, links followed), without the run
    folders inside (added to ``runs``): their checkpoints, figures and logs are not images of the class."""
    walked = []
    for folder, subfolders, files in os.walk(top, followlinks=True):
        if is_run_folder(folder):
            runs.append(folder)
            subfolders.clear()
            continue
        walked.append((folder, files))
    return sorted(walked)


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a run's output (it holds :data:`RUN_FOLDER_MARKERS`), not a folder of images."""
    return any(os.path.lexists(os.path.join(folder, marker)) for marker in RUN_FOLDER_MARKERS)
