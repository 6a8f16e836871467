"""Shifted copies of a test folder: the photos as another source might take them, generated once and cached.

A model that scores well on its own test split can still fail on other people's photos: a smaller object off-centre
in a scene, another framing or aspect, blur, compression, light, sensor noise. Each shift here is a small pure
function ``(image, rng, severity) -> image`` in :data:`SHIFTS`; the randomness of one image comes from a generator
seeded by (seed, shift, severity, the image's path in the folder), so an image's shifted copy depends neither on the
other images nor on their order. :func:`make_shifted_folder` writes ``<cache_root>/<shift>-<severity>/<class>/*.png``
(PNG: no second JPEG loss, except in the ``jpeg`` shift) with a manifest, reused while the source is unchanged.

The corruption strengths are ImageNet-C's (Hendrycks & Dietterich, 2019) at its severities 1, 3 and 5. Blur is
scaled with the photo (ImageNet-C blurs 224-pixel crops of a 256 resize, so the sigma here is ``sigma * short side /
256``: the model sees ImageNet-C's blur whatever the photo's size); the other corruptions act per pixel of the photo.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from finetune.data import is_image_file, load_rgb
from finetune.errors import PathError, SettingError

# Bump when any shift's pixels change for the same (seed, severity, image): caches made before are then rebuilt.
SHIFTS_VERSION = 1
MANIFEST = "manifest.json"
GREY = (128, 128, 128)
LETTERBOX_BORDER = (0, 0, 0)

# Severity -> (min, max) of the object's side as a fraction of the canvas side.
OBJECT_SCALE = {1: (0.5, 0.6), 2: (0.4, 0.5), 3: (0.3, 0.4)}
# Severity -> the canvas's long side : short side (the orientation, wide or tall, is drawn per image).
LETTERBOX = {1: 1.5, 2: 2.0, 3: 3.0}
# ImageNet-C's severities 1, 3, 5 of each corruption.
BLUR_SIGMA = {1: 1.0, 2: 3.0, 3: 6.0}  # gaussian_blur: c = [1, 2, 3, 4, 6] pixels of a 256 resize
JPEG_QUALITY = {1: 25, 2: 15, 3: 7}  # jpeg_compression: [25, 18, 15, 10, 7]
BRIGHTNESS = {1: 0.1, 2: 0.3, 3: 0.5}  # brightness: [.1, .2, .3, .4, .5] added to HSV value
CONTRAST = {1: 0.4, 2: 0.2, 3: 0.05}  # contrast: [.4, .3, .2, .1, .05], the factor on the distance to the mean
NOISE_STD = {1: 0.08, 2: 0.18, 3: 0.38}  # gaussian_noise: [.08, .12, .18, .26, .38] on [0, 1] pixels


ShiftFunction = Callable[[Image.Image, np.random.Generator, int], Image.Image]


@dataclass(frozen=True)
class Shift:
    """A shift's function and the severities it has (1 is the mildest)."""

    name: str
    apply: ShiftFunction
    severities: tuple[int, ...]
    description: str


# --- the shifts ---------------------------------------------------------------------------------------------------


def object_scale(
    image: Image.Image, rng: np.random.Generator, severity: int, background: str | None = None
) -> Image.Image:
    """The photo shrunk to a random fraction of the canvas side (:data:`OBJECT_SCALE`) and pasted off-centre on a
    canvas of the original size: a flat mid-grey one, or a strongly blurred copy of the photo (drawn per image;
    ``background="grey"|"blur"`` forces one). The object then fills 9-36% of the frame instead of most of it."""
    low, high = OBJECT_SCALE[severity]
    fraction = rng.uniform(low, high)
    drawn = "grey" if rng.random() < 0.5 else "blur"
    sides, offsets = rng.integers(0, 2, size=2), rng.uniform(0.0, 0.25, size=2)
    background = background or drawn
    width, height = image.size
    small = image.resize((max(1, round(width * fraction)), max(1, round(height * fraction))), Image.Resampling.LANCZOS)
    if background == "grey":
        canvas = Image.new("RGB", image.size, GREY)
    elif background == "blur":
        canvas = image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 16))
    else:
        raise SettingError(f"background must be 'grey' or 'blur', got {background!r}")
    # Each axis: within the outer quarter of the free space, on a side drawn per image (never centred).
    position = []
    for side, offset, slack in zip(sides, offsets, (width - small.width, height - small.height), strict=True):
        position.append(round(offset * slack) if side == 0 else round((1.0 - offset) * slack))
    canvas.paste(small, tuple(position))
    return canvas


