"""Temperature scaling: fitted on validation, kept in the checkpoint, applied by evaluate, predict and export."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from finetune.calibrate import calibrate
from finetune.evaluate import evaluate
from finetune.export import ExportedClassifier
from finetune.harness.checkpoint_io import load_for_inference, preprocessing
from finetune.predict import predict
from finetune.run import compose_config
from finetune.scoring import TEMPERATURE, Scorer
from finetune.temperature import EmptyValidationError, calibration_record, fit_temperature
from finetune.train import train

from .conftest import make_image_folder, tiny_overrides
from .inference import eval_config, predict_config


def overconfident(n: int = 4000, temperature: float = 2.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose calibrated version is known: labels drawn from softmax(z), the logits handed over are z * T."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=generator) * 1.5
    targets = torch.multinomial(z.softmax(dim=1), 1, generator=generator).squeeze(1)
    return z * temperature, targets


def test_fit_temperature_recovers_the_temperature_that_made_logits_overconfident():
    logits, targets = overconfident(temperature=2.5)
    temperature = fit_temperature(logits, targets)
    assert temperature == pytest.approx(2.5, rel=0.1)
    record = calibration_record(logits, targets, temperature)
    assert record["nll"] < record["nll_uncalibrated"] and record["ece"] < record["ece_uncalibrated"] / 2
    assert (logits.argmax(1) == (logits / temperature).argmax(1)).all()  # accuracy never changes


def test_an_empty_validation_split_is_refused_with_the_setting_to_change():
    with pytest.raises(EmptyValidationError, match=r"validation split, which holds no image.*calibrate=false"):
        fit_temperature(torch.empty(0, 2), torch.empty(0, dtype=torch.long))


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data"), n_train=10, n_test=4)
    out = tmp_path_factory.mktemp("run")
    overrides = ["trainer.max_epochs=3", "optimizer.lr=0.05", "model.head_lr_mult=1"]
    results = train(compose_config(overrides + tiny_overrides(root, out)))
    assert results["status"] == "completed", results.get("error")
    return {**results, "root": root}


def test_training_fits_a_temperature_on_val_and_stores_it_in_the_tested_checkpoint(calibrated_run, tmp_path):
    temperature = calibrated_run["val/temperature"]
    assert temperature > 0 and temperature != 1.0
    assert calibrated_run["val/ece"] <= calibrated_run["val/ece_uncalibrated"] + 1e-6
    stored = torch.load(calibrated_run["best_checkpoint"], weights_only=True)
    assert stored[TEMPERATURE] == pytest.approx(temperature)
    assert calibrated_run["test/ece_uncalibrated"] is not None and calibrated_run["test/ece"] is not None
    # evaluate scores the checkpoint as the run tested it: same loss, same ECE, the same temperature.
    evaluated = evaluate(eval_config(calibrated_run["best_checkpoint"], calibrated_run["root"], tmp_path / "eval"))
    assert evaluated["temperature"] == pytest.approx(temperature)
    assert evaluated["test/loss"] == pytest.approx(calibrated_run["test/loss"], abs=1e-5)
    assert evaluated["test/ece"] == pytest.approx(calibrated_run["test/ece"], abs=1e-6)


def test_predict_and_export_divide_the_logits_by_the_temperature(calibrated_run, tmp_path):
    model, checkpoint = load_for_inference(calibrated_run["best_checkpoint"])
    test_dir = calibrated_run["root"] / "test"
    rows = predict(predict_config(calibrated_run["best_checkpoint"], test_dir, tmp_path / "predict"))
    transform = preprocessing(checkpoint).transform()
    image = transform(Image.open(rows[0]["path"]).convert("RGB")).unsqueeze(0)
    temperature = checkpoint[TEMPERATURE]
    with torch.no_grad():
        raw = model.net(image)
        expected = (raw / temperature).softmax(dim=1)[0]
        exported = ExportedClassifier(Scorer(model, temperature), "probabilities").eval()(image)[0]
    assert rows[0]["cat"] == pytest.approx(expected[0].item(), abs=1e-5)
    assert exported[0].item() == pytest.approx(expected[0].item(), abs=1e-6)
    assert not torch.allclose(raw.softmax(dim=1)[0], expected, atol=1e-4)  # the temperature made a difference


def test_finetune_calibrate_writes_a_new_checkpoint_and_leaves_the_original(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=10, n_test=4)
    overrides = ["trainer.max_epochs=2", "optimizer.lr=0.05", "calibrate=false"]
    results = train(compose_config(overrides + tiny_overrides(root, tmp_path / "run")))
    original = torch.load(results["best_checkpoint"], weights_only=True)
    assert TEMPERATURE not in original and "val/temperature" not in results  # uncalibrated: the logits as they are
    before = open(results["best_checkpoint"], "rb").read()
    cfg = compose_config(
        [
            f"ckpt_path={results['best_checkpoint']}",
            "data=folder",
            f"data.root={root}",
            "data.val_fraction=0.2",
            "data.num_workers=0",
            "data.batch_size=4",
            f"paths.output_dir={tmp_path / 'calibrated'}",
        ],
        config_name="calibrate",
    )
    record = calibrate(cfg)
    written = torch.load(tmp_path / "calibrated" / "calibrated.ckpt", weights_only=True)
    assert written[TEMPERATURE] == pytest.approx(record["val/temperature"]) and record["val/temperature"] != 1.0
    assert open(results["best_checkpoint"], "rb").read() == before
    assert json.loads((tmp_path / "calibrated" / "calibration.json").read_text())["val/ece"] == record["val/ece"]
