"""Test-time views (tta=flip|five_crop|full): what each view shows, and that evaluate and predict average them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.data.transforms import Preprocessing
from finetune.errors import SettingError
from finetune.evaluate import evaluate
from finetune.harness.checkpoint_io import load_for_inference, preprocessing
from finetune.module import FineTuneModule
from finetune.predict import predict
from finetune.scoring import TEMPERATURE, Scorer
from finetune.tta import letterbox, views_transform

from .inference import eval_config, predict_config, trained_run


def wide_photo() -> Image.Image:
    """200x100: a red left quarter, a blue right quarter, grey between (what a centre crop cuts off shows)."""
    pixels = torch.full((100, 200, 3), 128, dtype=torch.uint8)
    pixels[:, :50] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    pixels[:, 150:] = torch.tensor([0, 0, 255], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def raw(views: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    mean, std = torch.tensor(p.mean).view(3, 1, 1), torch.tensor(p.std).view(3, 1, 1)
    return views * std + mean


@pytest.mark.parametrize("tta, count", [("flip", 2), ("five_crop", 5), ("full", 4)])
def test_each_mode_gives_its_views(tta, count):
    p = Preprocessing.of(64, 72, eval_resize="shorter_side")
    views = views_transform(p, tta)(wide_photo())
    assert views.shape == (count, 3, 64, 64)
    centre = p.transform()(wide_photo())
    if tta == "flip":
        assert torch.allclose(views[0], centre) and torch.allclose(views[1], centre.flip(-1))
    if tta == "five_crop":  # the resized photo is 144x72: the corner crops reach the red and blue ends
        red = raw(views, p)[:, 0].mean(dim=(1, 2))
        assert red[0] > 0.6 and red[4] < 0.6  # top-left crop is mostly red, the centre crop grey
    if tta == "full":
        assert torch.allclose(views[0], centre)
        whole = raw(views[2], p)
        assert whole[0, 32, :5].mean() > 0.9 and whole[2, 32, -5:].mean() > 0.9  # both ends are in the square
        assert torch.allclose(views[2][:, :10], torch.zeros(3, 10, 64), atol=0.02)  # mean-coloured bars


def test_letterbox_keeps_the_aspect_ratio_inside_a_square():
    boxed = letterbox(wide_photo(), 64, (0.5, 0.5, 0.5), Image.BILINEAR)
    assert boxed.size == (64, 64)


def test_the_scorer_averages_the_calibrated_probabilities_of_the_views():
    torch.manual_seed(0)
    model = FineTuneModule(3, backbone="resnet18", weights=None).eval()
    scorer = Scorer(model, temperature=2.0)
    views = torch.rand(2, 4, 3, 32, 32)
    with torch.no_grad():
        averaged = scorer(views).softmax(dim=-1)
        one_by_one = torch.stack([(model(views[:, v]) / 2.0).softmax(dim=-1) for v in range(4)], dim=1).mean(dim=1)
    assert torch.allclose(averaged, one_by_one, atol=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def test_evaluate_with_tta_averages_predict_s_probabilities(run, tmp_path):
    ckpt = run["best_checkpoint"]
    evaluated = evaluate(eval_config(ckpt, run["root"], tmp_path / "eval", "tta=full"))
    assert evaluated["tta"] == "full"
    rows = {r["path"]: r for r in predict(predict_config(ckpt, run["root"] / "test", tmp_path / "p", "tta=full"))}
    for entry in evaluated["test/top_losses"]:
        assert rows[entry["path"]]["score"] == pytest.approx(entry["probability"], abs=1e-5)
    model, checkpoint = load_for_inference(ckpt)
    path = next(iter(rows))
    with torch.no_grad():
        views = views_transform(preprocessing(checkpoint), "full")(Image.open(path).convert("RGB"))
        expected = (model(views) / checkpoint.get(TEMPERATURE, 1.0)).softmax(dim=-1).mean(dim=0)
    assert rows[path]["cat"] == pytest.approx(expected[0].item(), abs=1e-5)
    plain = evaluate(eval_config(ckpt, run["root"], tmp_path / "plain"))
    assert plain["test/loss"] != pytest.approx(evaluated["test/loss"], abs=1e-6)
    assert evaluated["test/ece_uncalibrated"] is None  # averaged views have no raw logits to report


def test_an_unknown_tta_is_refused_by_name(run, tmp_path):
    with pytest.raises(SettingError, match=r"Unknown tta='rotate'"):
        evaluate(eval_config(run["best_checkpoint"], run["root"], tmp_path / "eval", "tta=rotate"))