def letterbox(image: Image.Image, rng: np.random.Generator, severity: int) -> Image.Image:
    """The whole photo, centred on the smallest canvas of aspect :data:`LETTERBOX` (wide or tall, drawn per image)
    that holds it, with a flat black border: the photo seen at another aspect, as on a phone or a video frame."""
    ratio = LETTERBOX[severity]
    aspect = ratio if rng.random() < 0.5 else 1.0 / ratio  # width / height of the canvas
    width, height = image.size
    if width / height < aspect:
        size = (max(width, round(height * aspect)), height)
    else:
        size = (width, max(height, round(width / aspect)))
    canvas = Image.new("RGB", size, LETTERBOX_BORDER)
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def gaussian_blur(image: Image.Image, rng: np.random.Generator, severity: int) -> Image.Image:
    """Out of focus or shaken: a Gaussian blur of ImageNet-C's sigma at the model's scale (see the module notes)."""
    sigma = BLUR_SIGMA[severity] * min(image.size) / 256
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def jpeg(image: Image.Image, rng: np.random.Generator, severity: int) -> Image.Image:
    """Re-encoded as a low-quality JPEG (:data:`JPEG_QUALITY`): blocks and ringing of messaging apps and the web."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY[severity])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def brightness(image: Image.Image, rng: np.random.Generator, severity: int) -> Image.Image:
    """Over-exposed: :data:`BRIGHTNESS` added to the HSV value of every pixel (hue and saturation kept), as
    ImageNet-C does."""
    pixels = _floats(image)
    value = pixels.max(axis=-1, keepdims=True)
    brighter = np.clip(value + BRIGHTNESS[severity], 0.0, 1.0)
    # Scaling RGB by new/old value changes V alone; a black pixel (no hue) becomes grey of the new value.
    scaled = np.where(value > 0, pixels * brighter / np.maximum(value, 1e-12), brighter)
    return _image(scaled)


def contrast(image: Image.Image, rng: np.random.Generator, severity: int) -> Image.Image:
    """Flat light or haze: each channel's distance to its mean multiplied by :data:`CONTRAST`."""
    pixels = _floats(image)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    return _image((pixels - mean) * CONTRAST[severity] + mean)


def gaussian_noise(image: Image.Image, rng: np.random.Generator, severity: int) -> Image.Image:
    """Sensor noise in low light: independent Gaussian noise of std :data:`NOISE_STD` on every pixel value."""
    pixels = _floats(image)
    return _image(pixels + np.float32(NOISE_STD[severity]) * rng.standard_normal(pixels.shape, dtype=np.float32))


