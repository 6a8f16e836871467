"""finetune.predict: one row per input in input order, the checkpoint's preprocessing and names, bad inputs."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from finetune.calibrate import calibrate
from finetune.data.transforms import CLASSES, PREPROCESSING
from finetune.errors import SettingError
from finetune.evaluate import evaluate
from finetune.export import export
from finetune.harness.checkpoint_io import CheckpointError
from finetune.predict import predict
from finetune.robustness import robustness
from finetune.soup import soup

from .conftest import compose_config
from .inference import eval_config, evil_checkpoint, predict_config, run_module, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_folder_gives_one_row_per_image_in_order_with_class_columns(run, tmp_path):
    test = run["root"] / "test"
    rows = predict(predict_config(run["best_checkpoint"], test, tmp_path))
    written = read_csv(tmp_path / "predictions.csv")
    assert list(written[0]) == ["path", "label", "score", "cat", "dog", "error"]
    expected = sorted(str(p) for p in test.rglob("*.png"))
    assert [r["path"] for r in written] == expected == [r["path"] for r in rows]
    for r in written:
        probs = {c: float(r[c]) for c in ("cat", "dog")}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert r["label"] == max(probs, key=probs.get) and float(r["score"]) == pytest.approx(max(probs.values()))
        assert r["error"] == ""
    assert sum(r["label"] == Path(r["path"]).parent.name for r in written) / len(written) == run["test/acc"]


def test_a_photo_gets_the_probabilities_evaluate_computes(run, tmp_path):
    """Same preprocessing as finetune.evaluate: its per-image probability and loss match predict's to 1e-5."""
    # eval.yaml's data defaults are 224/256: evaluate and predict both take 32/36 from the checkpoint.
    evaluated = evaluate(eval_config(run["best_checkpoint"], run["root"], tmp_path / "eval"))
    rows = {r["path"]: r for r in predict(predict_config(run["best_checkpoint"], run["root"] / "test", tmp_path))}
    assert len(evaluated["test/top_losses"]) == len(rows) == 8
    for entry in evaluated["test/top_losses"]:
        row = rows[entry["path"]]
        assert row["label"] == entry["predicted"] and row["score"] == pytest.approx(entry["probability"], abs=1e-5)
        assert -math.log(row[entry["true"]]) == pytest.approx(entry["loss"], abs=1e-4)


def test_tta_flip_averages_with_the_mirror_image(run, tmp_path):
    images = sorted((run["root"] / "test").rglob("*.png"))[:3]
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for path in images:
        ImageOps.mirror(Image.open(path)).save(mirrored / path.name)
    plain = predict(predict_config(run["best_checkpoint"], images[0].parent, tmp_path / "a"))
    flipped = predict(predict_config(run["best_checkpoint"], mirrored, tmp_path / "b"))
    both = predict(predict_config(run["best_checkpoint"], images[0].parent, tmp_path / "c", "tta=flip"))
    by_name = {Path(r["path"]).name: r for r in flipped}
    assert not all(abs(by_name[Path(p["path"]).name]["cat"] - p["cat"]) < 1e-6 for p in plain[:3])
    for p, t in zip(plain[:3], both[:3], strict=True):
        mirror = by_name[Path(p["path"]).name]
        assert t["cat"] == pytest.approx((p["cat"] + mirror["cat"]) / 2, abs=1e-5)


def test_a_glob_a_single_file_and_json_output(run, tmp_path):
    pattern = "'" + str(run["root"] / "test" / "*" / "*_00[01].png") + "'"  # quoted: brackets are Hydra syntax
    rows = predict(predict_config(run["best_checkpoint"], pattern, tmp_path / "g", f"output={tmp_path / 'p.json'}"))
    written = json.loads((tmp_path / "p.json").read_text())
    assert [Path(r["path"]).name for r in written] == ["cat_000.png", "cat_001.png", "dog_000.png", "dog_001.png"]
    assert list(written[0]) == ["path", "label", "score", "cat", "dog", "error"] and written == json.loads(
        json.dumps(rows)
    )
    one = run["root"] / "test" / "dog" / "dog_002.png"
    assert [r["path"] for r in predict(predict_config(run["best_checkpoint"], one, tmp_path / "one"))] == [str(one)]


