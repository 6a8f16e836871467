"""Check the template on a CUDA machine: a few fine-tuning steps per precision / memory format / DDP setting.

    python scripts/gpu_check.py                    # from the repository root, on a machine with CUDA (~3 minutes)
    python scripts/gpu_check.py --cpu-smoke        # the same plumbing on a CPU: tiny generated images, 8 steps

Every configuration is a ``python -m finetune.train`` run (experiment=finetune, the template's own entry point,
Hydra and all) with Trainer/model overrides and the ``finetune.harness.throughput.Throughput`` callback. One table row
per configuration: images/s end to end (data loading included, validation and the first epoch excluded), images/s of
the training step alone (forward + backward + optimizer, device synchronised), the last train loss, the last
val/acc, and test/acc + test/loss of the final weights (no checkpoints are written, to stay fast). A configuration
that fails or times out is reported as FAILED with its error, and the others still run; the exit code is 1 then.
The DDP row trains on all visible GPUs (``torch.cuda.device_count()``; with one GPU, ddp on 1 device still runs
the DDP code path); ``data.batch_size`` is per device, so its global batch is ``batch_size x GPUs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, even where another copy is installed

from finetune import atomic  # noqa: E402 - light: no torch


@dataclass
class Row:
    name: str
    status: str = "OK"
    error: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


def configurations(gpus: int, cpu: bool) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, reason to skip it or '')."""
    ddp_devices = 2 if cpu else max(gpus, 1)
    return {
        "fp32": (["trainer.precision=32-true"], ""),
        "bf16-mixed": (["trainer.precision=bf16-mixed"], ""),
        "16-mixed": (
            ["trainer.precision=16-mixed"],
            "needs CUDA (Lightning runs bf16 instead on a CPU)" if cpu else "",
        ),
        "bf16-channels_last": (["trainer.precision=bf16-mixed", "+callbacks=channels_last"], ""),
        f"ddp-bf16-x{ddp_devices}": (
            ["trainer.precision=bf16-mixed", "trainer.strategy=ddp", f"trainer.devices={ddp_devices}"],
            "",
        ),
    }


def common_overrides(args: argparse.Namespace, data_root: Path, weights: str) -> list[str]:
    from finetune.harness import bench  # imports torch: not before main() has parsed the command line

    accelerator = "cpu" if args.cpu_smoke else "gpu"
    overrides = bench.common_overrides(
        "finetune", data_root, args.backbone, weights, args.batch_size, args.num_workers, accelerator
    )
    overrides += ["trainer.devices=1", f"+trainer.max_steps={args.steps}", "trainer.max_epochs=-1"]
    # The throughput callback by key: a row may add its own +callbacks= (Hydra takes one per command line).
    overrides += [
        "~callbacks.model_checkpoint",
        "+callbacks.throughput._target_=finetune.harness.throughput.Throughput",
    ]
    if args.cpu_smoke:
        overrides += ["data.image_size=32", "data.resize_size=36", "data.val_fraction=0.2"]
    return overrides


