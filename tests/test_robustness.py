"""The shift benchmark: the shifts' pixels, the cached shifted folders, the scores, the entry point, the sweep table."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import shifts
from finetune.errors import SettingError
from finetune.report import load_sweep, to_csv, to_markdown
from finetune.robustness import CLEAN, MEAN, metrics_of, robustness, shift_sets
from finetune.shifts import MANIFEST, SHIFTS, apply_shift, check_shift, make_shifted_folder

from .conftest import compose_config, make_image_folder, run_cli
from .inference import trained_run
from .sweeps import make_full_sweep

ALL_SETS = [(name, severity) for name, shift in SHIFTS.items() for severity in shift.severities]


def textured(width: int = 120, height: int = 90, seed: int = 0) -> Image.Image:
    """A photo with edges and mid-range values everywhere (no shift is a no-op on it, none saturates it at once)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 196, size=(height // 6 + 1, width // 6 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(pixels, np.ones((6, 6, 1), dtype=np.uint8))[:height, :width], "RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


# --- the shifts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "severity"), ALL_SETS)
def test_a_shift_is_a_function_of_seed_and_image_path(name, severity):
    photo = textured()
    first = apply_shift(photo, name, severity, seed=0, relative_path="dog/a.png")
    again = apply_shift(photo, name, severity, seed=0, relative_path="dog/a.png")
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first.resize(photo.size)), np.asarray(photo)), "the shift changed nothing"
    if name in ("object_scale", "gaussian_noise"):  # random per image: another seed or path draws another result
        for seed, path in ((1, "dog/a.png"), (0, "dog/b.png")):
            other = apply_shift(photo, name, severity, seed=seed, relative_path=path)
            assert not np.array_equal(np.asarray(other), np.asarray(first))
    if name != "letterbox":
        assert first.size == photo.size


@pytest.mark.parametrize("name", ["gaussian_blur", "jpeg", "brightness", "contrast", "gaussian_noise"])
def test_a_higher_severity_changes_the_photo_more(name):
    photo = textured(240, 180)
    change = [np.abs(pixels(apply_shift(photo, name, s, 0, "a/x.png")) - pixels(photo)).mean() for s in (1, 2, 3)]
    assert 0 < change[0] < change[1] < change[2], change


def test_the_corruptions_have_imagenet_c_strengths():
    grey = Image.new("RGB", (200, 200), (128, 128, 128))
    noisy = pixels(apply_shift(grey, "gaussian_noise", 1, 0, "a/x.png")) - 128 / 255
    assert noisy.std() == pytest.approx(0.08, rel=0.05)  # no clipping around mid-grey
    photo = textured()
    low = pixels(apply_shift(photo, "contrast", 1, 0, "a/x.png"))
    assert low.std(axis=(0, 1)) == pytest.approx(0.4 * pixels(photo).std(axis=(0, 1)), rel=0.03)
    dark = Image.new("RGB", (20, 20), (100, 50, 0))  # HSV value 100/255: + 0.5, hue and saturation kept
    brighter = np.asarray(apply_shift(dark, "brightness", 3, 0, "a/x.png"))[0, 0]
    assert brighter[0] == pytest.approx(100 + 0.5 * 255, abs=1) and brighter[2] == 0
    assert brighter[1] / brighter[0] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_object_scale_shrinks_the_photo_off_centre_on_grey(severity):
    white = Image.new("RGB", (200, 160), (255, 255, 255))
    low, high = shifts.OBJECT_SCALE[severity]
    for index in range(8):
        path = f"hot_dog/{index}.png"
        shifted = shifts.object_scale(white, shifts.image_rng(0, "object_scale", severity, path), severity, "grey")
        assert shifted.size == white.size
        values = np.asarray(shifted)[..., 0]
        assert set(np.unique(values)) <= {128, 255}
        area = (values == 255).mean()
        assert (low - 0.01) ** 2 <= area <= (high + 0.01) ** 2, area
        rows, cols = np.nonzero(values == 255)
        centre = np.array([(cols.min() + cols.max()) / 2 - 100, (rows.min() + rows.max()) / 2 - 80])
        assert np.all(np.abs(centre) >= 0.2 * (1 - high) * np.array([200, 160])), centre  # not centred on any axis


