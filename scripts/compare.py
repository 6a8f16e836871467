#!/usr/bin/env python
"""Fine-tune vs scratch vs frozen over seeds: one command for the comparison table and figure.

    python scripts/compare.py [--experiments LIST] [--seeds LIST] [--sweep-dir DIR] [--out DIR] [overrides ...]
    python scripts/compare.py --from DIR [--experiments LIST] [--seeds LIST] [--out DIR]

This script launches the Hydra multirun (``python -m finetune.train -m experiment=... seed=... <overrides>``) and
records the command and the machine next to it; ``finetune.report`` turns the sweep folder into the report files.
``--help`` lists every flag.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from finetune import atomic
from finetune.harness.overrides import quote
from finetune.report import (
    DEFAULT_EXPERIMENTS,
    DEFAULT_SEEDS,
    FIGURE_NEEDS,
    LAUNCH_RECORD,
    FigureUnavailable,
    ReportError,
    load_sweep,
    to_markdown,
    write_report,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Overrides this script sets itself, and the flag that sets each instead.
RESERVED = {"experiment": "--experiments", "seed": "--seeds", "hydra.sweep.dir": "--sweep-dir"}


class CompareError(ReportError):
    """A problem with the command line or the sweep folder to launch into, worded for the user."""


# ---------------------------------------------------------------------------------------------------- overrides


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """The user's overrides as Hydra reads them, so that a typo fails here and not after the launch."""
    for override in overrides:
        if override in ("-m", "--multirun"):
            raise CompareError(f"{override!r}: compare.py always launches a multirun; leave it out.")
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise CompareError(f"Hydra cannot parse the overrides: {error}") from error


def hydra_value(text: str) -> str:
    """``text`` as one Hydra override value (:func:`finetune.harness.overrides.quote`), or a :class:`CompareError`."""
    try:
        return quote(text)
    except ValueError as error:
        raise CompareError(f"{error}; pick a plainer path.") from error


def sweep_command(
    experiments: Sequence[str], seeds: Sequence[int], sweep_dir: Path, overrides: Sequence[str]
) -> list[str]:
    """The ``finetune.train`` multirun that compare launches; the user's overrides go through unchanged."""
    for override in parse_overrides(overrides):
        if override.key_or_group in RESERVED:
            raise CompareError(
                f"Override {override.input_line!r}: compare.py sets {override.key_or_group} itself; use "
                f"{RESERVED[override.key_or_group]} instead (e.g. --experiments finetune,scratch --seeds 0,1)."
            )
    return [
        sys.executable,
        "-m",
        "finetune.train",
        "-m",
        f"experiment={','.join(experiments)}",
        f"seed={','.join(str(s) for s in seeds)}",
        f"hydra.sweep.dir={hydra_value(str(sweep_dir))}",
        *overrides,
    ]


def default_sweep_dir(overrides: Sequence[str]) -> Path:
    """``<paths.log_dir>/multiruns/<now>_compare``, next to train's own multiruns."""
    log_dir = "logs"
    for override in parse_overrides(overrides):
        if override.key_or_group == "paths.log_dir" and isinstance(override.value(), str):
            log_dir = override.value()
    return Path(log_dir) / "multiruns" / f"{datetime.now():%Y-%m-%d_%H-%M-%S.%f}_compare"


# ---------------------------------------------------------------------------------------------------- launching


def machine() -> dict[str, Any]:
    """What ran the sweep, for the report: OS, CPU, memory, Python, torch and any CUDA devices."""
    info: dict[str, Any] = {"os": platform.platform(), "cpus": os.cpu_count()}
    cpu = _first_line_value(Path("/proc/cpuinfo"), "model name")
    if cpu:
        info["cpu"] = cpu
    memory = _first_line_value(Path("/proc/meminfo"), "MemTotal")
    if memory and memory.split()[0].isdigit():
        info["memory"] = f"{int(memory.split()[0]) / 2**20:.0f} GiB"
    info["python"] = platform.python_version()
    try:
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    # Ask nvidia-smi, not torch.cuda: this process must not hold a CUDA context while the jobs train.
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            info["gpus"] = done.stdout.strip().splitlines()
    return info


