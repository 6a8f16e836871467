"""Streaming shards (data=shards, python -m finetune.shards): the folder's split and images, the folder's numbers,
every image once under DDP, a resumed stream, and bad shards refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

pytest.importorskip("litdata", reason="data=shards needs litdata: pip install -e '.[shards]'")

from finetune.data.shards import MANIFEST  # noqa: E402
from finetune.errors import PathError, SettingError  # noqa: E402
from finetune.evaluate import evaluate  # noqa: E402
from finetune.predict import predict  # noqa: E402
from finetune.run import build_datamodule  # noqa: E402
from finetune.shards import shards  # noqa: E402
from finetune.train import train  # noqa: E402

from .conftest import (  # noqa: E402
    assert_counted_accuracy,
    compose_config,
    count_correct,
    make_image_folder,
    run_cli,
    tiny_overrides,
)
from .inference import eval_config, predict_config  # noqa: E402
from .test_resume import RECIPE  # noqa: E402

TOL = {"rel": 1e-4, "abs": 1e-6}


def write(root: Path, output: Path, *extra: str) -> dict:
    """``python -m finetune.shards data=folder data.root=ROOT output=OUTPUT`` in this process."""
    overrides = ["data=folder", f"data.root={root}", "data.val_fraction=0.2", f"output={output}", "num_workers=1"]
    return shards(compose_config([*overrides, f"paths.output_dir={output.parent / 'run'}", *extra], "shards"))


def on_shards(overrides: list[str], root: Path, output: Path) -> list[str]:
    """The same run's overrides, reading the shards at ``output`` instead of the folder at ``root``."""
    return [
        "data=shards" if o == "data=folder" else (f"data.root={output}" if o == f"data.root={root}" else o)
        for o in overrides
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), n_train=10)