def test_object_scale_draws_both_backgrounds():
    half = np.zeros((80, 80, 3), dtype=np.uint8)
    half[:, :40] = 255
    photo = Image.fromarray(half)
    backgrounds = set()
    for index in range(20):
        shifted = np.asarray(apply_shift(photo, "object_scale", 2, 0, f"a/{index}.png"))
        grey = np.all(shifted == 128, axis=-1).mean()  # the object covers at most a quarter of the frame
        backgrounds.add("grey" if grey >= 0.75 else "blur" if grey < 0.1 else f"neither ({grey:.2f} grey)")
    assert backgrounds == {"grey", "blur"}


@pytest.mark.parametrize(("severity", "size"), [(1, (120, 90)), (2, (120, 90)), (3, (60, 120)), (2, (300, 100))])
def test_letterbox_shows_the_whole_photo_at_the_aspect_asked(severity, size):
    photo = textured(*size)
    ratio = shifts.LETTERBOX[severity]
    orientations = set()
    for index in range(12):
        boxed = apply_shift(photo, "letterbox", severity, 0, f"a/{index}.png")
        width, height = boxed.size
        aspect = width / height
        assert min(abs(aspect - ratio), abs(aspect - 1 / ratio)) < 2 / min(width, height), boxed.size
        orientations.add(aspect > 1)
        assert width >= photo.width and height >= photo.height and (width == photo.width or height == photo.height)
        left, top = (width - photo.width) // 2, (height - photo.height) // 2
        inside = np.asarray(boxed)[top : top + photo.height, left : left + photo.width]
        assert np.array_equal(inside, np.asarray(photo))
        border = np.asarray(boxed).astype(int).sum() - inside.astype(int).sum()
        assert border == 0  # the rest is black
    assert orientations == {True, False}


def test_unknown_shifts_and_severities_are_refused_by_name():
    with pytest.raises(SettingError, match=r"Unknown shift 'fog' in shifts: choose from object_scale, letterbox"):
        check_shift("fog", 1)
    with pytest.raises(SettingError, match=r"'jpeg' has no severity 4 .*\[1, 2, 3\]"):
        check_shift("jpeg", 4)
    with pytest.raises(SettingError, match="'fog'"):
        shift_sets(["jpeg", "fog"], None)
    with pytest.raises(SettingError, match="no severity 0"):
        shift_sets(None, [0])
    with pytest.raises(SettingError, match="shifts must be a list"):
        shift_sets([], None)
    assert shift_sets("jpeg", None) == [("jpeg", 1), ("jpeg", 2), ("jpeg", 3)]
    assert shift_sets(["letterbox", "jpeg", "letterbox"], [3]) == [("letterbox", 3), ("jpeg", 3)]
    assert len(shift_sets(None, None)) == len(ALL_SETS) == 21


