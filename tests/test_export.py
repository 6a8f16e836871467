"""finetune.export: ONNX and TorchScript files that equal the PyTorch model, and a sidecar that says how to use them."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data import eval_transform
from finetune.export import export
from finetune.harness.checkpoint_io import load_for_inference
from finetune.predict import predict
from finetune.scoring import TEMPERATURE, Scorer

from .conftest import REPO, compose_config, run_cli
from .inference import predict_config, trained_run

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def export_config(ckpt: Path, output_dir: Path, *extra: str):
    return compose_config([f"ckpt_path={ckpt}", f"paths.output_dir={output_dir}", *extra], config_name="export")


def needs_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'finetune[onnx]'")


@pytest.fixture(scope="module")
def onnx_model(run, tmp_path_factory) -> Path:
    needs_onnx()
    return export(export_config(run["best_checkpoint"], tmp_path_factory.mktemp("onnx"), "format=onnx"))


def real_images(run: dict) -> tuple[list[Path], torch.Tensor]:
    paths = sorted((run["root"] / "test").rglob("*.png"))
    transform = eval_transform(32, 36)
    return paths, torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def pytorch_outputs(run: dict, images: torch.Tensor, logits: bool = False) -> torch.Tensor:
    """What ``finetune.predict`` scores: the checkpoint's logits over its temperature (probabilities by default)."""
    model, checkpoint = load_for_inference(run["best_checkpoint"])
    with torch.no_grad():
        out = Scorer(model, checkpoint.get(TEMPERATURE, 1.0))(images)
    return out if logits else out.softmax(dim=1)


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_pytorch_on_real_images(run, onnx_model, batch):
    import onnxruntime

    _, images = real_images(run)
    session = onnxruntime.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images[:batch].numpy()})[0])
    want = pytorch_outputs(run, images[:batch])
    assert got.shape == (batch, 2)
    assert (got - want).abs().max().item() <= TOLERANCE
    assert not torch.allclose(want[0], torch.full((2,), 0.5), atol=1e-3)  # a real prediction, not a constant


@pytest.mark.parametrize("batch", [1, 5])
def test_torchscript_equals_pytorch_on_real_images(run, tmp_path, batch):
    path = export(export_config(run["best_checkpoint"], tmp_path, "format=torchscript"))
    _, images = real_images(run)
    with torch.no_grad():
        got = torch.jit.load(str(path))(images[:batch])
    assert got.shape == (batch, 2)
    assert (got - pytorch_outputs(run, images[:batch])).abs().max().item() <= TOLERANCE