def _first_line_value(path: Path, key: str) -> str | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def launch(
    experiments: Sequence[str],
    seeds: Sequence[int],
    sweep_dir: Path,
    overrides: Sequence[str],
    command_line: str | None = None,
) -> int:
    """Run the multirun (output streams to the terminal) into a new ``sweep_dir``; return its exit status."""
    missing = [e for e in experiments if CONF_DIR.is_dir() and not (CONF_DIR / "experiment" / f"{e}.yaml").is_file()]
    if missing:
        known = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
        raise CompareError(f"Unknown experiment(s) {missing}; conf/experiment/ has {known}.")
    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise CompareError(
            f"Sweep folder {str(sweep_dir)!r} already holds files; compare.py never writes over earlier results. "
            "Pass a new --sweep-dir, or aggregate the existing one with --from."
        )
    command = sweep_command(experiments, seeds, sweep_dir, overrides)
    if importlib.util.find_spec("matplotlib") is None:  # say so now, not after the sweep
        print(f"compare: {FIGURE_NEEDS} (the tables will be written without it)", file=sys.stderr)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line or shlex.join(command),
        "train_command": shlex.join(command),
        "experiments": list(experiments),
        "seeds": list(seeds),
        "machine": machine(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    atomic.write_json(sweep_dir / LAUNCH_RECORD, record)
    returncode = subprocess.run(command).returncode
    record.update(finished=datetime.now().isoformat(timespec="seconds"), returncode=returncode)
    atomic.write_json(sweep_dir / LAUNCH_RECORD, record)
    return returncode


# ---------------------------------------------------------------------------------------------------- CLI


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. finetune,scratch,frozen")
    return items


def _seeds(text: str) -> list[int]:
    items = _list(text)
    if not all(re.fullmatch(r"-?\d+", i) for i in items):
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, e.g. 0,1,2 (got {text!r})")
    return [int(i) for i in items]


def parser() -> argparse.ArgumentParser:
    """The command line; ``main`` reads it with ``parse_intermixed_args`` so overrides may surround the flags."""
    p = argparse.ArgumentParser(
        prog="scripts/compare.py",
        description="Fine-tune vs scratch vs frozen over seeds: launch the Hydra multirun, then write a table "
        "(Markdown, CSV) and a figure of per-epoch curves. With --from, only aggregate an existing multirun folder.",
        epilog="Example: python scripts/compare.py data=folder data.root=DATA model.backbone=mobilenet_v2 "
        "pretrained_weights=WEIGHTS.pth",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides passed to every job (data, model, trainer, ...); pretrained_weights=PATH reaches "
        "finetune and frozen but not scratch",
    )
    p.add_argument("--from", dest="from_dir", type=Path, metavar="DIR", help="aggregate this multirun folder only")
    p.add_argument(
        "--experiments",
        type=_list,
        metavar="LIST",
        help="comma-separated (default finetune,scratch,frozen; with --from: what the sweep was launched with)",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        metavar="LIST",
        help="comma-separated integers (default 0,1,2; with --from: what the sweep was launched with)",
    )
    p.add_argument(
        "--sweep-dir",
        type=Path,
        metavar="DIR",
        help="new folder for the multirun (default logs/multiruns/<date>_<time>_compare)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where table.md, table.csv, curves.png and comparison.md go (default: the sweep folder)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when every expected job completed and the report is whole; 1 when some job is missing or
    failed, or curves.png could not be drawn (no matplotlib); 2 on a usage error."""
    args = parser().parse_intermixed_args(argv)  # overrides may come before and after the flags
    figure_error: FigureUnavailable | None = None
    try:
        if args.from_dir is not None:
            if args.overrides or args.sweep_dir is not None:
                raise CompareError("--from aggregates an existing sweep: it takes no overrides and no --sweep-dir.")
            sweep_dir, returncode = args.from_dir, 0
            experiments, seeds = args.experiments, args.seeds  # None: what the sweep was launched with
        else:
            sweep_dir = args.sweep_dir or default_sweep_dir(args.overrides)
            experiments = args.experiments or list(DEFAULT_EXPERIMENTS)
            seeds = args.seeds or list(DEFAULT_SEEDS)
            argv_text = shlex.join(["python", "scripts/compare.py", *(sys.argv[1:] if argv is None else argv)])
            returncode = launch(experiments, seeds, sweep_dir, args.overrides, command_line=argv_text)
            if not any(p.is_dir() for p in Path(sweep_dir).iterdir()):
                print(
                    f"compare: the sweep failed before any job started (exit {returncode}); see above.", file=sys.stderr
                )
                return returncode or 1
        sweep = load_sweep(sweep_dir, experiments, seeds)
        try:
            paths = write_report(sweep, args.out or sweep_dir)
        except FigureUnavailable as error:
            paths, figure_error = error.written, error
    except ReportError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 2
    print(to_markdown(sweep))
    for job in sweep.ignored:
        print(
            f"compare: ignored {job.folder} (experiment {job.experiment}, seed {job.seed}: not in the expected "
            f"{','.join(sweep.experiments)} x seeds {','.join(map(str, sweep.seeds))})",
            file=sys.stderr,
        )
    print("Wrote " + ", ".join(str(Path(p).resolve()) for p in paths))
    if figure_error is not None:
        again = shlex.join(["--from", str(sweep_dir), *(["--out", str(args.out)] if args.out else [])])
        print(f"compare: {figure_error}, then rerun scripts/compare.py {again}", file=sys.stderr)
    problems = sweep.problems
    if problems:
        print(f"compare: {len(problems)} expected job(s) missing or failed:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 1 if returncode or figure_error else 0


if __name__ == "__main__":
    sys.exit(main())
