"""Export a checkpoint for use without this package: ``python -m finetune.export ckpt_path=CKPT format=onnx``.

``format=onnx`` (``pip install 'finetune[onnx]'``) or ``format=torchscript``; ``output=PATH`` (default: ``model.onnx``
or ``model.torchscript.pt`` in a new folder). The model is exported in eval mode with a dynamic batch dimension and
returns softmax probabilities (``outputs=logits`` for logits). Beside it, ``PATH.json`` says what it needs and gives:
the class names in output order, the preprocessing (EXIF orientation, resize, centre crop, mean, std), the input
layout (NCHW float32 RGB in [0, 1], then normalised), the backbone, the output kind, and the sha256 of the source
checkpoint. After writing, the exported file is run on a few batches and compared with the PyTorch model (within
1e-4).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from finetune import atomic
from finetune.data import file_digest
from finetune.data.transforms import Preprocessing
from finetune.errors import MissingPackageError, OverwriteError, PathError, SettingError
from finetune.harness.checkpoint_io import class_names, load_for_inference, preprocessing
from finetune.harness.config_keys import check_checkpoint_command
from finetune.harness.exits import checks_command_line, ends_user_errors_cleanly, tell
from finetune.harness.run_folder import EXPORTED_MODELS, RunFolder
from finetune.harness.writable import check_apart, check_writable
from finetune.run import CONFIG_DIR
from finetune.scoring import TEMPERATURE, Scorer

log = logging.getLogger(__name__)

FORMATS = tuple(EXPORTED_MODELS)
OUTPUT_KINDS = ("probabilities", "logits")
INPUT_NAME = "images"
TOLERANCE = 1e-4
ONNX_PACKAGES = ("onnx", "onnxscript")  # torch.onnx.export (dynamo) needs both; onnxruntime only for the check


class ExportedClassifier(nn.Module):
    """The scorer's network, returning probabilities (softmax over classes) or logits, both of the logits divided
    by the checkpoint's ``temperature`` (1 for an uncalibrated one), as ``finetune.predict`` scores them."""

    def __init__(self, scorer: Scorer, outputs: str = "probabilities") -> None:
        super().__init__()
        self.net = scorer.model.net
        self.softmax = outputs == "probabilities"
        self.temperature = scorer.temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(images)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits.softmax(dim=1) if self.softmax else logits


def export(cfg: DictConfig) -> Path:
    """Write the exported model and its ``.json`` sidecar; the model's path."""
    check_checkpoint_command(cfg, "export", unused=("model", "optimizer", "scheduler", "data"))
    fmt, outputs = str(cfg.format), str(cfg.get("outputs", "probabilities"))
    if fmt not in FORMATS:
        raise SettingError(f"Unknown format={fmt!r}: choose one of {FORMATS}.")
    if outputs not in OUTPUT_KINDS:
        raise SettingError(f"Unknown outputs={outputs!r}: choose one of {OUTPUT_KINDS}.")
    output = Path(cfg.output) if cfg.get("output") else RunFolder(Path(cfg.paths.output_dir)).exported_model(fmt)
    sidecar = RunFolder.sidecar(output)
    named = f"output={output}" if cfg.get("output") else f"the exported model {output}"
    check_apart(
        {named: output, f"{named}'s description {sidecar.name}": sidecar}, {f"ckpt_path={cfg.ckpt_path}": cfg.ckpt_path}
    )
    if output.is_dir():
        raise PathError(f"{named} is a folder: pass output= a file name, e.g. output={output / EXPORTED_MODELS[fmt]}.")
    # Checked before loading the model: a read-only folder is said at once, not after the work.
    check_writable(output.parent, *(("output", output) if cfg.get("output") else ("paths.output_dir",)))
    existing = [str(p) for p in (output, sidecar) if p.exists()]
    if existing and not cfg.get("overwrite", False):
        raise OverwriteError(f"{', '.join(existing)} already exist(s): pass overwrite=true, or another output=PATH.")
    if fmt == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise MissingPackageError(f"format=onnx needs {', '.join(missing)}: pip install 'finetune[onnx]'.")

    ckpt_path = Path(cfg.ckpt_path)
    model, checkpoint = load_for_inference(ckpt_path)
    classes = class_names(checkpoint, model.hparams.num_classes, ckpt_path)
    eval_preprocessing = preprocessing(checkpoint, ckpt_path)
    temperature = float(checkpoint.get(TEMPERATURE, 1.0))
    exported = ExportedClassifier(Scorer(model, temperature), outputs).eval()
    example = example_batch(eval_preprocessing.image_size, 2)
    # The model (with ONNX's weights file beside a large one) and its description are written and checked in a
    # temporary folder and then renamed into place together: a failed check, Ctrl+C or a full disk leaves the
    # output's earlier files (overwrite=true) as they were, never a model without its description or the reverse.
    replace = bool(cfg.get("overwrite", False))
    with atomic.staged_files(output.parent, last=sidecar.name, replace=replace, main=output.name) as staging:
        staged = staging / output.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; the user asked for it
            if fmt == "onnx":
                write_onnx(exported, example, staged, outputs)
            else:
                with torch.no_grad(), open(staged, "wb") as file:
                    # Through a Python file: torch's own writer aborts the process on a full disk.
                    torch.jit.save(torch.jit.trace(exported, example), file)
            difference = check_parity(exported, staged, fmt, eval_preprocessing.image_size)
        description = sidecar_record(
            fmt, output, outputs, classes, eval_preprocessing, model.hparams.backbone, ckpt_path
        )
        description["temperature"] = temperature
        description["output_description"] += (
            f"; calibrated: the model divides its logits by the temperature {temperature:.4g} fitted on validation"
            if temperature != 1.0
            else "; uncalibrated (temperature 1)"
        )
        description["max_abs_difference_to_pytorch"] = difference
        atomic.write_json(staging / sidecar.name, description)
    tell(f"Exported {ckpt_path} to {output} ({fmt}, {outputs}); description in {sidecar}")
    return output


