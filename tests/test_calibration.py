"""Temperature scaling: fitted on validation, kept in the checkpoint, applied by evaluate, predict and export."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from finetune.calibrate import calibrate
from finetune.errors import DivergedError
from finetune.evaluate import evaluate
from finetune.export import ExportedClassifier
from finetune.harness.checkpoint_io import load_for_inference, preprocessing
from finetune.harness.results import summary
from finetune.predict import predict
from finetune.run import compose_config
from finetune.scoring import TEMPERATURE, Scorer
from finetune.temperature import (
    MIN_IMAGES,
    EmptyValidationError,
    calibrate_logits,
    calibration_record,
    fit_temperature,
)
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_refused_not_fitted(bad):
    logits, targets = overconfident(n=100)
    logits[7, 1] = bad
    with pytest.raises(DivergedError, match=r"logits for 1 of 100 validation images are nan or inf.*optimizer\.lr"):
        fit_temperature(logits, targets)


def test_a_trustworthy_fit_is_applied_and_recorded_as_reliable():
    logits, targets = overconfident(n=400, temperature=2.5)
    record = calibrate_logits(logits, targets)
    assert record["temperature"] == record["temperature_fitted"] == pytest.approx(2.5, rel=0.15)
    assert record["temperature_reliable"] is True and record["temperature_reason"] is None
    assert record["temperature_images"] == 400 and record["nll"] < record["nll_uncalibrated"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("few images", rf"fitted on only 12 validation images \(fewer than {MIN_IMAGES}\).*data\.val_fraction"),
        ("no mistakes", r"every validation image is classified right.*no temperature is determined"),
        ("confidently wrong", r"it is above 20: the model is confidently wrong"),
        ("barely trained", r"it is below 0\.05: the model's scores are nearly uniform"),
    ],
)
def test_an_untrustworthy_fit_is_recorded_and_not_applied(case, reason):
    logits, targets = overconfident(n=400, temperature=2.5)
    if case == "few images":
        logits, targets = logits[:12], targets[:12]
    elif case == "no mistakes":
        targets = logits.argmax(dim=1)
    elif case == "confidently wrong":  # labels unrelated to the logits, which are sure of themselves
        targets = torch.randint(0, 3, targets.shape, generator=torch.Generator().manual_seed(1))
        logits = logits * 20
    else:  # logits near zero: the model has barely moved from uniform
        logits = logits / 1000
    record = calibrate_logits(logits, targets)
    assert record["temperature_reliable"] is False and re.search(reason, record["temperature_reason"])
    assert record["temperature"] == 1.0 and record["temperature_fitted"] != pytest.approx(1.0, rel=0.05)
    assert record["nll"] == record["nll_uncalibrated"] and record["ece"] == record["ece_uncalibrated"]


def calibration_folder(root):
    """100 training images (20 of them validated), 10 of them in the other class's folder: a model trained on them
    makes validation mistakes with confidence, so a temperature is determined and above 1."""
    make_image_folder(root, n_train=50, n_test=8)
    for i in range(5):
        for ours, other in (("cat", "dog"), ("dog", "cat")):
            (root / "train" / ours / f"{ours}_{i * 10:03d}.png").rename(root / "train" / other / f"{ours}_{i}.png")
    return root


CALIBRATES = ["trainer.max_epochs=3", "optimizer.lr=0.01", "model.head_lr_mult=1"]  # T about 1.8 on these


@pytest.fixture(scope="module")
def calibration_data(tmp_path_factory):
    return calibration_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, calibration_data):
    out = tmp_path_factory.mktemp("run")
    results = train(compose_config(CALIBRATES + tiny_overrides(calibration_data, out)))
    assert results["status"] == "completed", results.get("error")
    return {**results, "root": calibration_data}


def test_training_fits_a_temperature_on_val_and_stores_it_in_the_tested_checkpoint(calibrated_run, tmp_path):
    temperature = calibrated_run["val/temperature"]
    assert temperature > 0 and temperature != 1.0
    assert calibrated_run["val/temperature_reliable"] is True and calibrated_run["val/temperature_images"] == 20
    assert f"  temperature {temperature:.3f}: val ECE " in summary(calibrated_run)  # the summary line says it
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


def test_finetune_calibrate_writes_a_new_checkpoint_and_leaves_the_original(tmp_path, calibration_data):
    root = calibration_data
    overrides = [*CALIBRATES, "calibrate=false"]
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


def test_a_tiny_validation_split_keeps_temperature_1_and_every_command_says_why(tmp_path, tiny_folder, capsys):
    overrides = ["trainer.max_epochs=2", "optimizer.lr=0.05"]
    results = train(compose_config(overrides + tiny_overrides(tiny_folder, tmp_path / "run")))
    assert results["status"] == "completed", results.get("error")
    assert results["val/temperature"] == 1.0 and results["val/temperature_reliable"] is False
    assert results["val/temperature_images"] == 4 and results["val/temperature_fitted"] != pytest.approx(1.0)
    assert "fitted on only 4 validation images (fewer than 20)" in results["val/temperature_reason"]
    assert torch.load(results["best_checkpoint"], weights_only=True)[TEMPERATURE] == 1.0
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["val/temperature_reason"] == results["val/temperature_reason"]
    printed = capsys.readouterr().out
    assert "  temperature not applied (kept 1): T=" in printed and "fewer than 20" in printed
    assert "test/acc" in printed.split("temperature not applied")[0]  # the line sits in the summary

    cfg = compose_config(
        [
            f"ckpt_path={results['best_checkpoint']}",
            "data=folder",
            f"data.root={tiny_folder}",
            "data.val_fraction=0.2",
            "data.num_workers=0",
            "data.batch_size=4",
            f"paths.output_dir={tmp_path / 'calibrated'}",
        ],
        config_name="calibrate",
    )
    record = calibrate(cfg)
    assert record["val/temperature"] == 1.0 and record["val/temperature_reliable"] is False
    assert record["val/temperature_fitted"] == pytest.approx(results["val/temperature_fitted"], rel=1e-4)
    assert torch.load(tmp_path / "calibrated" / "calibrated.ckpt", weights_only=True)[TEMPERATURE] == 1.0
    assert "temperature not applied (kept 1)" in capsys.readouterr().out
