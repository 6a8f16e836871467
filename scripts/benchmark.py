"""Training speed of the template against a plain PyTorch loop written to the book's recipe, in one process.

    python scripts/benchmark.py                          # mobilenet_v2 on ../shared/data/hotdog-kaggle, ~6 min
    python scripts/benchmark.py --backbone resnet18      # random weights unless --weights says otherwise
    python scripts/benchmark.py --repeats 5 --json out.json

What it measures, all in this process, with the same torch thread count, batch size, image size, data folder and
number of loader workers for every variant:

1. training throughput (images/second over ``--batches`` batches after ``--warmup`` batches, which are excluded:
   they include oneDNN's kernel selection and the loader workers' start) for

   - ``plain``: the book's loop (d2l ``train_fine_tuning``): ``ImageFolder`` + torchvision transforms, the last
     ``Linear`` replaced by a Xavier-initialised one, SGD with the head at 10x, summed cross-entropy;
   - ``template``: ``experiment=finetune`` composed with Hydra and built by the objects ``finetune.train`` builds
     (DataModule, LightningModule, Trainer with its callbacks and CSV logger), progress bar off;
   - ``template+channels_last``, ``template+cache`` (``data.cache=disk``, built once before the runs; ``memory``
     serves the same tensors) and ``template+fast`` (both);
   - ``template+device``: ``template+fast`` with ``data.augment_on=device`` (crop, flip and normalisation in the
     training process after the loader, as a GPU run does them on the GPU; ``data.cache=memory``);

   repeated ``--repeats`` times in rotating order (a, b, c, ... then b, c, ..., a) so that slow phases of a busy
   machine hit every variant alike, and summarised by the median;
2. peak memory per run: the process's RSS high-water mark (``VmHWM``, reset before each run through
   ``/proc/self/clear_refs``) and the sampled peak of the proportional set size (PSS) summed over the process and its
   loader workers (PSS counts shared pages once, so forked workers are not double-counted);
3. data loading alone (no model): images/second through the DataModule's train loader (uncached, memory cache,
   disk cache) and through the plain loop's loader, over one epoch after the first batch;
4. the frozen experiment: per-epoch wall time (train + validation + checkpoint) with and without
   ``features=cached``; the ratio uses the epochs after the first.

Everything is printed as tables, with the ratios template/plain; ``--json`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import LambdaCallback
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, even where another copy is installed

from finetune import atomic  # noqa: E402
from finetune.backbones.torchvision import find_head  # noqa: E402
from finetune.backbones.weights import load_backbone_weights  # noqa: E402
from finetune.harness import bench  # noqa: E402
from finetune.run import assemble, build_datamodule, compose_config  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "hotdog-kaggle"
DEFAULT_WEIGHTS = {"mobilenet_v2": SHARED / "weights" / "mobilenet_v2-imagenet-features.pth"}
TEMPLATE_VARIANTS = {
    "template": [],
    "template+channels_last": ["+callbacks=channels_last"],
    "template+cache": ["data.cache=disk"],
    "template+fast": ["+callbacks=channels_last", "data.cache=disk"],
    "template+device": ["+callbacks=channels_last", "data.cache=memory", "data.augment_on=device"],
}
ALL_VARIANTS = ["plain", *TEMPLATE_VARIANTS]
BUSY_CORES = 0.25  # a timed window during which other processes used this many cores is reported as not quiet


# --- memory ------------------------------------------------------------------------------------------------
def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so one run's leftovers do not count for the next."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{task}/children") as children:
                kids = [int(k) for k in children.read().split()]
                found += kids
                stack += kids
    return found


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process and its live children (the loader workers)."""
    pid, ticks = os.getpid(), 0
    for proc in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{proc}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used so far (``/proc/stat``: everything but idle and iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def clocks() -> tuple[float, float, float]:
    """(wall, this process tree's CPU, the whole machine's busy CPU) in seconds."""
    return time.perf_counter(), cpu_seconds(), machine_busy_seconds()


def window(start: tuple[float, float, float], end: tuple[float, float, float]) -> dict:
    """Wall and CPU seconds of a timed window, and how many cores other processes kept busy meanwhile."""
    wall, ours, busy = (b - a for a, b in zip(start, end, strict=True))
    return {"seconds": wall, "cpu_seconds": ours, "other_cores": max(busy - ours, 0.0) / wall}


def _pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak RSS of this process (exact, ``VmHWM``) and sampled peak PSS of this process plus its children."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.main_peak_mib = self.tree_peak_mib = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _release_memory()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS
        except OSError:
            warnings.warn("cannot reset the RSS high-water mark; peak RSS is the process's lifetime peak", stacklevel=2)
        self._tree_peak_kib = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.wait(self.interval):
            total = _pss_kib(pid) + sum(_pss_kib(child) for child in _descendants(pid))
            self._tree_peak_kib = max(self._tree_peak_kib, total)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.main_peak_mib = _status_kib("VmHWM") / 1024
        self.tree_peak_mib = max(self._tree_peak_kib / 1024, self.main_peak_mib)


# --- template -----------------------------------------------------------------------------------------------


def common_overrides(args, output_dir: Path, experiment: str = "finetune") -> list[str]:
    """The template's runs: the shared overrides on ``args``, on the CPU, with the benchmark's cache and image size."""
    shared = bench.common_overrides(
        experiment, args.data, args.backbone, args.weights, args.batch_size, args.num_workers, "cpu", output_dir
    )
    return [*shared, f"data.image_size={args.image_size}", f"data.cache_dir={args.cache_dir}", f"seed={args.seed}"]


def run_template(args, variant_overrides: list[str], workdir: Path) -> dict:
    overrides = [*common_overrides(args, workdir), *variant_overrides]
    overrides += [
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={args.warmup + args.batches}",
        "trainer.limit_val_batches=0",
        "test_after_fit=false",
    ]
    cfg = compose_config(overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    timer = bench.TimedBatches(args.warmup, args.batches, clock=clocks)
    run = assemble(cfg, [timer])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    if timer.end is None:
        raise RuntimeError("the template run ended before the timed window closed")
    return {**window(timer.start, timer.end), "images": timer.images, "threads": timer.threads}


# --- the book's plain loop ----------------------------------------------------------------------------------
IMAGENET_NORMALIZE = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def plain_train_loader(args) -> DataLoader:
    """d2l: ``train_augs`` on ``ImageFolder(train)``, shuffled; workers as the template's."""
    train_augs = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            IMAGENET_NORMALIZE,
        ]
    )
    dataset = ImageFolder(os.path.join(args.data, "train"), transform=train_augs)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)