def example_batch(image_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Random inputs on the scale the model sees (normalised images are roughly standard normal)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


def write_onnx(exported: nn.Module, example: torch.Tensor, output: Path, outputs: str) -> None:
    for name in ("onnxscript", "onnx_ir"):  # their per-pass INFO lines would flood the log
        logging.getLogger(name).setLevel(logging.WARNING)
    large = sum(p.numel() * p.element_size() for p in exported.parameters()) > 1.5 * 2**30
    torch.onnx.export(
        exported,
        (example,),
        str(output),
        input_names=[INPUT_NAME],
        output_names=[outputs],
        dynamo=True,
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        external_data=large,  # over ONNX's 2 GB protobuf limit the weights go to a file beside it
        verbose=False,
    )


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> torch.Tensor | None:
    """The exported file's outputs on ``images`` (``None`` for ONNX without onnxruntime)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(images)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])


def check_parity(exported: nn.Module, path: Path, fmt: str, image_size: int) -> float | None:
    """Largest difference to the PyTorch model over batches of 1 and 3; raises above :data:`TOLERANCE`."""
    worst = 0.0
    for batch in (1, 3):
        images = example_batch(image_size, batch, seed=batch)
        got = run_exported(path, fmt, images)
        if got is None:
            log.warning("onnxruntime is not installed: %s was not checked against PyTorch.", path)
            return None
        with torch.no_grad():
            want = exported(images)
        worst = max(worst, (got.float() - want).abs().max().item())
    if worst > TOLERANCE:
        raise RuntimeError(f"{path} differs from the PyTorch model by {worst:.2e} (> {TOLERANCE}): not usable.")
    return worst


def _resize_words(preprocessing: Preprocessing) -> str:
    """The sidecar's words for the resize before the centre crop."""
    size = preprocessing.resize_size
    if preprocessing.eval_resize == "square":
        return f"resize to {size}x{size}"
    return f"resize the shorter side to {size}, keeping the aspect ratio"


def sidecar_record(
    fmt: str,
    output: Path,
    outputs: str,
    classes: list[str],
    preprocessing: Preprocessing,
    backbone: str,
    ckpt_path: Path,
) -> dict[str, Any]:
    """What a consumer needs to feed the exported model and read its output (``PATH.json``)."""
    size = preprocessing.image_size
    return {
        "format": fmt,
        "model_file": output.name,
        "classes": classes,
        "image_size": size,
        "resize_size": preprocessing.resize_size,
        "interpolation": preprocessing.interpolation,
        "eval_resize": preprocessing.eval_resize,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "shape": ["batch", 3, size, size],
            "preprocessing": (
                "RGB image, EXIF orientation applied (PIL.ImageOps.exif_transpose) "
                f"-> {_resize_words(preprocessing)} ({preprocessing.interpolation}) "
                f"-> centre crop {size}x{size} -> float32 in [0, 1] "
                "-> (x - mean) / std per channel"
            ),
        },
        "output": outputs,
        "output_description": (
            "softmax probabilities, shape [batch, classes]"
            if outputs == "probabilities"
            else "logits (apply softmax for probabilities), shape [batch, classes]"
        ),
        "backbone": backbone,
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": file_digest(ckpt_path, "sha256"),
        "torch_version": torch.__version__,
    }


@checks_command_line
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@ends_user_errors_cleanly
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