def test_the_sidecar_says_how_to_feed_and_read_the_model(run, onnx_model):
    sidecar = json.loads(onnx_model.with_name(onnx_model.name + ".json").read_text())
    assert sidecar["classes"] == ["cat", "dog"] and sidecar["output"] == "probabilities"
    assert (sidecar["image_size"], sidecar["resize_size"], sidecar["interpolation"]) == (32, 36, "bilinear")
    assert sidecar["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert sidecar["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert sidecar["input"]["layout"] == "NCHW" and sidecar["input"]["dtype"] == "float32"
    assert sidecar["input"]["shape"] == ["batch", 3, 32, 32] and sidecar["backbone"] == "resnet18"
    expected = hashlib.sha256(Path(run["best_checkpoint"]).read_bytes()).hexdigest()
    assert sidecar["checkpoint_sha256"] == expected
    assert sidecar["max_abs_difference_to_pytorch"] <= TOLERANCE


def test_logits_can_be_exported_instead(run, tmp_path):
    path = export(export_config(run["best_checkpoint"], tmp_path, "format=torchscript", "outputs=logits"))
    assert json.loads(path.with_name(path.name + ".json").read_text())["output"] == "logits"
    _, images = real_images(run)
    with torch.no_grad():
        got = torch.jit.load(str(path))(images[:3])
    assert (got - pytorch_outputs(run, images[:3], logits=True)).abs().max().item() <= TOLERANCE


def test_an_unknown_format_and_an_existing_output_are_refused(run, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown format='tflite': choose one of \('onnx', 'torchscript'\)"):
        export(export_config(run["best_checkpoint"], tmp_path, "format=tflite"))
    existing = tmp_path / "model.pt"
    existing.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export(export_config(run["best_checkpoint"], tmp_path, "format=torchscript", f"output={existing}"))
    assert existing.read_text() == "keep me"


USING_AN_EXPORT = REPO / "docs" / "after-training.md"  # the page that shows how to use an exported model


def onnx_snippet() -> str:
    """The ONNX consumer snippet of docs/after-training.md, as a user copies it."""
    match = re.search(r"<!-- onnx-consumer[^>]*-->\s*```python\n(.*?)```", USING_AN_EXPORT.read_text(), re.DOTALL)
    assert match, f"{USING_AN_EXPORT.name} has no ONNX consumer snippet after the onnx-consumer marker"
    return match.group(1)


# Runs the snippet with this package out of reach: isolated mode (-I), no sys.path entry that holds it (the
# editable install's .pth adds one), and the name itself blocked.
SANDBOX = """
import importlib.util, os, sys
sys.path = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "finetune"))]
if importlib.util.find_spec("finetune") is not None:
    raise SystemExit("finetune is still importable")
sys.modules["finetune"] = None
snippet = sys.argv.pop(1)
exec(compile(open(snippet).read(), snippet, "exec"))
"""


@pytest.mark.slow
def test_the_documented_snippet_reproduces_the_probabilities_without_this_package(run, onnx_model, tmp_path):
    snippet_matches_predict(run, onnx_model, tmp_path)


def test_the_sidecar_and_the_snippet_keep_the_aspect_ratio_when_the_run_did(tmp_path_factory, tmp_path):
    needs_onnx()
    run = trained_run(tmp_path_factory, eval_resize="shorter_side")
    model = export(export_config(run["best_checkpoint"], tmp_path / "onnx", "format=onnx"))
    sidecar = json.loads(model.with_name(model.name + ".json").read_text())
    assert sidecar["eval_resize"] == "shorter_side"
    assert "resize the shorter side to 36, keeping the aspect ratio" in sidecar["input"]["preprocessing"]
    snippet_matches_predict(run, model, tmp_path)


@pytest.mark.slow
def test_the_export_command_writes_the_model_and_its_sidecar(run, tmp_path):
    """``python -m finetune.export`` as the docs run it: the module executed as a script, not imported."""
    out = tmp_path / "cli"
    args = [f"ckpt_path={run['best_checkpoint']}", "format=torchscript", f"hydra.run.dir={out}"]
    run_cli(args, module="finetune.export")
    sidecar = json.loads((out / "model.torchscript.pt.json").read_text())
    assert sidecar["input"]["preprocessing"].startswith(
        "RGB image, EXIF orientation applied (PIL.ImageOps.exif_transpose) -> resize to 36x36 (bilinear) -> centre crop"
    )
    assert torch.jit.load(out / "model.torchscript.pt")(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def snippet_matches_predict(run: dict, onnx_model: Path, tmp_path: Path) -> None:
    """The documented consumer snippet, run without this package, gives predict's labels and probabilities."""
    snippet = tmp_path / "use_onnx.py"
    snippet.write_text(onnx_snippet())
    paths, _ = real_images(run)
    command = [sys.executable, "-I", "-c", SANDBOX, str(snippet), str(onnx_model), *map(str, paths)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    rows = predict(predict_config(run["best_checkpoint"], run["root"] / "test", tmp_path / "predict"))
    assert [p["path"] for p in printed] == [r["path"] for r in rows] == list(map(str, paths))
    for got, want in zip(printed, rows, strict=True):
        assert got["label"] == want["label"]
        for name in ("cat", "dog"):
            assert got["probabilities"][name] == pytest.approx(want[name], abs=TOLERANCE)
