"""Few-shot: ``data.shots=K`` keeps K training images per class, drawn by ``data.shot_seed`` after the validation split;
a multirun over K and draws becomes accuracy against K with a mean and a 95% t-interval per K."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.data.splits import draw_shots, stratified_split
from finetune.errors import DataError, SettingError
from finetune.fewshot import cells, few_shot_jobs, to_markdown, write
from finetune.report import ReportError
from finetune.run import assemble, compose_config
from finetune.stats import summarize, t_half_width
from finetune.train import train

from .conftest import REPO, cli_env, make_image_folder, tiny_overrides

TARGETS = [0] * 30 + [1] * 20
CLASSES = ["a", "b"]


def test_k_images_per_class_are_drawn_from_what_validation_left_and_validation_never_changes():
    train_idx, val_idx = stratified_split(TARGETS, 0.2, seed=0)
    draws = {}
    for shots in (1, 2, 5, 16):
        for seed in range(4):
            kept = draw_shots(TARGETS, CLASSES, train_idx, shots, seed)
            assert [TARGETS[i] for i in kept].count(0) == [TARGETS[i] for i in kept].count(1) == shots
            assert set(kept) <= set(train_idx) and not set(kept) & set(val_idx)
            assert kept == draw_shots(TARGETS, CLASSES, train_idx, shots, seed)  # seeded
            draws[shots, seed] = kept
    assert len({tuple(draws[5, seed]) for seed in range(4)}) == 4  # another seed, other images
    for seed in range(4):  # one seed's draws are nested: K = 2 adds images to K = 1's
        assert set(draws[1, seed]) <= set(draws[2, seed]) <= set(draws[5, seed]) <= set(draws[16, seed])
    assert draw_shots(TARGETS, CLASSES, train_idx, None, 0) == train_idx


def test_more_shots_than_a_class_holds_is_refused_naming_the_setting_and_the_class_size():
    train_idx, _ = stratified_split(TARGETS, 0.2, seed=0)  # a: 24, b: 16 left to train on
    with pytest.raises(DataError, match=r"data.shots=17 is more than the training images of 1 class\(es\) \('b': 16"):
        draw_shots(TARGETS, CLASSES, train_idx, 17, 0)


def test_a_few_shot_run_trains_on_k_per_class_and_records_k_and_its_draw(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=10, n_test=2)
    cfg = compose_config(tiny_overrides(root, tmp_path / "run") + ["data.shots=3", "data.shot_seed=4"])
    run = assemble(cfg)
    run.images.setup("fit")
    assert run.images.class_counts() == [3, 3] and len(run.images.train_set) == 6
    assert len(run.images.val_set) == 4  # val_fraction 0.2 of 10 + 10, the same as without data.shots
    full = assemble(compose_config(tiny_overrides(root, tmp_path / "full")))
    full.images.setup("fit")
    assert full.images.split_indices["val"] == run.images.split_indices["val"]
    assert set(run.images.split_indices["train"]) < set(full.images.split_indices["train"])
    results = train(
        compose_config(tiny_overrides(root, tmp_path / "trained") + ["data.shots=3", "trainer.max_epochs=1"])
    )
    assert results["status"] == "completed" and (results["shots"], results["shot_seed"]) == (3, 0)


def test_data_shots_settings_are_checked_before_any_image_is_read(tmp_path):
    for value, match in (("data.shots=0", "data.shots must be an integer >= 1"), ("data.shot_seed=x", "shot_seed")):
        with pytest.raises(SettingError, match=match):
            assemble(compose_config(tiny_overrides(tmp_path / "missing", tmp_path / "out") + [value]))


def fake_sweep(folder: Path, accuracies: dict[tuple[str, int], list[float]]) -> Path:
    """Job folders as ``finetune.train -m`` leaves them, with only the results.json keys the report reads."""
    number = 0
    for (experiment, shots), values in accuracies.items():
        for seed, accuracy in enumerate(values):
            job = folder / f"{number}_{experiment}_seed0"
            (job / ".hydra").mkdir(parents=True)
            record = {"status": "completed", "experiment": experiment, "seed": 0, "shots": shots, "shot_seed": seed,
                      "test/acc": accuracy, "test/balanced_acc": accuracy, "val/acc": 0.5, "epochs": 3,
                      "fit_seconds": 1.0, "history": []}  # fmt: skip
            (job / "results.json").write_text(json.dumps(record))
            number += 1
    return folder


ACCURACIES = {("frozen", 1): [0.6, 0.7, 0.65, 0.55, 0.75], ("frozen", 5): [0.8, 0.82, 0.81, 0.79, 0.83],
              ("finetune", 1): [0.5, 0.9]}  # fmt: skip


def test_the_curve_is_the_mean_over_draws_with_a_95_percent_t_interval(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", ACCURACIES)
    jobs, others = few_shot_jobs([sweep])
    found = {(c.experiment, c.shots): c for c in cells(jobs)}
    assert len(jobs) == 12 and not others and set(found) == set(ACCURACIES)
    one_shot = found["frozen", 1]
    assert one_shot.stats["test/acc"].mean == pytest.approx(0.65)
    std = math.sqrt(sum((v - 0.65) ** 2 for v in ACCURACIES["frozen", 1]) / 4)
    assert one_shot.interval() == pytest.approx(2.776 * std / math.sqrt(5), rel=1e-3)  # t(0.975, 4 df) = 2.776
    assert t_half_width(summarize([0.5, 0.9])) == pytest.approx(12.706 * math.sqrt(0.08) / math.sqrt(2), rel=1e-3)
    assert "| frozen | 1 | 5 | 0.650 ± 0.098 |" in to_markdown(cells(jobs))


def test_fewshot_script_aggregates_sweeps_into_table_csv_and_figure(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", ACCURACIES)
    done = subprocess.run([sys.executable, "scripts/fewshot.py", "--from", str(sweep), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| finetune | 1 | 2 | 0.700 ± 2.541 |" in done.stdout
    rows = (tmp_path / "out" / "fewshot.csv").read_text().splitlines()
    assert rows[0].startswith("experiment,shots,draws,test_acc_mean,test_acc_std,test_acc_ci95") and len(rows) == 4
    assert (tmp_path / "out" / "fewshot.png").stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run([sys.executable, "scripts/fewshot.py", "--from", str(empty)], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2 and "fewshot: No job folders" in refused.stderr


def test_write_without_few_shot_jobs_says_so(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", {("frozen", 1): [0.5]})
    record = json.loads((sweep / "0_frozen_seed0" / "results.json").read_text())
    (sweep / "0_frozen_seed0" / "results.json").write_text(json.dumps({**record, "shots": None}))
    with pytest.raises(ReportError, match=r"No completed few-shot job .* 1 other job folder"):
        write([sweep], tmp_path / "out")
