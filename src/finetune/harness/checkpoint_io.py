"""Checkpoints as files a user hands over: read safely, explained when broken, and carrying what their data was.

- :func:`load_checkpoint`: ``torch.load(..., weights_only=True)`` (tensors and plain data only, never arbitrary
  pickled objects), with an error that names the file, and for a truncated file the run's other checkpoint.
- :func:`class_names` and :func:`preprocessing` read back what every checkpoint of ``finetune.train`` stores beside
  the weights (the class names in order, and the eval :class:`~finetune.data.transforms.Preprocessing`).
- :func:`load_for_inference`: the model in a checkpoint file, ready to evaluate, predict or export; refused when
  its weights are not finite (:func:`check_finite_weights`: a diverged run's), which would score as chance.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from finetune.data import is_image_file
from finetune.data.transforms import CLASSES, PREPROCESSING, Preprocessing
from finetune.errors import DivergedError, PathError, UserError, describe_path
from finetune.harness.run_folder import CHECKPOINTS, INTERRUPTED, LAST, RunFolder
from finetune.module import FineTuneModule

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or not written by ``finetune.train``."""


class CheckpointPathError(PathError):
    """A checkpoint path where there is no file: nothing, or something that is not a file."""


class CheckpointFolderError(CheckpointPathError):
    """A folder given as a checkpoint: the message lists the checkpoints in it."""