def _floats(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


SHIFTS: dict[str, Shift] = {
    shift.name: shift
    for shift in (
        Shift("object_scale", object_scale, (1, 2, 3), "the photo shrunk to 30-60% of the frame, off-centre"),
        Shift("letterbox", letterbox, (1, 2, 3), "the whole photo on a 3:2, 2:1 or 3:1 canvas, black border"),
        Shift("gaussian_blur", gaussian_blur, (1, 2, 3), "Gaussian blur"),
        Shift("jpeg", jpeg, (1, 2, 3), "JPEG re-encoding at quality 25, 15, 7"),
        Shift("brightness", brightness, (1, 2, 3), "over-exposure"),
        Shift("contrast", contrast, (1, 2, 3), "low contrast"),
        Shift("gaussian_noise", gaussian_noise, (1, 2, 3), "Gaussian pixel noise"),
    )
}


def check_shift(name: str, severity: int) -> Shift:
    """The shift called ``name``, refused with the names and severities there are when unknown."""
    shift = SHIFTS.get(name)
    if shift is None:
        raise SettingError(f"Unknown shift {name!r} in shifts: choose from {', '.join(SHIFTS)}.")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in shift.severities:
        raise SettingError(
            f"Shift {name!r} has no severity {severity!r} (in severities): its severities are "
            f"{list(shift.severities)}, 1 the mildest."
        )
    return shift


def image_rng(seed: int, shift: str, severity: int, relative_path: str) -> np.random.Generator:
    """The generator of one image's shift: a function of (seed, shift, severity, path in the folder) only."""
    key = "\0".join((str(int(seed)), shift, str(int(severity)), relative_path))
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def apply_shift(image: Image.Image, shift: str, severity: int, seed: int, relative_path: str) -> Image.Image:
    """``image`` (RGB) under ``shift`` at ``severity``, drawn from :func:`image_rng`."""
    rng = image_rng(seed, shift, severity, relative_path)
    return check_shift(shift, severity).apply(image.convert("RGB"), rng, severity).convert("RGB")


# --- the cached folders ---------------------------------------------------------------------------------------------


def source_images(split_dir: Path) -> list[tuple[str, str]]:
    """``(relative path, class)`` of every image below ``split_dir/<class>/`` (recursive), sorted; checked."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise PathError(
            f"Test folder {str(split_dir)!r} does not exist: data.root must hold test/<class>/ image folders."
        )
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())  # as ImageFolder finds them
    if not classes:
        raise PathError(
            f"{str(split_dir)!r} holds no class folders: put each class's images in a folder of its own "
            "(test/<class>/<image>)."
        )
    found = []
    for name in classes:
        images = []
        for folder, _, files in sorted(os.walk(split_dir / name, followlinks=True)):
            images += [os.path.join(folder, file) for file in sorted(files) if is_image_file(file)]
        if not images:
            raise PathError(f"Class folder {str(split_dir / name)!r} holds no images: add some, or delete it.")
        found += [(os.path.relpath(path, split_dir).replace(os.sep, "/"), name) for path in images]
    return found


def output_names(relative_paths: Sequence[str]) -> dict[str, str]:
    """Source path -> shifted file: ``<class>/<stem>.png``, or ``<name>.png`` where two files share a stem."""
    stems = [os.path.splitext(path)[0] for path in relative_paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return {
        path: (stem if counts[stem] == 1 else path) + ".png" for path, stem in zip(relative_paths, stems, strict=True)
    }


def sources_digest(split_dir: Path, relative_paths: Sequence[str]) -> str:
    """A digest of the source files' names, sizes and modification times: it changes when any image does."""
    digest = hashlib.sha256()
    for path in relative_paths:
        stat = os.stat(split_dir / path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def make_shifted_folder(
    source_split_dir: str | Path,
    shift: str,
    severity: int,
    seed: int,
    cache_root: str | Path,
    workers: int = 1,
) -> Path:
    """``<cache_root>/<shift>-<severity>/``: every ``<class>/`` image of ``source_split_dir`` shifted, as PNG.

    A folder whose manifest matches (shift, severity, seed, :data:`SHIFTS_VERSION`, the source files' names, sizes
    and times) and whose files are all there at their recorded sizes is reused as it is; anything else is rebuilt.
    The folder is built under a temporary name and renamed when complete, so an interrupted build is never taken
    for a finished one. ``workers`` threads share the images (decoding, filtering and PNG encoding release the GIL).
    """
    check_shift(shift, severity)
    source = Path(source_split_dir)
    images = source_images(source)
    relative = [path for path, _ in images]
    expected = {
        "shift": shift,
        "severity": severity,
        "seed": int(seed),
        "version": SHIFTS_VERSION,
        "sources_digest": sources_digest(source, relative),
        "images": len(relative),
    }
    root = Path(cache_root)
    target = root / f"{shift}-{severity}"
    if is_complete(target, expected):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root, target.name)
    building = root / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        names = output_names(relative)
        for name in {os.path.dirname(n) for n in names.values()}:
            (building / name).mkdir(parents=True, exist_ok=True)

        def write(path: str) -> tuple[str, int]:
            out = building / names[path]
            try:
                image = load_rgb(str(source / path))
            except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a bad file
                raise PathError(
                    f"Cannot read {str(source / path)!r} ({type(err).__name__}: {err}): replace or delete it."
                ) from err
            apply_shift(image, shift, severity, seed, path).save(out, format="PNG", compress_level=1)
            return names[path], out.stat().st_size

        with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
            outputs = dict(pool.map(write, relative))
        manifest = {**expected, "source": str(source.resolve()), "outputs": outputs}
        (building / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: only a whole build has one
        _publish(building, target, expected)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def shifted_bytes(folder: str | Path) -> int:
    """The bytes of a finished shifted folder's images, as its manifest records them.

    Full-size lossless PNGs of photos take many times their JPEG sources (about 5.6 MB per 512x384 photo for all 21
    sets); lossless WebP saves only 15-27% on them, so the format stays PNG and the size is reported instead.
    """
    return sum(json.loads((Path(folder) / MANIFEST).read_text())["outputs"].values())


def is_complete(folder: Path, expected: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished build of ``expected``: its manifest agrees and every file is whole."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or any(manifest.get(key) != value for key, value in expected.items()):
        return False
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or len(outputs) != expected["images"]:
        return False
    for name, size in outputs.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _publish(building: Path, target: Path, expected: dict[str, Any]) -> None:
    """Rename the finished build into place, replacing a stale folder (or keeping one another process just made)."""
    if target.exists():
        if is_complete(target, expected):
            return  # another process finished the same build first
        stale = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(building, target)


def _remove_abandoned_builds(root: Path, name: str) -> None:
    """Delete the temporary folders of builds of ``name`` whose process is gone (an interrupted run's leftovers)."""
    for path in root.glob(f".{name}.*.*"):
        if not path.name.endswith((".tmp", ".stale")):
            continue
        pid = path.name[len(name) + 2 :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process builds one folder at a time: any of its own is left over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
