"""The test report is exact on a case where every prediction is chosen by hand, in one process and under DDP."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from finetune.evaluate import evaluate

from .inference import eval_config, flat_colour_folder, hand_built_checkpoint, png_size, run_module, trained_run

CLASSES = ["a", "b", "c"]
TEST_COUNTS = {"a": 4, "b": 3, "c": 4}  # 11 test images: 6 + 5 on two processes
# The class each test image (in folder order) is predicted as, and how sure the model is of it.
PREDICTED = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "a", "a"]
MARGINS = [1.0 + 0.5 * i for i in range(11)]
TRUE = [name for name, count in TEST_COUNTS.items() for _ in range(count)]
EXPECTED_MATRIX = [[3, 1, 0], [0, 2, 1], [2, 0, 2]]  # rows true a, b, c; columns predicted a, b, c


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("abc")
    images = flat_colour_folder(root, TEST_COUNTS)
    logits = torch.zeros(len(images), len(CLASSES))
    for i, (name, margin) in enumerate(zip(PREDICTED, MARGINS, strict=True)):
        logits[i, CLASSES.index(name)] = margin
    ckpt = hand_built_checkpoint(root / "hand.ckpt", CLASSES, images, logits)
    return root, ckpt, logits.softmax(dim=1)


def expected_auroc(probs: torch.Tensor) -> float:
    """One-vs-rest AUROC from pairwise comparisons (ties count half), averaged over the classes."""
    scores = []
    for c, name in enumerate(CLASSES):
        positives = [float(probs[i, c]) for i, t in enumerate(TRUE) if t == name]
        negatives = [float(probs[i, c]) for i, t in enumerate(TRUE) if t != name]
        wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
        scores.append(wins / (len(positives) * len(negatives)))
    return sum(scores) / len(scores)


def expected_ece(probs: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(dim=1)
    correct = [CLASSES[int(p)] == t for p, t in zip(predicted, TRUE, strict=True)]
    total = 0.0
    for b in range(bins):
        members = [i for i, c in enumerate(confidence.tolist()) if b / bins < c <= (b + 1) / bins]
        if members:
            mean_confidence = sum(confidence[i].item() for i in members) / len(members)
            accuracy = sum(correct[i] for i in members) / len(members)
            total += abs(mean_confidence - accuracy) * len(members) / len(TRUE)
    return total


def assert_exact_report(results: dict, probs: torch.Tensor) -> None:
    matrix = results["test/confusion_matrix"]
    assert matrix["classes"] == CLASSES and matrix["matrix"] == EXPECTED_MATRIX
    per_class = results["test/per_class"]
    assert list(per_class) == CLASSES
    recalls, f1s = [], []
    for c, name in enumerate(CLASSES):
        tp = EXPECTED_MATRIX[c][c]
        precision = tp / sum(row[c] for row in EXPECTED_MATRIX)
        recall = tp / sum(EXPECTED_MATRIX[c])
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall))
        assert per_class[name]["support"] == TEST_COUNTS[name]
        assert per_class[name]["precision"] == pytest.approx(precision, abs=1e-6)
        assert per_class[name]["recall"] == pytest.approx(recall, abs=1e-6)
        assert per_class[name]["f1"] == pytest.approx(f1s[-1], abs=1e-6)
    assert results["test/acc"] == pytest.approx(7 / 11, abs=1e-6)
    # Each class counts once: (3/4 + 2/3 + 2/4) / 3 = 0.639 against the accuracy's 7/11 = 0.636.
    assert results["test/balanced_acc"] == pytest.approx(sum(recalls) / 3, abs=1e-6)
    assert results["test/balanced_acc"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 4) / 3, abs=1e-6)
    assert results["test/macro_f1"] == pytest.approx(sum(f1s) / 3, abs=1e-6)
    assert results["test/auroc"] == pytest.approx(expected_auroc(probs), abs=1e-5)
    assert results["test/ece"] == pytest.approx(expected_ece(probs), abs=1e-5)
    worst = results["test/top_losses"]
    losses = [-math.log(probs[i, CLASSES.index(t)]) for i, t in enumerate(TRUE)]
    assert [w["loss"] for w in worst] == pytest.approx(sorted(losses, reverse=True), abs=1e-4)
    top = max(range(11), key=losses.__getitem__)
    assert worst[0]["true"] == TRUE[top] and worst[0]["predicted"] == PREDICTED[top]
    assert worst[0]["path"].endswith(f"{TRUE[top]}_{top - TRUE.index(TRUE[top]):02d}.png")


def test_the_report_is_exact_on_a_hand_built_case(hand_built, tmp_path):
    root, ckpt, probs = hand_built
    results = evaluate(eval_config(ckpt, root, tmp_path))
    assert_exact_report(results, probs)
    assert json.loads((tmp_path / "eval_results.json").read_text())["test/confusion_matrix"]["matrix"] == (
        EXPECTED_MATRIX
    )
    for name in ("confusion_matrix.png", "top_losses.png"):
        width, height = png_size(tmp_path / name)
        assert 300 <= width <= 3000 and 300 <= height <= 3000, (name, width, height)
    assert (tmp_path / "top_losses.png").stat().st_size > 10_000  # eleven images, not an empty canvas


@pytest.mark.slow
def test_the_report_is_exact_under_two_process_ddp_with_uneven_shards(hand_built, tmp_path):
    root, ckpt, probs = hand_built
    args = [
        f"ckpt_path={ckpt}",
        "data=folder",
        f"data.root={root}",
        "data.num_workers=0",
        "data.batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    ]
    done = run_module("finetune.evaluate", args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "eval" / "train_ddp_process_1.log").is_file()  # a second process did run
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert_exact_report(results, probs)
    assert png_size(tmp_path / "eval" / "confusion_matrix.png")[0] >= 300


def test_train_writes_the_report_and_both_figures(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    folder = Path(run["output_dir"])
    written = json.loads((folder / "results.json").read_text())
    matrix = written["test/confusion_matrix"]
    assert matrix["classes"] == ["cat", "dog"] and sum(map(sum, matrix["matrix"])) == 8
    assert {c: v["support"] for c, v in written["test/per_class"].items()} == {"cat": 4, "dog": 4}
    assert 0.0 <= written["test/auroc"] <= 1.0 and 0.0 <= written["test/ece"] <= 1.0
    assert len(written["test/top_losses"]) == 8
    for name in ("confusion_matrix.png", "top_losses.png"):
        assert png_size(folder / name)[0] >= 300


def test_without_matplotlib_the_figures_are_skipped_with_one_warning(hand_built, tmp_path, monkeypatch, caplog):
    root, ckpt, probs = hand_built
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with caplog.at_level(logging.WARNING):
        results = evaluate(eval_config(ckpt, root, tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "finetune[figures]" in r.getMessage()]
    assert len(warnings) == 1 and "pip install 'finetune[figures]'" in warnings[0]
    assert not (tmp_path / "confusion_matrix.png").exists() and not (tmp_path / "top_losses.png").exists()
    assert results["test/confusion_matrix"]["matrix"] == EXPECTED_MATRIX  # the numbers are still there
