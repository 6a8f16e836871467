"""Shift-aware selection: the shift benchmark on a copy of the validation split, and scripts/select_recipe.py ranking
candidates by clean and shifted validation accuracy (a test split's benchmark refused)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from finetune.robustness import robustness

from .conftest import REPO, compose_config
from .inference import trained_run


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


select_recipe = load_script("select_recipe")
val_split_folder = load_script("val_split_folder")


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> dict:
    """Two candidates (a fine-tune and a probe of one split), each benchmarked on the validation copy (one shifted
    set, to stay quick), and the fine-tune also on the test split."""
    tuned, probe = trained_run(tmp_path_factory), trained_run(tmp_path_factory, cache_features=True)
    folder = tmp_path_factory.mktemp("select")
    data = ["data=folder", f"data.root={tuned['root']}", "data.val_fraction=0.2"]  # the runs' split (tiny_overrides)
    val_split_folder.write_val_folder(folder / "val", data)
    found = {"val": folder / "val"}
    for name, run, root in (("tuned", tuned, folder / "val"), ("probe", probe, folder / "val"),
                            ("tuned_test", tuned, tuned["root"])):  # fmt: skip
        overrides = [
            "data=folder",
            f"data.root={root}",
            "split=test",
            "data.num_workers=0",
            "data.batch_size=4",
            "device=cpu",
            "shifts=[jpeg]",
            "severities=[3]",
            f"ckpt_path={run['best_checkpoint']}",
            f"paths.output_dir={folder / name}",
            f"paths.data_dir={folder / 'cache'}",
        ]
        robustness(compose_config(overrides, config_name="robustness"))
        found[name] = folder / name
    return found


def test_the_validation_copy_records_its_split_and_the_benchmark_keeps_that_record(benchmarks):
    record = json.loads((benchmarks["val"] / "validation_split.json").read_text())
    assert record["val_fraction"] == 0.2 and record["split_seed"] == 0 and record["classes"] == ["cat", "dog"]
    assert record["images"] == len(list((benchmarks["val"] / "test").glob("*/*"))) == 4  # 20% of 10 per class
    scored = json.loads((benchmarks["tuned"] / "robustness.json").read_text())
    assert scored["validation_split"] == record and scored["sets"]["clean"]["n"] == 4
    assert "a copy of the validation split of" in (benchmarks["tuned"] / "robustness.md").read_text()
    assert json.loads((benchmarks["tuned_test"] / "robustness.json").read_text())["validation_split"] is None


def test_candidates_are_ranked_by_clean_and_shifted_validation_accuracy(benchmarks, tmp_path, capsys):
    out = tmp_path / "ranking.csv"
    select_recipe.main([f"tuned={benchmarks['tuned']}", f"probe={benchmarks['probe']}", "--out", str(out)])
    printed = capsys.readouterr().out
    expected = {}
    for name in ("tuned", "probe"):
        scored = json.loads((benchmarks[name] / "robustness.json").read_text())
        clean, shifted = scored["sets"]["clean"]["acc"], scored["mean_over_shifts"]["acc"]
        expected[name] = (0.5 * clean + 0.5 * shifted, clean)
    rows = out.read_text().splitlines()
    assert rows[0].startswith("candidate,runs,score mean,score std,clean val acc mean")
    order = sorted(expected, key=lambda n: (-expected[n][0], -expected[n][1], n))
    assert [r.split(",")[0] for r in rows[1:]] == order
    assert float(rows[1].split(",")[2]) == pytest.approx(expected[order[0]][0])
    assert f"| {order[0]} | 1 | {expected[order[0]][0]:.3f} |" in printed
    # Clean accuracy alone: the weight moves to the clean column.
    clean_only = select_recipe.rank({n: [benchmarks[n]] for n in expected}, shift_weight=0.0)
    assert [r["score"].mean for r in clean_only] == sorted((expected[n][1] for n in expected), reverse=True)


def test_a_benchmark_of_the_test_split_is_refused(benchmarks, capsys):
    with pytest.raises(SystemExit) as stop:
        select_recipe.main([f"tuned={benchmarks['tuned_test']}", f"probe={benchmarks['probe']}"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("Error: ") and "not a copy of a validation split" in error
    assert "scripts/val_split_folder.py" in error


def test_benchmarks_of_other_shifts_are_not_ranked_together(benchmarks, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(benchmarks["probe"], other)
    scored = json.loads((other / "robustness.json").read_text())
    scored["sets"]["gaussian_blur-1"] = scored["sets"].pop("jpeg-3")
    (other / "robustness.json").write_text(json.dumps(scored))
    with pytest.raises(SystemExit) as stop:
        select_recipe.main([f"tuned={benchmarks['tuned']}", f"probe={other}"])
    assert stop.value.code == 2 and "scored different photos or shifted sets" in capsys.readouterr().err


def test_a_candidate_without_its_folder_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        select_recipe.main([f"a={tmp_path / 'nothing'}"])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("Error: ")
    with pytest.raises(SystemExit):
        select_recipe.main(["just-a-folder"])
    assert "NAME=DIR" in capsys.readouterr().err


def test_scores_average_over_a_candidates_runs(benchmarks, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(benchmarks["tuned"], again)
    scored = json.loads((again / "robustness.json").read_text())
    scored["sets"]["clean"]["acc"], scored["mean_over_shifts"]["acc"] = 1.0, 0.5
    (again / "robustness.json").write_text(json.dumps(scored))
    first = json.loads((benchmarks["tuned"] / "robustness.json").read_text())
    (row,) = select_recipe.rank({"tuned": [Path(benchmarks["tuned"]), again]}, shift_weight=0.5)
    one = 0.5 * first["sets"]["clean"]["acc"] + 0.5 * first["mean_over_shifts"]["acc"]
    assert row["runs"] == 2 and row["score"].mean == pytest.approx((one + 0.75) / 2) and row["score"].std is not None