def plain_net(args, num_classes: int) -> nn.Module:
    """d2l: pretrained network, output layer replaced by ``Linear(in, classes)`` with Xavier-uniform weight."""
    net = torchvision.models.get_model(args.backbone, weights=None)
    head_name = find_head(net)
    parent_name, _, child = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Linear(net.get_submodule(head_name).in_features, num_classes))
    nn.init.xavier_uniform_(net.get_submodule(head_name).weight)
    if args.weights:
        load_backbone_weights(net, head_name, Path(args.weights))
    return net


def run_plain(args) -> dict:
    """d2l ``train_fine_tuning`` / ``train_batch_ch13``: lr 5e-5 on the summed loss, head 10x, weight decay 1e-3."""
    torch.manual_seed(args.seed)
    loader = plain_train_loader(args)
    net = plain_net(args, len(loader.dataset.classes))
    head_name = find_head(net)
    head = {f"{head_name}.weight", f"{head_name}.bias"}
    params_1x = [param for name, param in net.named_parameters() if name not in head]
    learning_rate = 5e-5
    trainer = torch.optim.SGD(
        [{"params": params_1x}, {"params": net.get_submodule(head_name).parameters(), "lr": learning_rate * 10}],
        lr=learning_rate,
        weight_decay=0.001,
    )
    loss = nn.CrossEntropyLoss(reduction="none")
    last = args.warmup + args.batches - 1
    start = end = None
    images = 0
    metric = [0.0, 0.0, 0]
    net.train()
    for i, (features, labels) in enumerate(loader):
        if i == args.warmup:
            start, threads = clocks(), torch.get_num_threads()
        trainer.zero_grad()
        pred = net(features)
        batch_loss = loss(pred, labels)
        batch_loss.sum().backward()
        trainer.step()
        metric[0] += float(batch_loss.sum())
        metric[1] += float((pred.argmax(dim=1) == labels).sum())
        metric[2] += labels.numel()
        if i >= args.warmup:
            images += labels.numel()
        if i == last:
            end = clocks()
            break
    if end is None:
        raise RuntimeError("the plain loop ran out of batches before the timed window closed")
    return {**window(start, end), "images": images, "threads": threads}


# --- data loading alone ---------------------------------------------------------------------------------------
def loader_throughput(loader: DataLoader) -> dict:
    """Images/second over one epoch, from the first batch received (worker start excluded) to the last."""
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _, labels in iterator:
        images += labels.numel()
    seconds = time.perf_counter() - start
    del iterator
    return {"seconds": seconds, "images": images}