@pytest.fixture(scope="module")
def written(folder, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("written") / "shards"
    write(folder, output)
    return output


def datamodule(overrides: list[str]) -> pl.LightningDataModule:
    images = build_datamodule(compose_config(overrides))
    images.setup("fit")
    images.setup("test")
    return images


def items(dataset) -> list[tuple[torch.Tensor, int]]:
    return [dataset[i] for i in range(len(dataset))]


def test_shards_hold_the_folders_split_and_decode_to_the_same_tensors(folder, written, tmp_path):
    manifest = json.loads((written / MANIFEST).read_text())
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["split"] == {"val_fraction": 0.2, "split_seed": 0, "folds": None, "fold": None}
    assert {s: r["count"] for s, r in manifest["splits"].items()} == {"train": 16, "val": 4, "test": 8}
    assert manifest["splits"]["val"]["per_class"] == {"cat": 2, "dog": 2}
    assert sorted(p.name for p in (written / "train").iterdir())[-1] == "index.json"

    base = tiny_overrides(folder, tmp_path / "unused")
    plain = datamodule(base)
    streamed = datamodule(on_shards(base, folder, written))
    assert streamed.classes == plain.classes
    assert streamed.preprocessing == plain.preprocessing
    for name in ("val_set", "test_set", "train_eval_set"):  # the same images in the same order, bit for bit
        got, want = items(getattr(streamed, name)), items(getattr(plain, name))
        assert len(got) == len(want) > 0, name
        for (a, la), (b, lb) in zip(got, want, strict=True):
            assert la == lb and torch.equal(a, b), name
    # The loaders stream the same split: every val image once, labels as in the folder.
    labels = torch.cat([batch[1] for batch in streamed.val_dataloader()])
    assert sorted(labels.tolist()) == sorted(label for _, label in items(plain.val_set))


def test_shards_store_the_encoded_files_not_pixels(folder, written):
    from litdata import StreamingDataset

    record = StreamingDataset(str(written / "test"))[0]
    assert record["image"] == (folder / record["name"]).read_bytes()  # the PNG file itself


def test_writing_into_an_existing_output_is_refused_unless_overwrite(folder, written, tmp_path):
    before = {p: p.read_bytes() for p in written.rglob("*") if p.is_file()}
    with pytest.raises(PathError, match=r"already holds .*overwrite=true"):
        write(folder, written)
    assert {p: p.read_bytes() for p in written.rglob("*") if p.is_file()} == before

    other = tmp_path / "results"
    other.mkdir()
    (other / "mine.txt").write_text("a user's file")
    with pytest.raises(PathError, match=r"no manifest.json: it is not a shards folder"):
        write(folder, other, "overwrite=true")
    assert (other / "mine.txt").read_text() == "a user's file" and len(list(other.iterdir())) == 1

    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    manifest = write(folder, copy, "overwrite=true", "data.split_seed=4")
    assert manifest["split"]["split_seed"] == 4
    assert json.loads((copy / MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in copy.iterdir()) == [MANIFEST, "test", "train", "val"]  # no staging left behind


def test_shards_of_another_split_or_other_classes_are_refused_by_name(folder, written, tmp_path):
    base = on_shards(tiny_overrides(folder, tmp_path / "out"), folder, written)
    with pytest.raises(SettingError, match=r"another split \(data.split_seed: 0 in the shards, 5 now\)"):
        datamodule([*base, "data.split_seed=5"])
    with pytest.raises(SettingError, match=r"data.val_fraction: 0.2 in the shards, 0.3 now"):
        datamodule([*base, "data.val_fraction=0.3"])
    with pytest.raises(SettingError, match=r"data.folds: None in the shards, 2 now"):
        datamodule([*base, "data.folds=2", "data.fold=0"])
    # Evaluation reads only the test split, which no split setting changes: another val_fraction is no reason to
    # refuse it.
    test_only = build_datamodule(compose_config([*base, "data.val_fraction=0.3"]))
    test_only.setup("test")
    assert len(test_only.test_set) == 8
    with pytest.raises(SettingError, match=r"hold the classes \['cat', 'dog'\], but data.classes=\['cat', 'bird'\]"):
        build_datamodule(compose_config([*base, "data.classes=[cat,bird]"]))
    with pytest.raises(PathError, match=r"Cannot read the shards manifest .*nowhere/manifest.json"):
        build_datamodule(compose_config([*base, f"data.root={tmp_path / 'nowhere'}"]))
    with pytest.raises(SettingError, match="data.cache=memory does not apply to data=shards"):
        build_datamodule(compose_config([*base, "data.cache=memory"]))


def test_a_missing_or_truncated_shard_is_named(folder, written, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(written, copy)
    base = on_shards(tiny_overrides(folder, tmp_path / "out"), folder, copy)
    chunk = sorted((copy / "val").glob("*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(PathError, match=rf"Shard {chunk} is corrupt: .* bytes, .*index.json records"):
        datamodule(base)
    chunk.unlink()
    with pytest.raises(PathError, match=rf"Shard {chunk} is missing"):
        datamodule(base)


def test_an_image_that_does_not_decode_is_named_with_its_shards(tmp_path):
    images = make_image_folder(tmp_path / "images", n_train=10)
    (images / "test" / "dog" / "dog_001.png").write_bytes(b"not a png")
    output = tmp_path / "shards"
    write(images, output, "data.verify_images=false")  # the check that would have stopped it is off
    streamed = datamodule(on_shards(tiny_overrides(images, tmp_path / "out"), images, output))
    with pytest.raises(PathError, match=r"Image test/dog/dog_001.png in the shards .*/shards/test does not decode"):
        items(streamed.test_set)


def flat_folder(root: Path, n_train=(10, 13), n_test=(4, 3)) -> Path:
    """Every image one flat colour, all colours different: crops and flips leave it as it is, its colour names it."""
    index = 0
    for split, counts in (("train", n_train), ("test", n_test)):
        for label, (name, n) in enumerate(zip("ab", counts, strict=True)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = np.array([index * 5, 60 + 120 * label, 255 - index * 5], dtype=np.uint8)
                Image.fromarray(np.broadcast_to(colour, (36 + i % 5, 40, 3)).copy()).save(
                    root / split / name / f"{name}_{i:03d}.png"
                )
                index += 1
    return root


def flat_overrides(root: Path, out: Path, batch_size: int) -> list[str]:
    return [
        o.replace("data.batch_size=4", f"data.batch_size={batch_size}")
        for o in tiny_overrides(root, out)
        if not o.startswith("paths.output_dir")
    ] + [f"paths.output_dir={out}", "experiment=frozen", "trainer.max_epochs=3"]


def test_a_run_on_shards_gives_the_folders_numbers_and_record(tmp_path):
    """Frozen backbone, flat images, the whole train split in one batch: the order cannot matter, so a run on the
    shards and one on the folder must agree (everything else being the same transforms, split and model)."""
    images = flat_folder(tmp_path / "images")
    output = tmp_path / "shards"
    write(images, output)
    on_folder = train(compose_config(flat_overrides(images, tmp_path / "folder", 18)))
    streamed = train(compose_config(on_shards(flat_overrides(images, tmp_path / "streamed", 18), images, output)))
    assert streamed["status"] == on_folder["status"] == "completed"
    for key in ("val/acc", "test/acc", "test/loss", "val/temperature", "epochs"):
        assert streamed[key] == pytest.approx(on_folder[key], **TOL), key
    for got, want in zip(streamed["history"], on_folder["history"], strict=True):
        for key in want:
            assert got[key] == pytest.approx(want[key], **TOL), (want["epoch"], key)
    assert streamed["test/confusion_matrix"] == on_folder["test/confusion_matrix"]
    a = torch.load(tmp_path / "folder" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "streamed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["classes"] == b["classes"] == ["a", "b"] and a["preprocessing"] == b["preprocessing"]
    assert b["datamodule_hyper_parameters"]["root"] == str(output)
    assert set(streamed) == set(on_folder)  # results.json: the same record
    assert json.loads((tmp_path / "streamed" / "results.json").read_text())["status"] == "completed"

    # Evaluate: the shards-trained checkpoint on the shards scores as the folder-trained one on the folder.
    ckpt = {name: tmp_path / name / "checkpoints" / "last.ckpt" for name in ("folder", "streamed")}
    scored = evaluate(eval_config(ckpt["streamed"], output, tmp_path / "eval_streamed", "data=shards"))
    plain = evaluate(eval_config(ckpt["folder"], images, tmp_path / "eval_folder"))
    for key in ("test/acc", "test/loss"):
        assert scored[key] == pytest.approx(plain[key], **TOL), key
    assert (tmp_path / "eval_streamed" / "eval_results.json").is_file()
    # Predict (image files): the same probabilities from either checkpoint.
    rows = {
        name: predict(predict_config(ckpt[name], images / "test", tmp_path / f"predict_{name}"))
        for name in ("folder", "streamed")
    }
    assert [r["path"] for r in rows["streamed"]] == [r["path"] for r in rows["folder"]]
    for got, want in zip(rows["streamed"], rows["folder"], strict=True):
        assert got["label"] == want["label"] and not got["error"]
        for name in ("score", "a", "b"):
            assert got[name] == pytest.approx(want[name], **TOL)


def test_device_side_augmentation_streams_shards_as_it_does_the_folder(tmp_path):
    """data.augment_on=device: the loader hands over undecoded-size uint8 images, cropped and flipped after the
    transfer; on flat images every crop gives the same pixels, so shards and folder must give the same numbers."""
    images = flat_folder(tmp_path / "images")
    output = tmp_path / "shards"
    write(images, output)
    device = ["data.augment_on=device", "trainer.max_epochs=2", "calibrate=false"]
    on_folder = train(compose_config([*flat_overrides(images, tmp_path / "folder", 18), *device]))
    streamed = train(
        compose_config([*on_shards(flat_overrides(images, tmp_path / "streamed", 18), images, output), *device])
    )
    assert streamed["status"] == on_folder["status"] == "completed"
    for key in ("val/acc", "test/acc", "test/loss"):
        assert streamed[key] == pytest.approx(on_folder[key], **TOL), key
    for got, want in zip(streamed["history"], on_folder["history"], strict=True):
        assert got["train/loss"] == pytest.approx(want["train/loss"], **TOL), want["epoch"]
    checkpoint = torch.load(tmp_path / "streamed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["ShardsDataModule"]["device_augment"] == {"seed": 0, "batches": 2}  # 18 images, batch 18


class StopAt(pl.Callback):
    """Test-only: Ctrl+C at the end of training step ``step`` (as a person pressing it mid-epoch would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_a_run_stopped_mid_epoch_resumes_the_stream_where_it_stopped(tmp_path, folder, written):
    """16 training images, batch 4: 4 steps an epoch. Stopped after step 6 (two batches into the second epoch) and
    resumed, the run must end with the weights of two epochs straight, bit for bit: the resumed stream yields
    exactly the batches the stopped one had left, in the same order and with the same random crops."""

    def overrides(out: str, *extra: str) -> list[str]:
        base = [*RECIPE, "experiment=finetune", "trainer.max_epochs=2", *extra]
        return on_shards(base + tiny_overrides(folder, tmp_path / out), folder, written)

    straight = train(compose_config(overrides("straight")))
    stop = ["+callbacks.stop._target_=tests.test_shards.StopAt", "+callbacks.stop.step=6"]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        train(compose_config(overrides("stopped", *stop)))
    interrupted = torch.load(tmp_path / "stopped" / "checkpoints" / "interrupted.ckpt", weights_only=False)
    assert (interrupted["epoch"], interrupted["global_step"]) == (1, 6)
    (loader_state,) = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["num_samples_yielded"] > 0  # the stream's position is in the checkpoint

    resumed = train(compose_config(overrides("resumed", f"resume={tmp_path / 'stopped'}")))
    assert resumed["status"] == "completed" and resumed["epochs"] == 2
    for key in ("val/acc", "test/acc", "test/loss"):
        assert resumed[key] == straight[key], key
    assert resumed["history"][-1]["val/loss"] == straight["history"][-1]["val/loss"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


class SeenImages(pl.Callback):
    """Test-only: which flat-colour images (their index, read back from the colour) each rank saw, per stage and
    epoch, written to ``folder/rank<N>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.seen = Path(folder), {"train": [], "val": [], "test": []}

    @staticmethod
    def _ids(batch) -> list[int]:
        red = batch[0][:, 0, 0, 0].double() * 0.229 + 0.485  # data.mean/std: ImageNet's
        return [round(float(value) * 255 / 5) for value in red]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen["train"].append([])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.seen["val"].append([])

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.seen["test"].append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["train"][-1] += self._ids(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["val"][-1] += self._ids(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["test"][-1] += self._ids(batch)

    def on_test_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory) -> tuple[Path, Path, dict[str, list[int]]]:
    """Flat-colour images (an image's colour gives its index), their shards, and each split's image indices as
    the folder splits them, read image by image: train 18, val 5, test 7."""
    images = flat_folder(tmp_path_factory.mktemp("flat") / "images")
    output = images.parent / "shards"
    write(images, output)
    plain = datamodule(flat_overrides(images, images.parent / "unused", 1))
    split_ids = {split: ids_of(getattr(plain, f"{split}_set")) for split in ("train", "val", "test")}
    assert [len(split_ids[split]) for split in ("train", "val", "test")] == [18, 5, 7]
    return images, output, split_ids


def ids_of(dataset) -> list[int]:
    """The sorted indices of a split's flat-colour images (see :func:`flat_folder`)."""
    return sorted(SeenImages._ids([torch.stack([dataset[i][0] for i in range(len(dataset))])]))


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_each_loader_yields_the_batches_its_length_counts_and_reads_each_image_once(flat_shards, tmp_path, workers):
    """Lightning runs a loader for ``len(loader)`` batches and stops there: a loader that yields more batches than
    it counts loses its last images without a word (a stream whose workers each end with a partial batch did).
    Shards and folder, batch sizes that divide a split (val 5, test 7, train 18) and that do not, 0 to 3 loader
    workers. In one process training reads every image too (under DDP see the test below)."""
    images, output, split_ids = flat_shards
    for batch_size in (3, 5, 7):
        overrides = [*flat_overrides(images, tmp_path / "unused", batch_size), f"data.num_workers={workers}"]
        for source, config in (("shards", on_shards(overrides, images, output)), ("folder", overrides)):
            loaders = datamodule(config)
            for split in ("val", "test", "train"):
                loader = getattr(loaders, f"{split}_dataloader")()
                batches = [SeenImages._ids(batch) for batch in loader]
                where = f"{source} {split}, batch {batch_size}, {workers} workers"
                assert len(batches) == len(loader), where
                assert sorted(sum(batches, [])) == split_ids[split], where  # every image, each once


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [5, 3])  # 5 divides val (5), 3 divides train (18); neither divides test (7)
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_a_run_on_shards_trains_validates_and_tests_on_every_image_once(flat_shards, tmp_path, workers, batch_size):
    """What a run scores, counted: every val image in every epoch (checkpoint selection reads val/acc), every test
    image in the test after fit, each once, and the reported accuracies are those of these images."""
    images, output, split_ids = flat_shards
    seen = tmp_path / "seen"
    overrides = [
        *on_shards(flat_overrides(images, tmp_path / "run", batch_size), images, output),
        f"data.num_workers={workers}",
        "calibrate=false",
        "+callbacks.seen._target_=tests.test_shards.SeenImages",
        f"+callbacks.seen.folder={seen}",
        *count_correct(tmp_path / "counts.json"),
    ]
    results = train(compose_config(overrides))
    assert results["status"] == "completed" and results["epochs"] == 3
    scored = json.loads((seen / "rank0.json").read_text())
    assert [sorted(epoch) for epoch in scored["val"]] == [split_ids["val"]] * 3
    assert [sorted(epoch) for epoch in scored["test"]] == [split_ids["test"]]
    assert [sorted(epoch) for epoch in scored["train"]] == [split_ids["train"]] * 3
    counts = json.loads((tmp_path / "counts.json").read_text())
    for epoch, counted in zip(results["history"], counts["val"], strict=True):
        assert_counted_accuracy(epoch["val/acc"], counted, 5)
    assert_counted_accuracy(results["test/acc"], counts["test"], 7)
    assert np.sum(results["test/confusion_matrix"]["matrix"]) == 7


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "batch_size"), [(0, 4), (2, 3)])
def test_under_ddp_each_rank_streams_its_own_images_and_evaluation_sees_every_image_once(
    flat_shards, tmp_path, workers, batch_size
):
    """2 gloo processes. 23 training images: 18 train, 5 val; 7 test. Batch 4 or 3 per rank, 0 or 2 loader workers
    per rank (each worker of a stream ends with its own partial batch)."""
    images, output, split_ids = flat_shards
    seen = tmp_path / "seen"
    args = on_shards(flat_overrides(images, tmp_path / "run", batch_size), images, output) + [
        "trainer.strategy=ddp",
        "trainer.devices=2",
        f"data.num_workers={workers}",
        "calibrate=false",
        "+callbacks.seen._target_=tests.test_shards.SeenImages",
        f"+callbacks.seen.folder={seen}",
    ]
    run_cli(args)
    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in range(3):
        a, b = (rank["train"][epoch] for rank in ranks)
        assert len(a) == len(b)  # the same number of steps on both ranks, or DDP would hang
        assert not set(a) & set(b) and len(set(a)) == len(a) and len(set(b)) == len(b)  # no image twice
        assert set(a) | set(b) <= set(split_ids["train"])
        assert len(a) + len(b) > len(split_ids["train"]) - 2 * batch_size  # fewer than ranks x batch left out
        for stage in ("val", "test"):
            if stage == "val" or epoch == 0:  # validation every epoch, one test after fit
                every = sorted(ranks[0][stage][epoch] + ranks[1][stage][epoch])
                assert every == split_ids[stage], (stage, epoch)  # each image exactly once across the ranks
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # a new order every epoch
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    assert np.sum(results["test/confusion_matrix"]["matrix"]) == 7  # the report, synced over ranks: 7 images


@pytest.mark.slow
def test_under_ddp_a_batch_size_that_leaves_no_whole_batch_per_process_is_refused(flat_shards, tmp_path):
    """18 training images on 2 processes: each gets the same number of whole batches, none of 10. Lightning would
    skip the whole fit ("No training batches") and test the untrained weights as a completed run."""
    images, output, _ = flat_shards
    args = on_shards(flat_overrides(images, tmp_path / "run", 10), images, output)
    done = run_cli([*args, "trainer.strategy=ddp", "trainer.devices=2", "calibrate=false"], check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Error: data.batch_size=10 with 2 processes: the 18 training images of the shards give no whole batch" in (
        done.stderr
    )
    assert "Use data.batch_size=9 or less" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"