def test_unreadable_images_are_listed_and_the_others_predicted(run, tmp_path, caplog):
    folder = tmp_path / "mixed"
    shutil.copytree(run["root"] / "test" / "cat", folder)
    good = (folder / "cat_000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "not_an_image.jpg").write_text("hello")
    with caplog.at_level(logging.WARNING):
        rows = predict(predict_config(run["best_checkpoint"], folder, tmp_path / "out"))
    failed = {Path(r["path"]).name: r for r in rows if r["error"]}
    assert set(failed) == {"truncated.png", "not_an_image.jpg"} and len(rows) == 6
    assert all(r["label"] is None and r["cat"] is None for r in failed.values())
    assert "2 of 6 input(s) could not be read" in caplog.text
    written = read_csv(tmp_path / "out" / "predictions.csv")
    assert [r["error"] != "" for r in written] == [r["error"] != "" for r in rows]
    assert sum(r["label"] != "" for r in written) == 4


def test_nothing_predictable_is_an_error_after_listing_them(run, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="None of the 1 input"):
        predict(predict_config(run["best_checkpoint"], folder, tmp_path / "out"))
    assert read_csv(tmp_path / "out" / "predictions.csv")[0]["error"]


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        ("missing.png", FileNotFoundError, "no such file or folder"),
        ("empty", ValueError, "holds no images"),
        ("nothing*.png", FileNotFoundError, "matches no image files"),
    ],
)
def test_inputs_that_name_no_image(run, tmp_path, inputs, error, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(error, match=message):
        predict(predict_config(run["best_checkpoint"], tmp_path / inputs, tmp_path / "out"))


def test_files_that_are_not_images_get_no_row_and_are_named_in_a_warning(run, tmp_path, caplog):
    folder = tmp_path / "mixed"
    shutil.copytree(run["root"] / "test" / "cat", folder)
    Image.open(folder / "cat_000.png").save(folder / "anim.gif")  # PIL reads it; training does not
    (folder / "IMG_0001.heic").write_bytes(b"\0" * 64)
    (folder / "notes.txt").write_text("x")
    for n, inputs in enumerate((folder, "'" + str(folder / "*") + "'")):  # a folder, a glob
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            rows = predict(predict_config(run["best_checkpoint"], inputs, tmp_path / f"out{n}"))
        assert [Path(r["path"]).name for r in rows] == [f"cat_00{i}.png" for i in range(4)]
        skipped = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
        assert len(skipped) == 1 and "Skipping 3 file(s) of inputs=" in skipped[0]
        assert all(name in skipped[0] for name in ("anim.gif", "IMG_0001.heic", "notes.txt"))


def test_a_single_input_file_of_another_type_is_refused_naming_it(run, tmp_path):
    gif = tmp_path / "cat.gif"
    Image.open(run["root"] / "test" / "cat" / "cat_000.png").save(gif)
    with pytest.raises(SettingError, match=r"inputs=.*cat.gif: not an image file that finetune reads \(files ending"):
        predict(predict_config(run["best_checkpoint"], gif, tmp_path / "out"))
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("eval", ["+model.backbone=resnet34"], r"finetune.evaluate does not use model.backbone: the model \(backbone"),
        ("eval", ["+experiment=frozen"], r"does not use model.weights, model.freeze, model.head_lr_mult: "),
        (
            "predict",
            ["+model.backbone=resnet34", "+data.image_size=64"],
            r"predict does not use model.backbone, "
            r"data.image_size: the model .* is the checkpoint's; the images go through the checkpoint's own",
        ),
        ("export", ["+data.image_size=64"], r"finetune.export does not use data.image_size"),
        ("calibrate", ["+optimizer.lr=0.1"], r"finetune.calibrate does not use optimizer.lr: nothing is trained"),
        ("soup", ["+model.freeze=backbone"], r"finetune.soup does not use model.freeze"),
        ("robustness", ["+scheduler.T_max=3"], r"finetune.robustness does not use scheduler.T_max"),
    ],
)
def test_commands_that_load_a_checkpoint_refuse_model_settings_they_would_ignore(tmp_path, command, overrides, message):
    commands = {"eval": evaluate, "predict": predict, "export": export, "calibrate": calibrate, "soup": soup}
    checkpoint = f"ckpts=[{tmp_path / 'x.ckpt'}]" if command == "soup" else f"ckpt_path={tmp_path / 'x.ckpt'}"
    cfg = compose_config([checkpoint, f"paths.output_dir={tmp_path}", *overrides], command)
    with pytest.raises(SettingError, match=message):
        commands.get(command, robustness)(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


def test_an_existing_output_is_refused_unless_overwrite(run, tmp_path):
    output = tmp_path / "preds.csv"
    output.write_text("keep me")
    image = run["root"] / "test" / "cat" / "cat_000.png"
    with pytest.raises(FileExistsError, match="overwrite=true"):
        predict(predict_config(run["best_checkpoint"], image, tmp_path / "a", f"output={output}"))
    assert output.read_text() == "keep me"
    predict(predict_config(run["best_checkpoint"], image, tmp_path / "b", f"output={output}", "overwrite=true"))
    assert read_csv(output)[0]["path"] == str(image)


@pytest.mark.parametrize("extra, message", [("tta=rotate", "Unknown tta"), ("output=preds.txt", ".csv or .json")])
def test_bad_options_are_named(run, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        predict(predict_config(run["best_checkpoint"], run["root"] / "test", tmp_path, extra))


def test_an_early_checkpoint_without_class_names_is_refused_saying_why(run, tmp_path):
    checkpoint = torch.load(run["best_checkpoint"], map_location="cpu", weights_only=True)
    del checkpoint[CLASSES], checkpoint[PREPROCESSING]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    with pytest.raises(CheckpointError, match="records no class names or eval preprocessing"):
        predict(predict_config(tmp_path / "older.ckpt", run["root"] / "test", tmp_path))
    assert not (tmp_path / "predictions.csv").exists()


def test_a_cached_features_checkpoint_predicts_on_images(tmp_path_factory, tmp_path):
    frozen = trained_run(tmp_path_factory, cache_features=True)
    rows = predict(predict_config(frozen["best_checkpoint"], frozen["root"] / "test", tmp_path))
    assert len(rows) == 8 and all(r["label"] in ("cat", "dog") and not r["error"] for r in rows)


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(run, tmp_path):
    marker = tmp_path / "MARKER"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError) as err:
        predict(predict_config(evil, run["root"] / "test", tmp_path / "out"))
    assert str(evil) in str(err.value) and not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


@pytest.mark.slow
def test_the_command_line_and_two_process_ddp_give_every_row_once_in_order(run, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(run["root"] / "test", inputs)
    shutil.copy(inputs / "cat" / "cat_000.png", inputs / "extra.png")  # 9 inputs: uneven shards on 2 processes
    single = predict(predict_config(run["best_checkpoint"], inputs, tmp_path / "single"))
    args = [f"ckpt_path={run['best_checkpoint']}", f"inputs={inputs}", "num_workers=0", "batch_size=2"]
    args += [
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
    ]
    done = run_module("finetune.predict", [*args, f"hydra.run.dir={tmp_path / 'ddp'}"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").is_file()  # a second process did run
    rows = read_csv(tmp_path / "ddp" / "predictions.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in single] and len(rows) == 9
    for got, want in zip(rows, single, strict=True):
        assert float(got["cat"]) == pytest.approx(want["cat"], abs=1e-5) and got["label"] == want["label"]
    failing = run_module("finetune.predict", [args[0], f"inputs={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path}/x"])
    assert failing.returncode != 0 and "no such file or folder" in failing.stderr