def load_checkpoint(path: str | Path, mmap: bool = False, setting: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True`` on the CPU.

    A folder, a missing path or a file of another kind (an exported ONNX or TorchScript model, safetensors, an image)
    is refused saying what it is and what to pass as ``setting=`` instead.
    """
    path = Path(path)
    check_checkpoint_file(path, setting)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        if not named and "unsupported global" not in str(err).lower():
            raise CheckpointError(_unreadable(path, err, setting)) from err  # not a pickle at all, or cut short
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r}: it holds pickled Python objects, not only tensors and plain data "
            f"({'it refers to ' + named.group(1) if named else _first_line(err)}), and such files are never "
            "unpickled: loading one could run code from it. Use a checkpoint written by finetune.train, from a "
            "source you trust."
        ) from err
    except Exception as err:  # noqa: BLE001 - zip reader, EOF, unpickling: all mean a damaged file
        raise CheckpointError(_unreadable(path, err, setting)) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        if (
            isinstance(checkpoint, dict)
            and checkpoint
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        ):
            raise CheckpointError(
                f"{setting}={path}: the file holds bare network weights ({len(checkpoint)} tensors, a state dict), "
                "without the model settings and class names of a checkpoint of finetune.train. To train from these "
                f"weights pass pretrained_weights={path}; here pass a .ckpt written by finetune.train."
            )
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint of finetune.train (no 'state_dict'; found {found})."
        )
    return checkpoint


# Suffixes of files torch.save writes; a file with another suffix that torch cannot read is "not a checkpoint",
# one with these is "truncated or corrupt".
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".tar")


def check_checkpoint_file(path: Path, setting: str = "ckpt_path") -> None:
    """Refuse, saying what is there and what to pass instead, a ``setting=`` that is no checkpoint file: nothing,
    a folder (its checkpoints are listed), or a file of another kind (:func:`file_kind`)."""
    if path.is_dir():
        raise CheckpointFolderError(_folder_message(path, setting))
    if not path.is_file():
        found = describe_path(path)
        what = "does not exist" if found == "nothing" else f"is {found}, not a checkpoint file"
        raise CheckpointPathError(
            f"{setting}={path}: {what}. Pass {setting}=PATH to a .ckpt written by finetune.train (a run's "
            f"{CHECKPOINTS}/ folder holds the best one and {LAST})."
        )
    kind = file_kind(path)
    if kind is not None:
        what, instead = kind
        raise CheckpointError(f"{setting}={path}: this is {what}, not a checkpoint of finetune.train. {instead}")


def _folder_message(folder: Path, setting: str) -> str:
    """A folder given as a checkpoint: the checkpoints in it (or in its ``checkpoints/``), and the command to use."""
    found = sorted({*folder.glob("*.ckpt"), *(folder / CHECKPOINTS).glob("*.ckpt")})
    if not found:
        return (
            f"{setting}={folder}: this is a folder, not a checkpoint file, and it holds no .ckpt files (nor does a "
            f"{CHECKPOINTS}/ folder in it). Pass {setting}=PATH to a .ckpt written by finetune.train: a run's "
            f"{CHECKPOINTS}/ folder holds the best one and {LAST}."
        )
    best = [p for p in found if p.name not in (LAST, INTERRUPTED)]
    roles = {LAST: "the last epoch", INTERRUPTED: "where fitting was stopped"}
    ordered = sorted(found, key=lambda p: (p.name in roles, p.name))
    described = [f"{p} ({roles.get(p.name, 'best on validation')})" for p in ordered]
    pick = best[-1] if best else found[0]
    return (
        f"{setting}={folder}: this is a folder, not a checkpoint file. It holds {len(found)} checkpoint(s): "
        f"{'; '.join(described)}. Name one, e.g. {setting}={pick}"
    )


def file_kind(path: Path) -> tuple[str, str] | None:
    """``(what the file is, what to pass instead)`` for a file that is surely not a checkpoint, else ``None``.

    Recognised by content, then by name: a TorchScript archive (a zip with ``constants.pkl`` and ``code/``), an
    ONNX model (a protobuf whose first field is the IR version, or ``.onnx``), a safetensors file (an 8-byte length,
    then a JSON header), an exported model's ``.json`` description, an image.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError:
        return None
    source = _exported_from(path)
    back = (
        f"Pass the checkpoint it was exported from: ckpt_path={source}"
        if source
        else "Pass the .ckpt it was exported from (a run's checkpoints/ folder holds them)"
    )
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return (
                "an exported TorchScript model (torch.jit.save, e.g. finetune.export format=torchscript)",
                f"It runs without this package (torch.jit.load). {back}.",
            )
        return None
    if path.suffix.lower() == ".onnx" or _looks_like_onnx(head):
        return ("an exported ONNX model", f"It runs without this package (onnxruntime). {back}.")
    if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
        return (
            "a safetensors file (bare weights, without the model settings and class names of a checkpoint)",
            "To train from these weights pass pretrained_weights=PATH; here pass a .ckpt written by finetune.train.",
        )
    if path.name.endswith(".onnx.json") or path.name.endswith(".pt.json"):
        return ("the description of an exported model (its sidecar)", f"{back}.")
    if is_image_file(path.name):
        return ("an image", "To predict its class pass it as inputs= to finetune.predict, with ckpt_path=CKPT.")
    return None


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto's start: field 1 (``ir_version``, a small varint), then another field of the model (the
    producer's name, the graph, ...). Pickles start with 0x80, torch's zip files with ``PK``."""
    return len(head) >= 3 and head[0] == 0x08 and head[1] < 32 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A, 0x42)


def _exported_from(model_file: Path) -> str | None:
    """The checkpoint an exported model (or its sidecar) was exported from, as its ``.json`` sidecar records it."""
    sidecar = model_file if model_file.suffix == ".json" else RunFolder.sidecar(model_file)
    try:
        source = json.loads(sidecar.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return str(source) if source else None


def _unreadable(path: Path, err: BaseException, setting: str = "ckpt_path") -> str:
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES and not zipfile.is_zipfile(path):
        return (
            f"{setting}={path}: this is not a checkpoint: torch cannot read it (it is no file that torch.save "
            f"writes). Pass a .ckpt written by finetune.train (a run's {CHECKPOINTS}/ folder holds the best one "
            f"and {LAST})."
        )
    others = other_checkpoints(path)
    hint = (
        f"The run's other checkpoint(s): {', '.join(repr(str(p)) for p in others)}: try one of them."
        if others
        else "There is no other checkpoint beside it: restore the file, or train again."
    )
    return (
        f"Cannot read checkpoint {str(path)!r}: the file is truncated or corrupt ({type(err).__name__}: "
        f"{_first_line(err)}; {path.stat().st_size} bytes). {hint}"
    )


def other_checkpoints(path: Path) -> list[Path]:
    """The run's other ``.ckpt`` files (beside ``path`` and in its run's ``checkpoints/``), ``last.ckpt`` first."""
    folders = {path.parent, RunFolder.of_checkpoint(path).checkpoints}
    found = {p.resolve(): p for folder in folders for p in folder.glob("*.ckpt") if p.resolve() != path.resolve()}
    return sorted(found.values(), key=lambda p: (p.name != LAST, str(p)))


def _first_line(err: BaseException) -> str:
    """The first sentence of an error message (torch's go on for lines)."""
    lines = str(err).strip().splitlines()
    return lines[0].split(". ")[0][:200] if lines else type(err).__name__


def preprocessing(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> Preprocessing:
    """The checkpoint's eval preprocessing, refused by name when it has none or this version cannot build it."""
    record = checkpoint.get(PREPROCESSING)
    if not record or not checkpoint.get(CLASSES):
        raise CheckpointError(
            f"{str(path)!r} records no class names or eval preprocessing: it was written by an early version of "
            "finetune, which this one cannot score faithfully. Train the model again with this version."
        )
    try:
        found = Preprocessing.from_dict(record)
        found.transform()
    except ValueError as err:  # e.g. an interpolation this version does not know
        raise CheckpointError(f"The preprocessing {record} of {str(path)!r} cannot be reproduced: {err}") from err
    return found


def class_names(checkpoint: dict[str, Any], num_classes: int, path: str | Path = "checkpoint") -> list[str]:
    """The class names stored in the checkpoint, in output order."""
    preprocessing(checkpoint, path)  # no class names: refused with the reason
    classes = [str(c) for c in checkpoint[CLASSES]]
    if len(classes) != num_classes:
        raise CheckpointError(f"{path} lists {len(classes)} class names for a {num_classes}-class model.")
    return classes


def check_finite_weights(state_dict: dict[str, Any], path: str | Path, setting: str = "ckpt_path") -> None:
    """Refuse a checkpoint whose floating-point tensors hold ``nan`` or ``inf``: a run that diverged saved it, and
    every score of it would be chance (an accuracy of the majority class, a ``nan`` loss) or a nonsense temperature."""
    bad = [
        key
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise DivergedError(
            f"{setting}={path}: {len(bad)} of its weight tensors hold nan or inf (e.g. {', '.join(bad[:3])}): the "
            "run that saved it diverged. Use a checkpoint from before it diverged, or train again with a lower "
            "optimizer.lr (or trainer.gradient_clip_val=1.0)."
        )


# The module's recipe in a checkpoint's hyper-parameters; others (training settings of earlier versions) are ignored.
MODEL_KEYS = ("num_classes", "backbone", "freeze", "head_lr_mult")


def load_for_inference(path: str | Path) -> tuple[FineTuneModule, dict[str, Any]]:
    """The model in a checkpoint file, in eval mode on the CPU, and the checkpoint itself (whose ``temperature``
    the scorer applies).

    Loaded with ``weights_only=True`` (see :func:`load_checkpoint`). ``weights=None``: the checkpoint holds every
    weight, so nothing is fetched first. The loss's state (a class-weighted criterion's weights) is not the model's.
    """
    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "num_classes" not in hparams:
        raise CheckpointError(f"{str(path)!r} has no model hyper-parameters: it was not written by finetune.train.")
    preprocessing(checkpoint, path)
    check_finite_weights(checkpoint.get("state_dict") or {}, path)
    model = FineTuneModule(**{key: hparams[key] for key in MODEL_KEYS if key in hparams}, weights=None)
    weights = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("criterion.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit the model its hyper-parameters describe: {err}") from err
    return model.eval(), checkpoint