def run_configuration(name: str, overrides: list[str], out_dir: Path, timeout: float) -> Row:
    run_dir = out_dir / name
    command = [sys.executable, "-m", "finetune.train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    row = Row(name)
    start = time.perf_counter()
    # A session of its own: on a timeout the DDP ranks it started go too, and free their GPUs for the next row.
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            row.seconds = time.perf_counter() - start
            _save_log(out_dir, name, stdout, stderr)
            return Row(name, "FAILED", f"timed out after {timeout:.0f}s", row.seconds)
    row.seconds = time.perf_counter() - start
    _save_log(out_dir, name, stdout, stderr)
    if process.returncode != 0:
        return Row(name, "FAILED", f"exit {process.returncode}: {_last_error(stderr or stdout)}", row.seconds)
    try:
        results = json.loads((run_dir / "results.json").read_text())
        speed = json.loads((run_dir / "throughput.json").read_text())
    except (OSError, ValueError) as err:
        return Row(name, "FAILED", f"no results: {err}", row.seconds)
    last = results["history"][-1] if results["history"] else {}
    row.metrics = {
        "img/s": speed["images_per_s"],
        "step img/s": speed["step_images_per_s"],
        "train/loss": last.get("train/loss"),
        "val/acc": last.get("val/acc"),
        "test/acc": results["test/acc"],
        "test/loss": results["test/loss"],
    }
    return row


def table(rows: list[Row]) -> str:
    columns = ["img/s", "step img/s", "train/loss", "val/acc", "test/acc", "test/loss"]
    header = f"{'configuration':<22} {'status':<8}" + "".join(f"{c:>12}" for c in columns) + f"{'wall s':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{_fmt(row.metrics.get(c)):>12}" for c in columns)
        lines.append(f"{row.name:<22} {row.status:<8}{cells}{row.seconds:>9.1f}")
    lines += [f"{row.name}: {row.status} {row.error}" for row in rows if row.error]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/hotdog-kaggle")
    parser.add_argument("--weights", default="../shared/weights/mobilenet_v2-imagenet-features.pth")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration (30; smoke: 8)")
    parser.add_argument("--batch-size", type=int, default=128, help="per device")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--configs", default="", help="comma-separated subset of the configuration names")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per configuration")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for all; later ones are skipped")
    parser.add_argument("--out", default="", help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU version, to test this script")
    args = parser.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu_smoke:
        print("No CUDA device visible: run this on a GPU machine, or pass --cpu-smoke to test the plumbing.")
        return 2
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-")).resolve() / time.strftime("%Y%m%d-%H%M%S")
    if args.cpu_smoke:
        data_root, weights = make_smoke_folder(out_dir / "data"), "null"
        args.batch_size, args.num_workers, args.steps = 4, 0, args.steps or 8  # 16 images: 2 epochs, DDP 4
    else:
        args.steps = args.steps or 30
        data_root, weights = Path(args.data_root).resolve(), str(Path(args.weights).resolve())
        for path in (data_root, Path(weights)):
            if not path.exists():
                print(f"{path} does not exist: pass --data-root and --weights (see --help).")
                return 2
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
        print(f"{gpus} GPU(s): {names}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"{args.backbone}, batch {args.batch_size}/device, {args.steps} steps per configuration; runs in {out_dir}")

    configs = configurations(gpus, args.cpu_smoke)
    wanted = [c for c in args.configs.split(",") if c] or list(configs)
    unknown = [c for c in wanted if c not in configs]
    if unknown:
        print(f"Unknown configuration(s) {unknown}; known: {', '.join(configs)}")
        return 2
    common = common_overrides(args, data_root, weights)
    rows, start = [], time.perf_counter()
    for name in wanted:
        overrides, skip = configs[name]
        left = args.budget - (time.perf_counter() - start)
        if skip or left < 10:
            rows.append(Row(name, "SKIPPED", skip or f"time budget of {args.budget:.0f}s used up"))
            continue
        print(f"running {name} ...", flush=True)
        rows.append(run_configuration(name, common + overrides, out_dir, min(args.timeout, left)))
    print(table(rows))
    return 1 if any(row.status == "FAILED" for row in rows) else 0


def make_smoke_folder(root: Path) -> Path:
    """A tiny two-class image folder (32 px scale), enough for a few CPU steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        for index, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 128, size=(36, 40, 3), dtype=np.uint8)
                pixels[..., index] += 120
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def _save_log(out_dir: Path, name: str, stdout: str | None, stderr: str | None) -> None:
    atomic.write_text(out_dir / f"{name}.log", (stdout or "") + (stderr or ""))


def _last_error(output: str) -> str:
    """The line that names the error: the last ``SomethingError: ...``, else the last few lines."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors[-1] if errors else " | ".join(lines[-3:]) or "(no output)")[:400]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