# --- the cached folders -------------------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path) -> Path:
    """``test/{cat,dog}/`` of three small photos each (JPEG and PNG), as a test folder is."""
    split = tmp_path / "photos" / "test"
    for index, name in enumerate(("cat", "dog")):
        (split / name).mkdir(parents=True)
        for i in range(3):
            textured(50 + 10 * i, 40, seed=10 * index + i).save(split / name / f"{name}{i}.{'jpg' if i else 'png'}")
    return split


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_shifted_folder_has_every_image_as_png_and_a_manifest(photos, tmp_path):
    folder = make_shifted_folder(photos, "gaussian_noise", 2, seed=3, cache_root=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "gaussian_noise-2"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert files == [f"{c}/{c}{i}.png" for c in ("cat", "dog") for i in range(3)]
    for name in files:
        source = next((photos / name).parent.glob(Path(name).stem + ".*"))
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.size == Image.open(source).size
            expected = apply_shift(
                Image.open(source).convert("RGB"), "gaussian_noise", 2, 3, source.relative_to(photos).as_posix()
            )
            assert np.array_equal(np.asarray(image), np.asarray(expected))
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (manifest["shift"], manifest["severity"], manifest["seed"], manifest["images"]) == (
        "gaussian_noise",
        2,
        3,
        6,
    )
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["gaussian_noise-2"]  # no temporary folder left


def test_one_image_does_not_depend_on_the_others(photos, tmp_path):
    alone = tmp_path / "alone" / "test"
    (alone / "cat").mkdir(parents=True)
    (alone / "dog").mkdir(parents=True)
    shutil.copy2(photos / "cat" / "cat1.jpg", alone / "cat" / "cat1.jpg")
    shutil.copy2(photos / "dog" / "dog2.jpg", alone / "dog" / "dog2.jpg")
    for shift in ("object_scale", "gaussian_noise"):
        full = make_shifted_folder(photos, shift, 1, 0, tmp_path / "full")
        part = make_shifted_folder(alone, shift, 1, 0, tmp_path / "part")
        for name in ("cat/cat1.png", "dog/dog2.png"):
            assert (full / name).read_bytes() == (part / name).read_bytes()


def test_a_complete_cache_is_reused_and_a_changed_source_rebuilds_it(photos, tmp_path):
    cache = tmp_path / "cache"
    folder = make_shifted_folder(photos, "object_scale", 1, 0, cache)
    before = mtimes(folder)
    assert make_shifted_folder(photos, "object_scale", 1, 0, cache) == folder
    assert mtimes(folder) == before  # nothing rewritten
    textured(64, 64, seed=99).save(photos / "dog" / "dog9.png")  # a new image
    make_shifted_folder(photos, "object_scale", 1, 0, cache)
    assert (folder / "dog" / "dog9.png").is_file()
    before = mtimes(folder)
    os.utime(photos / "cat" / "cat0.png", ns=(1, 1))  # the same name and size, touched
    make_shifted_folder(photos, "object_scale", 1, 0, cache)
    assert all(mtimes(folder)[name] != before[name] for name in before if name.endswith(".png"))
    seeded = make_shifted_folder(photos, "object_scale", 1, 1, cache)  # another seed: other pixels
    assert json.loads((seeded / MANIFEST).read_text())["seed"] == 1


@pytest.mark.parametrize("damage", ["missing image", "truncated image", "no manifest", "other version"])
def test_a_partial_or_stale_cache_is_rebuilt(photos, tmp_path, damage):
    folder = make_shifted_folder(photos, "jpeg", 2, 0, tmp_path / "cache")
    whole = {name: (folder / name).read_bytes() for name in ("cat/cat1.png", "dog/dog0.png")}
    if damage == "missing image":
        (folder / "cat" / "cat1.png").unlink()
    elif damage == "truncated image":
        data = (folder / "cat" / "cat1.png").read_bytes()
        (folder / "cat" / "cat1.png").write_bytes(data[: len(data) // 2])
    elif damage == "no manifest":  # what an interrupted build would look like, had it been written in place
        (folder / MANIFEST).unlink()
    else:
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "version": shifts.SHIFTS_VERSION - 1}))
    before = mtimes(folder)
    make_shifted_folder(photos, "jpeg", 2, 0, tmp_path / "cache")
    assert {name: (folder / name).read_bytes() for name in whole} == whole
    assert mtimes(folder) != before and (folder / MANIFEST).is_file()


