"""data.folds / data.fold: stratified K-fold validation over train, and the report's mean over folds."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from finetune.data import ImageFolderDataModule
from finetune.data.splits import fold_split, stratified_folds
from finetune.report import load_sweep, to_markdown

from .conftest import make_image_folder
from .sweeps import results_for, write_job


def test_folds_are_disjoint_cover_every_index_and_are_stratified():
    targets = [0] * 13 + [1] * 7 + [2] * 5  # 25 samples, uneven classes
    folds = stratified_folds(targets, 5, seed=3)
    assert sorted(itertools.chain(*folds)) == list(range(25))  # covering, and no index twice
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for cls, n in Counter(targets).items():
        per_fold = [sum(targets[i] == cls for i in fold) for fold in folds]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1, (cls, per_fold)
    assert stratified_folds(targets, 5, seed=3) == folds  # seeded
    assert stratified_folds(targets, 5, seed=4) != folds
    train, val = fold_split(targets, 5, 2, seed=3)
    assert val == folds[2] and sorted(train + val) == list(range(25)) and not set(train) & set(val)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folds"), classes=("a", "b", "c"), n_train=7, n_test=3)


def _module(root: Path, **settings) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root, num_workers=0, image_size=32, resize_size=36, **settings)
    dm.setup()
    return dm


def test_each_fold_validates_on_its_part_of_train_and_leaves_test_alone(folder):
    plain = _module(folder)
    all_train = sorted(plain.train_set.indices + plain.val_set.indices)
    vals = []
    for fold in range(3):
        dm = _module(folder, folds=3, fold=fold, split_seed=1)
        train, val = dm.train_set.indices, dm.val_set.indices
        assert sorted(train + val) == all_train and not set(train) & set(val)
        per_class = Counter(dm.val_set.dataset.targets[i] for i in val)
        assert sorted(per_class) == [0, 1, 2] and max(per_class.values()) - min(per_class.values()) <= 1
        assert dm.test_set.samples == plain.test_set.samples  # test untouched
        vals.append(val)
    assert sorted(itertools.chain(*vals)) == all_train  # the validation folds cover train once


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"folds": 3, "fold": 3}, r"data.fold must be an integer in \[0, 3\) with data.folds=3"),
        ({"folds": 3, "fold": -1}, r"data.fold must be an integer in \[0, 3\)"),
        ({"folds": 3}, r"data.fold must be an integer in \[0, 3\)"),
        ({"fold": 0}, r"data.fold=0 needs data.folds=K"),
        ({"folds": 1, "fold": 0}, r"data.folds must be an integer >= 2"),
        ({"folds": 8, "fold": 0}, r"data.folds=8 is larger than the smallest class \('a': 7 training image\(s\)\)"),
    ],
)
def test_bad_fold_settings_name_the_setting(folder, settings, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule.check_settings(
            {"root": folder, **settings}
        )  # what every run checks before it builds anything
        _module(folder, **settings)  # the split itself: a class smaller than the number of folds


def test_the_report_averages_each_experiment_over_its_folds(tmp_path):
    sweep = tmp_path / "sweep"
    number = 0
    for experiment, fold in itertools.product(("finetune", "frozen"), range(3)):
        results = results_for(experiment, 0) | {"val/acc": 0.8 + 0.05 * fold, "test/acc": None}
        job = write_job(sweep, number, experiment, 0, results, fold=fold, folds=3, test_after_fit=False)
        with open(job / ".hydra" / "overrides.yaml", "a") as overrides:
            overrides.write(f"- data.folds=3\n- data.fold={fold}\n")
        number += 1
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - experiment=finetune,frozen\n    - data.folds=3\n    - data.fold=0,1,2\n"
    )
    loaded = load_sweep(sweep)
    assert loaded.folds == [0, 1, 2] and loaded.problems == []
    table = to_markdown(loaded)
    assert "| finetune | 3/3 | n/a | 0.850 ± 0.050 |" in table  # mean over folds; validation only: no test
    assert "Folds 0, 1, 2 of k-fold validation" in table

    (sweep / "5_frozen_seed0" / "results.json").unlink()  # a fold that did not finish is named, not averaged away
    loaded = load_sweep(sweep)
    assert [p.split(" in ")[0] for p in loaded.problems] == ["failed: frozen seed 0 fold 2"]
    assert "| frozen | 2/3 |" in to_markdown(loaded)