def run_loading(args, workdir: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for name in ("plain", "datamodule", "datamodule cache=memory", "datamodule cache=disk"):
            if name == "plain":
                torch.manual_seed(args.seed)
                result = loader_throughput(plain_train_loader(args))
            else:
                cache = name.partition("cache=")[2] or "none"
                cfg = compose_config([*common_overrides(args, workdir), f"data.cache={cache}"])
                datamodule = build_datamodule(cfg)
                built = time.perf_counter()
                datamodule.setup("fit")
                setup_seconds = time.perf_counter() - built
                result = loader_throughput(datamodule.train_dataloader())
                result["setup_seconds"] = setup_seconds
                del datamodule
            results.setdefault(name, []).append(result)
            _release_memory()
        print(f"  loading repeat {repeat + 1}/{args.repeats} done", flush=True)
    return results


# --- frozen: cached features ----------------------------------------------------------------------------------
def run_frozen(args, cache_features: bool, workdir: Path) -> dict:
    overrides = common_overrides(args, workdir, "frozen")
    overrides += [*(["features=cached"] if cache_features else []), "data.augmentation=null"]
    overrides += [f"trainer.max_epochs={args.frozen_epochs}", "test_after_fit=false"]
    cfg = compose_config(overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    starts, epoch_seconds = [], []
    timer = LambdaCallback(  # each epoch's wall time, validation and the checkpoint included
        on_train_epoch_start=lambda *_: starts.append(time.perf_counter()),
        on_train_epoch_end=lambda *_: epoch_seconds.append(time.perf_counter() - starts[-1]),
    )
    run = assemble(cfg, [timer])
    trainer = run.trainer
    start = time.perf_counter()
    trainer.fit(run.model, datamodule=run.datamodule)
    fit_seconds = time.perf_counter() - start
    return {
        "epoch_seconds": epoch_seconds,
        "fit_seconds": fit_seconds,
        "val/acc": float(trainer.callback_metrics["val/acc"]),
    }


# --- report -----------------------------------------------------------------------------------------------------
def frozen_epoch_seconds(run: dict) -> float:
    """Median epoch time after the first (which pays for the feature extraction and the first checkpoint)."""
    return statistics.median(run["epoch_seconds"][1:] or run["epoch_seconds"])


def median_rate(runs: list[dict], clock: str = "seconds") -> float:
    return statistics.median(run["images"] / run[clock] for run in runs)


def print_report(args, report: dict) -> None:
    m = report["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, torchvision {m['torchvision']}, "
        f"lightning {m['lightning']}"
    )
    print(
        f"settings: {args.backbone}, batch {args.batch_size}, {args.image_size} px, {args.num_workers} loader "
        f"workers, {args.threads} torch threads, {args.warmup} warm-up + {args.batches} timed batches, "
        f"{args.repeats} repeats; data {args.data}"
    )
    before, after = (", ".join(f"{x:.2f}" for x in report[k]) for k in ("load_before", "load_after"))
    print(f"load average (1, 5, 15 min): before {before}; after {after}")

    training = report["training"]
    if training:
        plain = median_rate(training["plain"]) if "plain" in training else None
        plain_cpu = median_rate(training["plain"], "cpu_seconds") if "plain" in training else None
        print("\nTraining throughput (images/s, median of repeats; peak memory is the largest over repeats;")
        print("img/CPU-s: images per CPU-second of the process and its loader workers, less sensitive to other load;")
        print("others: cores kept busy by other processes during the timed windows, mean over repeats)")
        print(
            f"{'variant':<24}{'img/s':>7}  {'runs':<22}{'vs plain':>9}{'img/CPU-s':>10}{'vs plain':>9}"
            f"{'others':>8}{'peak RSS':>10}{'PSS+workers':>13}"
        )
        for name, runs in training.items():
            rate, cpu_rate = median_rate(runs), median_rate(runs, "cpu_seconds")
            each = " ".join(f"{r['images'] / r['seconds']:.1f}" for r in runs)
            ratio = f"{rate / plain:.2f}" if plain else "-"
            cpu_ratio = f"{cpu_rate / plain_cpu:.2f}" if plain_cpu else "-"
            rss = max(r["main_peak_mib"] for r in runs) / 1024
            pss = max(r["tree_peak_mib"] for r in runs) / 1024
            others = statistics.mean(r["other_cores"] for r in runs)
            print(
                f"{name:<24}{rate:>7.2f}  {each:<22}{ratio:>9}{cpu_rate:>10.2f}{cpu_ratio:>9}"
                f"{others:>8.2f}{rss:>8.2f} G{pss:>11.2f} G"
            )

    loading = report["loading"]
    if loading:
        print("\nData loading alone, no model (images/s over one epoch after the first batch, median)")
        for name, runs in loading.items():
            setup = [r["setup_seconds"] for r in runs if "setup_seconds" in r]
            note = f"   setup {statistics.median(setup):.1f}s (first {setup[0]:.1f}s)" if setup else ""
            print(f"{name:<28}{median_rate(runs):>8.1f}{note}")

    frozen = report["frozen"]
    if frozen:
        print(f"\nFrozen experiment, {args.frozen_epochs} epochs (seconds per epoch: train + val + checkpoint)")
        for name, run in frozen.items():
            epochs = " ".join(f"{s:.2f}" for s in run["epoch_seconds"])
            label = f"features {name}"
            print(f"{label:<28}{epochs:<32} fit {run['fit_seconds']:.1f}s  val/acc {run['val/acc']:.3f}")

    print("\nRatios")
    if training and "plain" in training:
        quiet = {name: [r for r in runs if r["other_cores"] < BUSY_CORES] for name, runs in training.items()}
        busy = sum(len(runs) - len(quiet[name]) for name, runs in training.items())
        for name in TEMPLATE_VARIANTS:
            if name in training:
                wall = median_rate(training[name]) / median_rate(training["plain"])
                cpu = median_rate(training[name], "cpu_seconds") / median_rate(training["plain"], "cpu_seconds")
                line = f"  {name} / plain: {wall:.2f} (images per CPU-second: {cpu:.2f})"
                if busy and quiet[name] and quiet["plain"]:
                    line += f"; quiet windows only: {median_rate(quiet[name]) / median_rate(quiet['plain']):.2f}"
                print(line)
        if busy:
            print(f"  ({busy} timed windows ran while other processes kept >= {BUSY_CORES} cores busy)")
    if "uncached" in frozen and "cached" in frozen:
        uncached, cached = (frozen_epoch_seconds(frozen[k]) for k in ("uncached", "cached"))
        print(f"  frozen epoch after the first, uncached / cached features: {uncached / cached:.1f}x")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train/<class>/ and test/<class>/")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default=None, help="state_dict PATH (default: ../shared's for mobilenet_v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated from {ALL_VARIANTS}")
    parser.add_argument("--frozen-epochs", type=int, default=3, help="0 skips the frozen comparison")
    parser.add_argument("--skip-loading", action="store_true", help="skip the data-loading-only measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run's --json file")
    args = parser.parse_args(argv)
    if args.report:
        report = json.loads(Path(args.report).read_text())
        print_report(argparse.Namespace(**report["args"]), report)
        return report
    if args.weights is None and args.backbone in DEFAULT_WEIGHTS and DEFAULT_WEIGHTS[args.backbone].is_file():
        args.weights = str(DEFAULT_WEIGHTS[args.backbone])
    if args.weights in ("none", "null"):
        args.weights = None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    if not (Path(args.data) / "train").is_dir():
        parser.error(f"--data {args.data} has no train/ folder (expected train/<class>/ and test/<class>/)")
    per_epoch = len(ImageFolder(os.path.join(args.data, "train"))) * 0.9 // args.batch_size
    if args.warmup + args.batches > per_epoch:
        parser.error(f"--warmup + --batches must fit in one epoch ({int(per_epoch)} batches of {args.batch_size})")

    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    report = {"machine": bench.machine(), "args": vars(args), "load_before": os.getloadavg(), "training": {}}
    report["loading"], report["frozen"] = {}, {}
    with tempfile.TemporaryDirectory(prefix="finetune-benchmark-") as tmp:
        workdir = Path(tmp)
        args.cache_dir = str(workdir / "cache")
        if not args.skip_loading:
            print("data loading alone (also builds the disk cache) ...", flush=True)
            report["loading"] = run_loading(args, workdir / "loading")
        else:  # the cached variants read the disk cache: build it outside their timed runs
            cfg = compose_config([*common_overrides(args, workdir), "data.cache=disk"])
            build_datamodule(cfg).setup("fit")

        for repeat in range(args.repeats):
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
            for name in order:
                torch.set_num_threads(args.threads)
                with PeakMemory() as memory:
                    if name == "plain":
                        result = run_plain(args)
                    else:
                        result = run_template(args, TEMPLATE_VARIANTS[name], workdir / f"{name}-{repeat}")
                result.update(main_peak_mib=memory.main_peak_mib, tree_peak_mib=memory.tree_peak_mib)
                if result["threads"] != args.threads:
                    raise RuntimeError(f"{name} ran with {result['threads']} torch threads, not {args.threads}")
                report["training"].setdefault(name, []).append(result)
                rate = result["images"] / result["seconds"]
                print(f"  repeat {repeat + 1}/{args.repeats} {name:<24} {rate:6.2f} img/s", flush=True)
        report["training"] = {name: report["training"][name] for name in variants}  # table in the asked order

        if args.frozen_epochs > 0:
            for name, cached in (("uncached", False), ("cached", True)):
                torch.set_num_threads(args.threads)
                report["frozen"][name] = run_frozen(args, cached, workdir / f"frozen-{name}")
                print(f"  frozen {name}: {report['frozen'][name]['epoch_seconds']}", flush=True)
    report["load_after"] = os.getloadavg()
    print_report(args, report)
    if args.json:
        atomic.write_text(args.json, json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
