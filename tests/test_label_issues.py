"""``python -m finetune.label_issues``: out-of-fold probabilities for every training image, then confident learning;
a planted mislabelled image is found and ranked first."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from finetune.errors import SettingError
from finetune.label_issues import find_label_issues, label_issues
from finetune.run import compose_config

from .conftest import make_image_folder, run_cli, tiny_overrides


def noisy_probabilities(seed: int, n: int = 300, k: int = 3, flips: int = 15):
    """Given labels with ``flips`` wrong ones, and probabilities of a decent model that knows the true classes."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, size=n)
    logits = rng.normal(0, 1, size=(n, k))
    logits[np.arange(n), true] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = true.copy()
    flipped = rng.choice(n, size=flips, replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, k, size=flips)) % k
    return torch.tensor(given), torch.tensor(probs), set(flipped.tolist())


def test_confident_learning_finds_most_planted_flips_and_few_clean_images():
    given, probs, flipped = noisy_probabilities(0)
    found = set(torch.nonzero(find_label_issues(given, probs)).flatten().tolist())
    assert len(found & flipped) >= 12  # of 15
    assert len(found - flipped) <= 25  # of 285 clean images some are ambiguous (the model errs on about 10%)
    assert all(probs[i].argmax() != given[i] for i in found)  # never an image whose label is the likeliest


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rule_flags_what_cleanlab_flags(seed):
    filter_module = pytest.importorskip("cleanlab.filter")
    given, probs, _ = noisy_probabilities(seed, n=400, k=4, flips=40)
    theirs = filter_module.find_label_issues(given.numpy(), probs.numpy(), filter_by="prune_by_noise_rate", n_jobs=1)
    assert find_label_issues(given, probs).tolist() == theirs.tolist()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny folder where a dog image sits in cat/ under another name."""
    root = make_image_folder(tmp_path_factory.mktemp("planted"), n_train=12, n_test=2)
    shutil.copy(root / "train" / "dog" / "dog_003.png", root / "train" / "cat" / "zz_really_a_dog.png")
    return root


def test_the_planted_mislabelled_image_comes_first_in_every_output(planted, tmp_path):
    overrides = ["trainer.max_epochs=20", "label_issues.folds=3", "data.duplicates=ignore"]
    record = label_issues(compose_config(tiny_overrides(planted, tmp_path) + overrides, "label_issues"))
    assert record["images"] == 25 and record["folds"] == 3 and record["classes"] == ["cat", "dog"]
    first = record["label_issues"][0]
    assert first["path"].endswith("cat/zz_really_a_dog.png") and (first["given"], first["suggested"]) == ("cat", "dog")
    assert first["self_confidence"] < 0.5 and first["margin"] < 0
    confidences = [row["self_confidence"] for row in record["label_issues"]]
    assert confidences == sorted(confidences)
    rows = list(csv.DictReader((tmp_path / "label_issues.csv").open()))
    assert list(rows[0]) == ["path", "given", "suggested", "self_confidence", "margin"]
    assert rows[0]["path"] == first["path"] and len(rows) == record["issues"]
    assert json.loads((tmp_path / "label_issues.json").read_text())["label_issues"][0] == first
    assert (tmp_path / "label_issues.png").stat().st_size > 5_000
    stores = list((tmp_path / "feature_store").glob("features-*.pt"))
    assert len(stores) == 1 and len(torch.load(stores[0], weights_only=True)["stamps"]) == 25  # each image once
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["fold0", "fold1", "fold2"]


def test_label_issues_settings_are_refused_by_name(planted, tmp_path):
    with pytest.raises(SettingError, match=r"label_issues.folds must be an integer >= 2"):
        label_issues(compose_config(tiny_overrides(planted, tmp_path) + ["label_issues.folds=1"], "label_issues"))
    with pytest.raises(SettingError, match=r"leave data.shots null"):
        label_issues(compose_config(tiny_overrides(planted, tmp_path) + ["data.shots=2"], "label_issues"))


@pytest.mark.slow
def test_the_command_runs_in_its_own_folder_and_a_mistake_is_one_error_line(planted, tmp_path):
    args = [a for a in tiny_overrides(planted, tmp_path) if not a.startswith("paths.output_dir")]
    done = run_cli([*args, "trainer.max_epochs=5", "label_issues.folds=2"], module="finetune.label_issues")
    (folder,) = (tmp_path / "logs" / "label_issues").iterdir()
    assert folder.name.endswith("_frozen") and (folder / "label_issues.csv").is_file()
    assert "training images look mislabelled" in done.stdout
    refused = run_cli([*args, "label_issues.folds=1"], module="finetune.label_issues", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "Error: label_issues.folds must be an integer >= 2"
    )
