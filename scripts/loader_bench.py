"""Training-loader throughput of the three image sources: the folder, the folder with ``data.cache=memory``, shards.

    python scripts/loader_bench.py generate GENERATED --count 20000          # small JPEGs, two classes
    python -m finetune.shards data=folder data.root=PHOTOS output=SHARDS      # the shards of a folder
    python scripts/loader_bench.py measure --folder PHOTOS --shards SHARDS --seconds 30 --json out.json

``measure`` runs each source in its own fresh process (so that each one's memory is its own), one after another:

- ``folder``: ``data=folder data.root=PHOTOS`` (PIL decodes each file as it is read);
- ``cache=memory``: the same with ``data.cache=memory`` (every training image decoded once at setup, shrunk to
  ``data.cache_short_side``, kept in RAM; the loader crops those);
- ``shards``: ``data=shards data.root=SHARDS`` (LitData streams the encoded bytes from the chunk files; PIL decodes).

Each builds the DataModule a run builds (``data.image_size`` 224, the training transforms: random resized crop, flip,
normalisation), times ``setup("fit")``, then iterates the training loader for ``--seconds`` from its first batch
(the workers' start is excluded), epoch after epoch, and reports images/s, the peak RSS of the main process
(``VmHWM``) and the sampled peak PSS of the main process and its loader workers together (PSS counts pages shared
between them once). ``other_cores`` says how many cores other processes kept busy meanwhile: a busy machine
slows every source, so compare figures of one invocation. No model runs: this is the loader alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, even where another copy is installed
sys.path.insert(0, str(REPO / "scripts"))

from finetune import atomic  # noqa: E402 - light: no torch

SOURCES = ("folder", "cache=memory", "shards")


def cpu_seconds() -> float:
    """CPU time of this process, its live loader workers and the workers that ended (a new set every epoch when the
    workers are not persistent: LitData's are not)."""
    import resource

    import benchmark

    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    return benchmark.cpu_seconds() + ended.ru_utime + ended.ru_stime


def clocks() -> tuple[float, float, float]:
    import benchmark

    return time.perf_counter(), cpu_seconds(), benchmark.machine_busy_seconds()


def generate(root: Path, count: int, width: int, height: int, test_share: float, seed: int) -> None:
    """``root/{train,test}/{a,b}/`` with ``count`` JPEGs in all: smooth random colour fields with a few shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: choose a new folder.")
    rng = np.random.default_rng(seed)
    n_test = round(count * test_share)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        split = "test" if index < n_test else "train"
        label = "ab"[index % 2]
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-1, 1, size=(2, 3))
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 12, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            box = (x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if label == "a" else draw.rectangle)(box, fill=colour)
        image.save(folder / f"{label}_{index:06d}.jpg", quality=90)
    print(f"Wrote {count} JPEGs ({width}x{height}; {count - n_test} train, {n_test} test) to {root}")


def measure_one(source: str, root: str, seconds: float, batch_size: int, workers: int) -> dict:
    """One source, in this process: setup time, images/s over ``seconds``, peak memory."""
    import benchmark  # scripts/benchmark.py: the memory and CPU probes

    from finetune.run import build_datamodule, compose_config

    overrides = ["data=shards" if source == "shards" else "data=folder", f"data.root={root}"]
    overrides += [f"data.batch_size={batch_size}", f"data.num_workers={workers}", "data.image_size=224"]
    overrides += ["model.backbone=mobilenet_v2", "model.weights=null", "data.val_fraction=0.1"]
    if source == "cache=memory":
        overrides.append("data.cache=memory")
    with benchmark.PeakMemory() as memory:
        datamodule = build_datamodule(compose_config(overrides))
        started = time.perf_counter()
        datamodule.setup("fit")
        setup_seconds = time.perf_counter() - started
        loader = datamodule.train_dataloader()
        iterator, epochs = iter(loader), 1
        next(iterator)
        start, images = clocks(), 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            try:
                _, labels = next(iterator)
            except StopIteration:
                iterator, epochs = iter(loader), epochs + 1
                continue
            images += labels.numel()
        end = clocks()
        del iterator
    timing = benchmark.window(start, end)
    return {
        "source": source,
        "root": root,
        "train_images": len(datamodule.train_set),
        "setup_seconds": round(setup_seconds, 2),
        "images": images,
        "epochs": epochs,
        "seconds": round(timing["seconds"], 2),
        "images_per_second": round(images / timing["seconds"], 1),
        "cpu_seconds": round(timing["cpu_seconds"], 1),
        "other_cores": round(timing["other_cores"], 2),
        "peak_rss_mib": round(memory.main_peak_mib),
        "peak_pss_mib_with_workers": round(memory.tree_peak_mib),
    }


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for source in args.sources:
        root = args.shards if source == "shards" else args.folder
        command = [sys.executable, __file__, "one", source, str(root), "--seconds", str(args.seconds)]
        command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{source} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["source"] == "folder"), None)
    print(f"\n{'source':<14}{'setup s':>9}{'images/s':>10}{'x folder':>10}{'RSS MiB':>9}{'PSS+workers':>13}{'busy':>6}")
    for r in rows:
        ratio = r["images_per_second"] / base["images_per_second"] if base else float("nan")
        print(
            f"{r['source']:<14}{r['setup_seconds']:>9.1f}{r['images_per_second']:>10.1f}{ratio:>10.2f}"
            f"{r['peak_rss_mib']:>9}{r['peak_pss_mib_with_workers']:>13}{r['other_cores']:>6.2f}"
        )
    if args.json:
        atomic.write_json(args.json, rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a folder of small generated JPEGs")
    gen.add_argument("root", type=Path)
    gen.add_argument("--count", type=int, default=20000)
    gen.add_argument("--size", default="160x120", help="WIDTHxHEIGHT")
    gen.add_argument("--test-share", type=float, default=0.1)
    gen.add_argument("--seed", type=int, default=0)
    meas = commands.add_parser("measure", help="time the training loader of each source")
    meas.add_argument("--folder", type=Path, required=True, help="the image folder (train/ and test/)")
    meas.add_argument("--shards", type=Path, help="its shards (python -m finetune.shards ... output=SHARDS)")
    meas.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    meas.add_argument("--seconds", type=float, default=30.0, help="timed window per source")
    meas.add_argument("--batch-size", type=int, default=32)
    meas.add_argument("--workers", type=int, default=2, help="data.num_workers")
    meas.add_argument("--json", help="also write the rows to this file")
    one = commands.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("source", choices=SOURCES)
    one.add_argument("root")
    one.add_argument("--seconds", type=float, default=30.0)
    one.add_argument("--batch-size", type=int, default=32)
    one.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.command == "generate":
        width, _, height = args.size.partition("x")
        generate(args.root, args.count, int(width), int(height), args.test_share, args.seed)
    elif args.command == "measure":
        if "shards" in args.sources and args.shards is None:
            parser.error("--shards is needed to measure the shards source (or leave it out of --sources)")
        measure(args)
    else:
        print(json.dumps(measure_one(args.source, args.root, args.seconds, args.batch_size, args.workers)))


if __name__ == "__main__":
    main()