def test_an_interrupted_build_is_never_taken_and_its_leftovers_go(photos, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    leftover = cache / f".contrast-1.{dead.pid}.abcd1234.tmp"
    (leftover / "cat").mkdir(parents=True)
    (leftover / "cat" / "cat0.png").write_bytes(b"half")
    folder = make_shifted_folder(photos, "contrast", 1, 0, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["contrast-1"]
    assert len(list(folder.rglob("*.png"))) == 6


def test_two_files_of_one_stem_both_get_a_shifted_copy(photos, tmp_path):
    textured(30, 30, seed=5).save(photos / "cat" / "cat1.png")  # beside cat1.jpg
    folder = make_shifted_folder(photos, "brightness", 1, 0, tmp_path / "cache")
    assert {p.name for p in (folder / "cat").iterdir()} == {"cat0.png", "cat1.jpg.png", "cat1.png.png", "cat2.png"}


# --- the scores ---------------------------------------------------------------------------------------------------


def test_the_scores_of_known_logits():
    # True class a, b, b, a; predicted a (0.9, right), a (0.62, wrong), b (0.8, right), a (0.55, right).
    probs = torch.tensor([[0.9, 0.1], [0.62, 0.38], [0.2, 0.8], [0.55, 0.45]])
    scored = metrics_of(probs.log(), torch.tensor([0, 1, 1, 0]), ["a", "b"])
    assert scored["n"] == 4 and scored["acc"] == pytest.approx(0.75)
    assert scored["recall"] == pytest.approx({"a": 1.0, "b": 0.5})
    nll = -(math.log(0.9) + math.log(0.38) + math.log(0.8) + math.log(0.55)) / 4
    assert scored["nll"] == pytest.approx(nll, rel=1e-5)
    # ECE, 15 bins of the top probability: 0.9, 0.62, 0.8, 0.55 fall in four bins, right, wrong, right, right.
    assert scored["ece"] == pytest.approx((0.1 + 0.62 + 0.2 + 0.45) / 4, rel=1e-5)
    # AUROC of b's probability: positives 0.38, 0.8 against negatives 0.1, 0.45: 3 of the 4 pairs in order.
    assert scored["auroc"] == pytest.approx(0.75)


# --- the entry point ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory)


def only_test_split(root: Path, destination: Path) -> Path:
    """A copy of ``root/test`` alone: the benchmark needs no train/."""
    shutil.copytree(root / "test", destination / "test")
    return destination


def robustness_config(ckpt: Path, root: Path, output_dir: Path, *extra: str):
    overrides = [
        "data=folder",
        f"data.root={root}",
        "data.num_workers=0",
        "data.batch_size=4",
        "device=cpu",
        f"ckpt_path={ckpt}",
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={output_dir.parent / 'data'}",
        *extra,
    ]
    return compose_config(overrides, config_name="robustness")


def test_the_benchmark_scores_the_clean_split_and_every_shift(trained, tmp_path, capsys, caplog):
    root = only_test_split(trained["root"], tmp_path / "photos")
    out = tmp_path / "bench"
    with caplog.at_level(logging.INFO, logger="finetune.robustness"):
        results = robustness(robustness_config(Path(trained["best_checkpoint"]), root, out))
    written = json.loads((out / "robustness.json").read_text())
    assert written == json.loads(json.dumps(results))
    sets = written["sets"]
    assert list(sets) == [CLEAN] + [f"{name}-{severity}" for name, severity in ALL_SETS]
    for record in sets.values():
        assert record["n"] == 8 and 0 <= record["acc"] <= 1 and 0 <= record["ece"] <= 1 and record["nll"] > 0
        assert set(record["recall"]) == {"cat", "dog"}
    # The clean set is the test split through the checkpoint's preprocessing: the training run's own test score.
    assert sets[CLEAN]["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert written["preprocessing"]["image_size"] == 32 and written["preprocessing"]["resize_size"] == 36
    shifted = [record for name, record in sets.items() if name != CLEAN]
    for key in ("acc", "ece", "nll"):
        assert written[MEAN][key] == pytest.approx(np.mean([record[key] for record in shifted]))
    assert written[MEAN]["recall"]["dog"] == pytest.approx(np.mean([r["recall"]["dog"] for r in shifted]))
    assert written["gap"] == pytest.approx(sets[CLEAN]["acc"] - written[MEAN]["acc"])
    assert written["mean_by_shift"]["jpeg"]["acc"] == pytest.approx(
        np.mean([sets[f"jpeg-{s}"]["acc"] for s in (1, 2, 3)])
    )
    rows = (out / "robustness.csv").read_text().splitlines()
    assert rows[0] == "set,shift,severity,n,acc,auroc,ece,nll,recall/cat,recall/dog"
    assert len(rows) == 1 + 22 + 1 and rows[-1].startswith(f"{MEAN},,,{8 * 21},")
    table = (out / "robustness.md").read_text()
    assert f"| object_scale-3 | 8 | {sets['object_scale-3']['acc']:.3f} |" in table
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("Wrote ") and str(out / "robustness.json") in printed[-1]
    cache = Path(written["shift_cache"])
    assert cache.parent == tmp_path / "data" / "shifts" and len(list(cache.glob("*/manifest.json"))) == 21
    on_disk = sum(p.stat().st_size for p in cache.glob("*/*/*.png"))  # the disk the copies take is said
    assert written["shift_cache_bytes"] == on_disk > 0
    said = [r.getMessage() for r in caplog.records if "shifted set(s) take" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"The 21 shifted set(s) take {on_disk / 1e6:.1f} MB in {cache} (")
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scored ")]
    assert [line.split(" (")[0] for line in progress] == [f"scored {name}" for name in sets]  # one per set, in order
    assert progress[0].startswith(f"scored {CLEAN} (1/22): accuracy {sets[CLEAN]['acc']:.3f} (")
    before = mtimes(cache)
    robustness(robustness_config(Path(trained["best_checkpoint"]), root, tmp_path / "again", "shifts=[jpeg]"))
    assert mtimes(cache) == before  # a second benchmark of the same folder reuses the shifted copies


def test_the_scores_come_from_the_logits_function_given(trained, tmp_path):
    """Whatever produces the logits (test-time augmentation, a temperature) plugs in without touching the rest."""
    cfg = robustness_config(Path(trained["best_checkpoint"]), trained["root"], tmp_path / "bench", "shifts=[letterbox]")
    results = robustness(cfg, logits_fn=lambda images: torch.tensor([[2.0, 0.0]]).repeat(len(images), 1))
    for record in results["sets"].values():
        assert record["acc"] == 0.5 and record["recall"] == {"cat": 1.0, "dog": 0.0}
        assert record["nll"] == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2)
    assert results["gap"] == 0


def test_a_folder_of_other_classes_is_refused(trained, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("apple", "pear"), n_train=1, n_test=2)
    with pytest.raises(ValueError, match=r"predicts the classes \['cat', 'dog'\].*\['apple', 'pear'\]"):
        robustness(robustness_config(Path(trained["best_checkpoint"]), other, tmp_path / "bench"))


@pytest.mark.slow
def test_the_command_line_runs_and_names_a_bad_shift(trained, tmp_path):
    args = [
        f"ckpt_path={trained['best_checkpoint']}",
        "data=folder",
        f"data.root={trained['root']}",
        "data.num_workers=0",
        "device=cpu",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    bad = run_cli(
        [*args, f"hydra.run.dir={tmp_path / 'bad'}", "shifts=[fog]"], module="finetune.robustness", check=False
    )
    assert bad.returncode == 2 and "Unknown shift 'fog'" in bad.stderr and "Traceback" not in bad.stderr
    good = run_cli(
        [*args, f"hydra.run.dir={tmp_path / 'good'}", "shifts=[object_scale]", "severities=[1]"],
        module="finetune.robustness",
    )
    assert good.stdout.strip().splitlines()[-1].startswith("Wrote ")
    assert set(json.loads((tmp_path / "good" / "robustness.json").read_text())["sets"]) == {CLEAN, "object_scale-1"}


# --- the sweep table ----------------------------------------------------------------------------------------------


def test_the_sweep_table_gets_shift_columns_from_the_jobs_benchmarks(tmp_path):
    sweep = make_full_sweep(tmp_path / "sweep")
    assert "shift acc" not in to_markdown(load_sweep(sweep))
    shift_acc = {0: 0.80, 1: 0.70, 2: 0.75}
    for job in sorted(
        p for p in sweep.iterdir() if p.name.endswith(("_finetune_seed0", "_finetune_seed1", "_finetune_seed2"))
    ):
        seed = int(job.name[-1])
        record = {MEAN: {"acc": shift_acc[seed], "ece": 0.1 * seed}, "gap": 0.9 - shift_acc[seed]}
        (job / "robustness").mkdir()
        (job / "robustness" / "robustness.json").write_text(json.dumps(record))
    loaded = load_sweep(sweep)
    table = to_markdown(loaded)
    assert table.splitlines()[0].endswith("| fit s | shift acc | shift gap | shift ECE |")
    finetune_row = next(line for line in table.splitlines() if line.startswith("| finetune |"))
    assert finetune_row.endswith("| 0.750 ± 0.050 | 0.150 ± 0.050 | 0.100 ± 0.100 |")
    scratch_row = next(line for line in table.splitlines() if line.startswith("| scratch |"))
    assert scratch_row.endswith("| n/a | n/a | n/a |")
    assert "from the 3 job(s) with a robustness/robustness.json" in table
    header, finetune_csv = to_csv(loaded).splitlines()[:2]
    assert header.endswith(
        "shift_mean_acc_mean,shift_mean_acc_std,shift_gap_mean,shift_gap_std,shift_ece_mean,shift_ece_std"
    )
    assert finetune_csv.split(",")[-6:-4] == ["0.75", "0.05"]
