"""Does the input pipeline keep the accelerator busy? The training step alone against end to end, per data path.

    python scripts/benchmark_gpu.py --data DIR --weights mobilenet_v2.pth --json gpu.json   # one GPU, ~6 minutes
    python scripts/benchmark_gpu.py --data synthetic --json gpu.json                        # no data at hand
    python scripts/benchmark_gpu.py --smoke                                                 # CPU, tiny: plumbing
    python scripts/benchmark_gpu.py --device cpu --loader-only --data DIR --batch-size 128  # loaders alone

Everything runs in this process (one CUDA start-up, no data verification per row) and is built by
``finetune.run.assemble`` from the composed ``experiment=finetune`` config, as ``finetune.train`` builds it. Rows per
backbone (``--backbones``, default mobilenet_v2 and resnet18), all at ``trainer.precision=bf16-mixed``
(``--precision``) and ``+callbacks=channels_last`` unless the row says otherwise:

- ``step``, ``step NCHW``, ``step compiled``: the training step alone (forward, backward, optimizer) on one synthetic
  batch already on the device, with channels_last, without it, and with ``+callbacks=compile``;
- ``loader``: end to end with the default loader (``data.augment_on=loader data.cache=none``);
- ``loader+cache``: ``data.cache=memory`` (decoded once; crop, flip and normalisation still in the workers);
- ``device``: ``data.cache=memory data.augment_on=device`` (workers copy pixels; the device crops);
- ``device+compile``: the same with ``+callbacks=compile``;
- ``device ddp``: the ``device`` row under ``trainer.strategy=ddp`` on one device (DDP's own cost).

Each row times ``--timed`` batches after ``--warmup`` batches (end to end: from the end of the last warm-up batch, so
the data waits count). Epochs are made ``--epoch-images`` long by repeating the training split, as the d2l hot dog
set's 2,000 training images would be; the table gives images/s, the ratio to the ``step`` row (how much of the
accelerator's speed reaches training) and the seconds per 2,000-image epoch. With ``--loader-only`` (and before the
training rows, within the budget) the train loaders alone are timed: images/s over one epoch after the first batch,
for the loader path, the cached loader path, the device path's uint8 batches, and those batches augmented on
``--device``.

``--budget`` seconds cover everything: a row that would not fit is SKIPPED, one that runs over is stopped
(TIMEOUT) and the table so far is printed; ``--json`` is rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, even where another copy is installed

from finetune import atomic  # noqa: E402
from finetune.data.device_augment import RawBatch  # noqa: E402
from finetune.harness import bench  # noqa: E402
from finetune.run import assemble, build_datamodule, compose_config  # noqa: E402

FAST = ["+callbacks=channels_last"]
FAST_COMPILED = ["+callbacks=[channels_last,compile]"]  # Hydra takes one +callbacks= per command line
CACHED = ["data.cache=memory"]
DEVICE = [*CACHED, "data.augment_on=device"]
# name -> (overrides, synthetic on-device batches?, seconds the row needs at least), in the order they run (every
# backbone's cheap rows first, so that a budget that runs out loses compile rows first).
ROWS = {
    "step": ([*FAST], True, 20),
    "loader": ([*FAST, "data.augment_on=loader", "data.cache=none"], False, 30),
    "loader+cache": ([*FAST, *CACHED], False, 30),
    "device": ([*FAST, *DEVICE], False, 30),
    "step NCHW": ([], True, 20),
    "device ddp": ([*FAST, *DEVICE, "trainer.strategy=ddp"], False, 40),
    "device+compile": ([*FAST_COMPILED, *DEVICE], False, 90),
    "step compiled": ([*FAST_COMPILED], True, 60),
}
LOADERS = {
    "loader": ["data.augment_on=loader", "data.cache=none"],
    "loader+cache": ["data.augment_on=loader", *CACHED],
    "device, uint8 batches": DEVICE,
    "device, augmented": DEVICE,
}


class RowTimeout(Exception):
    pass


# --- composing and timing ----------------------------------------------------------------------------------------


def common_overrides(args, backbone: str, output_dir: Path) -> list[str]:
    weights = args.weights if backbone == "mobilenet_v2" else None
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    shared = bench.common_overrides(
        "finetune", args.data, backbone, weights, args.batch_size, args.num_workers, accelerator, output_dir
    )
    return shared + [
        f"data.image_size={args.image_size}",
        "data.verify_images=false",
        f"trainer.precision={args.precision}",
        "trainer.devices=1",
        "trainer.max_epochs=1000",  # an upper bound: the timing callback stops the run
        "trainer.limit_val_batches=0",
        "~callbacks.model_checkpoint",
        "logger=[]",
        f"seed={args.seed}",
    ]


class RepeatTrainSet(pl.Callback):
    """Make every training epoch about ``images`` long by repeating the training split, after the DataModule's setup."""

    def __init__(self, images: int) -> None:
        self.target = images

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and getattr(datamodule, "train_set", None) is not None:
            datamodule.train_set = repeated(datamodule.train_set, self.target, datamodule.batch_size)


