"""The image folder on disk: find the images, load them as 8-bit RGB, check that they load, split train into val
(a held-out fraction, or one of K stratified folds)."""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.data.download import file_digest
from finetune.errors import DataError, PathError
from finetune.progress import track

log = logging.getLogger(__name__)

# 16-bit grayscale, as PNG decodes it ("I" in Pillow versions before 10.x, "I;16" after).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF Orientation values that turn or mirror the stored pixels (1 is upright; 2-8 per the EXIF standard);
# 5-8 also swap width and height.
_ORIENTATION_TAG = 0x0112
_TURNING_ORIENTATIONS = range(2, 9)
_SWAPPING_ORIENTATIONS = range(5, 9)
# What marks a run's folder (finetune.harness.run_folder spells these; the data code does not import the harness):
# a run written inside the data (hydra.run.dir=D/train/hot_dog/run1) is skipped, never read as images of a class.
RUN_FOLDER_MARKERS = (".hydra", ".claim", "results.json", "eval_results.json")
# data.duplicates: what byte-identical images across train/test or across classes do (within a class: a warning).
DUPLICATES = ("warn", "refuse", "ignore")
# Modes whose 8-bit meaning is clear: PIL's own conversion to RGB (alpha is dropped, as ImageFolder does).
_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def load_rgb(path: str, draft: bool = False) -> Image.Image:
    """Open ``path`` as 8-bit RGB: the one way images are read (ImageFolder, the image check, the image cache).

    PIL's ``convert("RGB")`` clips 16-bit grayscale (PNG's ``I;16``/``I``) at 255, so such photos turned white;
    here 16-bit values are scaled to 8 bits (``value >> 8``). Palette, alpha, CMYK and the like go through PIL's
    conversion; modes without a clear 8-bit reading (32-bit float ``F``, ...) are refused naming the file.
    The EXIF Orientation tag is applied (a phone photo stored sideways with Orientation=6 is read upright), as
    every photo viewer shows it: train, evaluate, predict, the caches and the shift benchmark all read through here.
    ``draft`` decodes JPEGs at 1/8 scale (still reading the whole file): enough to check that it decodes.
    """
    with open(path, "rb") as file:
        return decode_rgb(file, path, draft)


def decode_rgb(file: BinaryIO, name: str | os.PathLike, draft: bool = False) -> Image.Image:
    """:func:`load_rgb` of an open binary file (an image file's bytes, e.g. from a shard); ``name`` for messages."""
    path = name
    image = Image.open(file)
    if draft and image.format == "JPEG":
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()
    if exif_orientation(image) in _TURNING_ORIENTATIONS:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 0xFFFF):
            raise ValueError(
                f"{printable(path)}: PIL mode {image.mode!r} with values {pixels.min()}..{pixels.max()} is not 16-bit "
                "grayscale, and there is no single way to read it as 8 bits. Convert it to 8-bit RGB."
            )
        return Image.fromarray((pixels >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency, resolved before the alpha is dropped
    if image.mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    raise ValueError(
        f"{printable(path)}: cannot read PIL image mode {image.mode!r} as 8-bit RGB (readable: 8-bit modes "
        f"{', '.join(_EIGHT_BIT_MODES)}, and 16-bit grayscale). Convert the file to 8-bit RGB."
    )


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF Orientation (1, upright, when absent or unreadable)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels are read as stored, as before
        return 1
    return value if isinstance(value, int) else 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as the image is shown (and loaded by :func:`load_rgb`): swapped for EXIF Orientation 5-8."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def printable(path: str | bytes | os.PathLike) -> str:
    """``path`` as text any log handler or JSON file can take: bytes that are not UTF-8 become ``\\xe9`` escapes."""
    text = os.fsdecode(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # the name's bytes
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_image_file(path: str) -> bool:
    """Images are recognised by extension, as torchvision's ``ImageFolder`` does."""
    return path.lower().endswith(IMG_EXTENSIONS)


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


def check_split(folder, train_idx: list[int], val_idx: list[int], val_fraction: float) -> None:
    """Every class needs training images to learn from and validation images to select the checkpoint by."""
    counts = {name: [0, 0] for name in folder.classes}
    for side, indices in enumerate((train_idx, val_idx)):
        for index in indices:
            counts[folder.classes[folder.targets[index]]][side] += 1
    short = [
        f"class {name!r}: {n_train} train, {n_val} val"
        for name, (n_train, n_val) in counts.items()
        if not (n_train and n_val)
    ]
    if short:
        raise DataError(
            f"data.val_fraction={val_fraction} leaves {len(short)} class(es) without training or "
            f"validation images ({preview(short, limit=10, sep='; ')}): each class gives "
            "round(val_fraction * n) of its n training images to val, and the validation split selects the "
            "checkpoint that is tested. Change data.val_fraction, or add images to those classes."
        )


def _image_problem(path: str) -> str | None:
    try:
        load_rgb(path, draft=True)
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(err).__name__}: {err}"
    return None


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) so that each class gives ``round(val_fraction * n_class)`` to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(seed)
    train, val = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        n_val = round(val_fraction * len(indices))
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def stratified_folds(targets: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Deal the indices into ``folds`` disjoint folds covering them all, each class spread as evenly as it can be.

    Each class is shuffled (seeded) and dealt round-robin, starting where the previous class stopped, so fold
    sizes differ by at most one overall and each class's counts per fold differ by at most one.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}.")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(seed)
    dealt: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        for position, index in enumerate(indices):
            dealt[(start + position) % folds].append(index)
        start = (start + len(indices)) % folds
    return [sorted(fold) for fold in dealt]


def fold_split(targets: Sequence[int], folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices for fold ``fold`` of :func:`stratified_folds`: val is that fold, train the others."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}.")
    dealt = stratified_folds(targets, folds, seed)
    return sorted(i for k, part in enumerate(dealt) if k != fold for i in part), dealt[fold]


def preview(items: Sequence[str], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` items, ``sep``-separated, and how many more (for messages about long lists of files)."""
    shown = sep.join(printable(item) for item in items[:limit])
    return (shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")) or "nothing"