def repeated(dataset, images: int, batch_size: int):
    """``dataset`` repeated to about ``images``, cut to whole batches (a partial batch recompiles a compiled graph)."""
    copies = max(1, math.ceil(images / len(dataset)))
    length = max(batch_size, copies * len(dataset) // batch_size * batch_size)
    return Subset(ConcatDataset([dataset] * copies), range(min(length, copies * len(dataset))))


class SyntheticBatches:
    """``count`` references to one batch of random images already on the device: the step alone, no loading."""

    def __init__(self, args, device: torch.device, count: int) -> None:
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        self.batch = (
            torch.randn(shape, device=device, generator=generator),
            torch.randint(0, 2, (args.batch_size,), device=device, generator=generator),
        )
        self.count = count

    def __iter__(self):
        return (self.batch for _ in range(self.count))

    def __len__(self) -> int:
        return self.count


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`RowTimeout` in this (main) thread after ``seconds`` (whole seconds, at least 1)."""

    def expire(signum, frame):
        raise RowTimeout(f"stopped after {seconds:.0f}s (--row-timeout, or the --budget left)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_row(args, backbone: str, name: str, workdir: Path) -> dict:
    overrides, synthetic, _ = ROWS[name]
    output_dir = workdir / f"{backbone}-{name.replace(' ', '_')}"
    cfg = compose_config(common_overrides(args, backbone, output_dir) + overrides)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    timer = bench.TimedBatches(args.warmup, args.timed, include_first_wait=True)
    started = time.perf_counter()
    run = assemble(cfg, [timer, RepeatTrainSet(args.epoch_images)])
    environment = dict(os.environ)  # DDP's launcher sets MASTER_PORT, LOCAL_RANK, ... for this process
    try:
        if synthetic:
            batches = SyntheticBatches(args, torch.device(args.device), args.warmup + args.timed)
            run.trainer.fit(run.model, train_dataloaders=batches)
        else:
            run.trainer.fit(run.model, datamodule=run.datamodule)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    if timer.seconds is None:
        raise RuntimeError(f"the run ended after {timer.seen} batches, before the timed window closed")
    compiled = getattr(run.model, "compiled", False)
    result = {"images": timer.images, "seconds": timer.seconds, "row_seconds": time.perf_counter() - started}
    result.update(images_per_s=timer.images / timer.seconds, compiled=compiled, overrides=overrides)
    del run
    return result


# --- loaders alone -----------------------------------------------------------------------------------------------
def loader_rate(args, name: str, workdir: Path) -> dict:
    cfg = compose_config(common_overrides(args, "resnet18", workdir / "loaders") + LOADERS[name])
    datamodule = build_datamodule(cfg)
    started = time.perf_counter()
    datamodule.setup("fit")
    setup_seconds = time.perf_counter() - started
    datamodule.train_set = repeated(datamodule.train_set, args.epoch_images, args.batch_size)
    device = torch.device(args.device)
    augment = name == "device, augmented"
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    start, images = time.perf_counter(), 0
    for batch in iterator:
        if augment:
            batch = datamodule.on_before_batch_transfer(batch, 0)
            batch = RawBatch(*(t.to(device, non_blocking=True) if t is not None else t for t in batch))
            batch = datamodule.on_after_batch_transfer(batch, 0)
        images += len(batch.targets if isinstance(batch, RawBatch) else batch[1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del iterator, datamodule
    gc.collect()
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "setup_seconds": setup_seconds}


# --- synthetic data and the report --------------------------------------------------------------------------------
def make_photo_folder(root: Path, train_per_class: int, size: tuple[int, int], test_per_class: int = 5) -> Path:
    """JPEGs with smooth colour fields, edges and grain (decode cost like photos'), two classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size if i % 3 else size[::-1]
                coarse = rng.integers(0, 256, size=(h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
                pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def table(report: dict) -> str:
    lines = []
    if report["loaders"]:
        lines.append("Train loaders alone (images/s over one epoch after the first batch; median of repeats)")
        for name, runs in report["loaders"].items():
            rates = [r["images_per_s"] for r in runs]
            setup = statistics.median(r["setup_seconds"] for r in runs)
            each = " ".join(f"{x:.0f}" for x in rates)
            lines.append(f"  {name:<24}{statistics.median(rates):>9.0f}   ({each}; setup {setup:.1f}s)")
    order = {name: k for k, name in enumerate(ROWS)}
    backbones = report["args"]["backbones"].split(",")
    rows = sorted(report["rows"], key=lambda r: (backbones.index(r["backbone"]), order[r["row"]]))
    lines += [f"  loader {error}" for error in report.get("loader_errors", [])]
    if rows:
        header = f"{'backbone':<14}{'row':<16}{'status':<9}{'img/s':>9}{'/ step':>8}{'s/2000 img':>12}{'row s':>8}"
        lines += ["", header, "-" * len(header)]
        for row in rows:
            rate = row.get("images_per_s")
            step = next((r for r in rows if r["backbone"] == row["backbone"] and r["row"] == "step"), {})
            ratio = f"{rate / step['images_per_s']:.2f}" if rate and step.get("images_per_s") else "-"
            cells = f"{rate:>9.0f}{ratio:>8}{2000 / rate:>12.2f}" if rate else f"{'-':>9}{'-':>8}{'-':>12}"
            seconds = row.get("row_seconds", 0)
            lines.append(f"{row['backbone']:<14}{row['row']:<16}{row['status']:<9}{cells}{seconds:>8.0f}")
        lines += [f"  {r['backbone']} {r['row']}: {r['status']} {r['error']}" for r in rows if r.get("error")]
        uncompiled = [r for r in rows if "compile" in r["row"] and r["status"] == "OK" and not r.get("compiled")]
        lines += [f"  {r['backbone']} {r['row']}: torch.compile failed; the row ran uncompiled" for r in uncompiled]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="synthetic", help="train/<class>/, test/<class>/ folder, or 'synthetic'")
    parser.add_argument("--weights", default=None, help="mobilenet_v2 state_dict PATH (default: random weights)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer.precision of every row")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--epoch-images", type=int, default=2000, help="repeat the training split to this length")
    parser.add_argument("--warmup", type=int, default=20, help="batches before the timed window")
    parser.add_argument("--timed", type=int, default=32, help="batches in the timed window")
    parser.add_argument("--loader-repeats", type=int, default=1, help="0 skips the loader-only measurement")
    parser.add_argument("--loader-only", action="store_true")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend for compile rows")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    parser.add_argument("--row-timeout", type=float, default=180.0, help="seconds for one row at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here (after every row)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny images and batches, eager compile: plumbing")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.smoke:
        args.device, args.batch_size, args.image_size, args.epoch_images = "cpu", 4, 32, 24
        args.warmup, args.timed, args.compile_backend, args.num_workers = 2, 3, "eager", "0"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible (use --device cpu, or --smoke)")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.compile_backend != "inductor":
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    report = {"machine": bench.machine(args.device), "args": vars(args), "loaders": {}, "rows": []}

    def save() -> None:
        if args.json:
            atomic.write_text(args.json, json.dumps(report, indent=2, default=str))

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="benchmark-gpu-") as tmp:
        workdir = Path(tmp)
        if args.data == "synthetic" or args.smoke:
            size = (40, 48) if args.smoke else (384, 512)
            args.data = str(make_photo_folder(workdir / "data", 10 if args.smoke else 250, size))
        print(f"{report['machine']}\ndata {args.data}; batch {args.batch_size}, {args.image_size} px", flush=True)

        for repeat in range(max(args.loader_repeats, 1) if args.loader_only else args.loader_repeats):
            order = list(LOADERS)[repeat % len(LOADERS) :] + list(LOADERS)[: repeat % len(LOADERS)]
            for name in order:
                if left() < 15:
                    break
                try:
                    with time_limit(min(left(), args.row_timeout)):
                        measured = loader_rate(args, name, workdir)
                except Exception as err:  # noqa: BLE001 - RowTimeout included: the training rows still run
                    report.setdefault("loader_errors", []).append(f"{name}: {type(err).__name__}: {str(err)[:300]}")
                    print(f"  loader {name:<24} FAILED {report['loader_errors'][-1]}", flush=True)
                    continue
                report["loaders"].setdefault(name, []).append(measured)
                print(f"  loader {name:<24} {measured['images_per_s']:8.0f} img/s", flush=True)
                save()
        if not args.loader_only:
            for name in rows:
                for backbone in [b for b in args.backbones.split(",") if b]:
                    row = {"backbone": backbone, "row": name, "status": "OK"}
                    needs = ROWS[name][2] * (0.2 if args.smoke else 1.0)
                    if left() < needs:
                        row.update(status="SKIPPED", error=f"{left():.0f}s of the budget left, the row needs ~{needs}s")
                    else:
                        try:
                            with time_limit(min(left(), args.row_timeout)):
                                row.update(run_row(args, backbone, name, workdir))
                        except RowTimeout as err:
                            row.update(status="TIMEOUT", error=str(err))
                        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
                            row.update(status="FAILED", error=f"{type(err).__name__}: {str(err)[:300]}")
                    report["rows"].append(row)
                    rate = row.get("images_per_s")
                    figure = f"{rate:.0f} img/s" if rate else row.get("error", "")
                    print(f"  {backbone:<14}{name:<16}{row['status']:<9}{figure}", flush=True)
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    save()
    report["seconds"] = time.perf_counter() - started
    save()
    print(table(report))
    return report


if __name__ == "__main__":
    main()
