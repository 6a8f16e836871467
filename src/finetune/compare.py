"""Fine-tune vs scratch vs frozen: launch the seed sweep, then turn its ``results.json`` files into a table and figure.

``scripts/compare.py`` is the command line; everything it does lives here so that it can be imported and tested.

A sweep folder is what ``python -m finetune.train -m ... hydra.sweep.dir=DIR`` leaves: ``DIR/multirun.yaml`` and one
folder per job, each with ``.hydra/`` (written when the job starts) and ``results.json`` (written when it finishes).
The table covers exactly an expected grid of experiments x seeds; every cell of that grid without a completed job is
reported by name, never silently averaged away.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENTS = ("finetune", "scratch", "frozen")
DEFAULT_SEEDS = (0, 1, 2)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# (results.json key, table heading, CSV column stem, decimals)
METRICS = (
    ("test/acc", "test acc", "test_acc", 3),
    ("val/acc", "best val acc", "val_acc", 3),
    ("epochs", "epochs", "epochs", 1),
    ("fit_seconds", "fit s", "fit_seconds", 0),
)
GAP_METRICS = ("test/acc", "val/acc")
GAPS = (("finetune", "scratch"), ("finetune", "frozen"))
CURVES = (("train/loss", "train loss"), ("val/acc", "validation accuracy"))
LAUNCH_RECORD = "compare.json"  # written by launch(): the command and the machine, for the report
REPORT_FILES = ("table.md", "table.csv", "curves.png", "comparison.md")
_JOB_FOLDER = re.compile(r"^\d+_(?P<experiment>.+)_seed(?P<seed>-?\d+)$")  # conf/hydra/default.yaml's sweep.subdir


class CompareError(Exception):
    """A problem with the sweep folder or the command line, worded for the user."""


@dataclass(frozen=True)
class Job:
    """One job folder of a sweep. ``problem`` says why it does not count; ``None`` means it completed."""

    folder: Path
    experiment: str | None
    seed: int | None
    results: dict[str, Any] | None
    problem: str | None


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1) of ``n`` values; ``std`` is ``None`` below two values."""

    mean: float | None
    std: float | None
    n: int


@dataclass
class Sweep:
    """The jobs found in a sweep folder, matched against the expected experiments x seeds."""

    folder: Path
    experiments: list[str]
    seeds: list[int]
    jobs: list[Job]

    def completed(self, experiment: str) -> list[Job]:
        return [j for j in self.jobs if j.problem is None and j.experiment == experiment and j.seed in self.seeds]

    @property
    def problems(self) -> list[str]:
        """Every expected job that did not complete (missing or failed), and duplicates; empty when all is well."""
        problems = []
        for experiment in self.experiments:
            for seed in self.seeds:
                here = [j for j in self.jobs if j.experiment == experiment and j.seed == seed]
                done = [j for j in here if j.problem is None]
                if not here:
                    problems.append(f"missing: {experiment} seed {seed} (no job folder: the sweep never got to it)")
                for job in here:
                    if job.problem is not None:
                        problems.append(f"failed: {experiment} seed {seed} in {job.folder}: {job.problem}")
                if len(done) > 1:
                    folders = ", ".join(str(j.folder) for j in done)
                    problems.append(f"duplicate: {experiment} seed {seed} completed {len(done)} times ({folders})")
        return problems

    @property
    def ignored(self) -> list[Job]:
        """Jobs outside the expected grid (another experiment or seed, or not identifiable): not in the table."""
        return [j for j in self.jobs if j.experiment not in self.experiments or j.seed not in self.seeds]


# ---------------------------------------------------------------------------------------------------- reading


def read_job(folder: Path) -> Job:
    """A job folder -> its identity (experiment, seed) and its results, or the reason it does not count.

    ``results.json`` is written by ``finetune.train`` only after fitting and testing finish, so one without a
    ``status`` key is a completed run; any other ``status`` (e.g. ``interrupted``) is not.
    """
    path = folder / "results.json"
    results: dict[str, Any] | None = None
    problem: str | None = None
    if not path.is_file():
        problem = "no results.json (the job failed or is still running; see its train.log)"
    else:
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            problem = f"unreadable results.json ({error})"
        else:
            problem = _results_problem(results)
    experiment, seed = _identify(folder, results)
    return Job(folder, experiment, seed, results if problem is None else None, problem)


def _results_problem(results: Any) -> str | None:
    if not isinstance(results, dict):
        return "results.json does not hold a JSON object"
    status = results.get("status", "completed")
    if status != "completed":
        return f"results.json says status {status!r}, not 'completed'"
    for key, *_ in METRICS:
        value = results.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"results.json has no numeric {key!r} (got {value!r})"
    if not isinstance(results.get("history"), list):
        return "results.json has no per-epoch 'history' list"
    return None


def _identify(folder: Path, results: dict[str, Any] | None) -> tuple[str | None, int | None]:
    """From results.json, else the folder name (``<job>_<experiment>_seed<seed>``), else ``.hydra/overrides.yaml``."""
    if isinstance(results, dict) and isinstance(results.get("experiment"), str) and _is_int(results.get("seed")):
        return results["experiment"], int(results["seed"])
    match = _JOB_FOLDER.match(folder.name)
    if match:
        return match["experiment"], int(match["seed"])
    experiment, seed = None, None
    overrides = folder / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        for line in overrides.read_text().splitlines():
            key, _, value = line.lstrip("- ").partition("=")
            if key.lstrip("+") == "experiment":
                experiment = value.strip()
            elif key.lstrip("+") == "seed" and _is_int(value.strip()):
                seed = int(value.strip())
        experiment = experiment or DEFAULT_EXPERIMENTS[0]  # conf/train.yaml's default experiment
        seed = 0 if seed is None else seed  # conf/train.yaml's default seed
    return experiment, seed


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"-?\d+", value) is not None


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder directly below ``sweep_dir``: those holding ``.hydra/`` or ``results.json``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise CompareError(f"Sweep folder {str(sweep_dir)!r} does not exist. Pass --from the folder of one multirun.")
    folders = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "results.json").is_file())),
        key=_job_order,
    )
    if not folders:
        sweeps = sorted(str(p) for p in sweep_dir.iterdir() if (p / "multirun.yaml").is_file())
        hint = f" It holds several sweeps; pass one of: {', '.join(sweeps[-5:])}." if sweeps else ""
        raise CompareError(
            f"No job folders in {str(sweep_dir)!r} (a multirun writes one subfolder per job, each with .hydra/ "
            f"and results.json).{hint}"
        )
    return [read_job(folder) for folder in folders]


def _job_order(folder: Path) -> tuple[int, str]:
    number = folder.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else sys.maxsize, folder.name)


def expected_grid(sweep_dir: Path) -> tuple[list[str], list[int]]:
    """The experiments and seeds a sweep was launched with, read from its ``multirun.yaml``.

    Falls back to conf/train.yaml's defaults (experiment ``finetune``, seed 0) for a value that was not overridden,
    and to finetune,scratch,frozen x 0,1,2 when the folder has no ``multirun.yaml``.
    """
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return list(DEFAULT_EXPERIMENTS), list(DEFAULT_SEEDS)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    task = OmegaConf.to_container(OmegaConf.load(path).hydra.overrides.task)
    values: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(task):
        if override.key_or_group in ("experiment", "seed"):
            sweep = override.is_sweep_override()
            values[override.key_or_group] = list(override.sweep_string_iterator()) if sweep else [str(override.value())]
    experiments = values.get("experiment", [DEFAULT_EXPERIMENTS[0]])
    seeds = [int(s) for s in values.get("seed", ["0"])]
    return experiments, seeds


def load_sweep(sweep_dir: Path, experiments: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> Sweep:
    """Read every job of a sweep; the expected grid is what is passed, else what the sweep was launched with."""
    jobs = find_jobs(Path(sweep_dir))
    grid_experiments, grid_seeds = expected_grid(Path(sweep_dir))
    return Sweep(
        Path(sweep_dir),
        list(experiments) if experiments else grid_experiments,
        list(seeds) if seeds is not None and len(seeds) else grid_seeds,
        jobs,
    )


# ---------------------------------------------------------------------------------------------------- numbers


def summarize(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation; the std needs at least two values."""
    n = len(values)
    if n == 0:
        return Stat(None, None, 0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


def experiment_stats(sweep: Sweep, experiment: str) -> dict[str, Stat]:
    jobs = sweep.completed(experiment)
    return {key: summarize([float(j.results[key]) for j in jobs]) for key, *_ in METRICS}


def gap(a: Stat, b: Stat) -> Stat:
    """Difference of means ``a - b`` with its standard error, sqrt(s_a^2/n_a + s_b^2/n_b) (independent runs)."""
    if a.mean is None or b.mean is None:
        return Stat(None, None, 0)
    se = math.sqrt(a.std**2 / a.n + b.std**2 / b.n) if a.std is not None and b.std is not None else None
    return Stat(a.mean - b.mean, se, min(a.n, b.n))


def gap_stats(sweep: Sweep) -> dict[str, dict[str, Stat]]:
    """``{"finetune - scratch": {"test/acc": Stat, "val/acc": Stat}, ...}`` for the pairs this sweep holds."""
    stats = {e: experiment_stats(sweep, e) for e in sweep.experiments}
    return {
        f"{a} - {b}": {key: gap(stats[a][key], stats[b][key]) for key in GAP_METRICS}
        for a, b in GAPS
        if a in stats and b in stats
    }


def curve(jobs: Sequence[Job], key: str) -> tuple[list[int], list[float], list[float]]:
    """Per epoch (1-based): mean and std over the jobs' ``history`` values of ``key`` (std 0 for a single job)."""
    by_epoch: dict[int, list[float]] = {}
    for job in jobs:
        for entry in job.results["history"]:
            value = entry.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                by_epoch.setdefault(int(entry["epoch"]) + 1, []).append(float(value))
    epochs = sorted(by_epoch)
    stats = [summarize(by_epoch[e]) for e in epochs]
    return epochs, [s.mean for s in stats], [s.std or 0.0 for s in stats]


# ---------------------------------------------------------------------------------------------------- reports


def _fmt(stat: Stat, decimals: int, signed: bool = False) -> str:
    if stat.mean is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{stat.mean:{sign}.{decimals}f}"
    return text if stat.std is None else f"{text} ± {stat.std:.{decimals}f}"


def to_markdown(sweep: Sweep) -> str:
    """The results table, the gaps, what ± means, and every job that is missing or failed."""
    heading = "| experiment | seeds | " + " | ".join(title for _, title, _, _ in METRICS) + " |"
    lines = [heading, "|---|---:|" + "---:|" * len(METRICS)]
    for experiment in sweep.experiments:
        stats = experiment_stats(sweep, experiment)
        cells = [_fmt(stats[key], decimals) for key, _, _, decimals in METRICS]
        seeds = f"{stats[METRICS[0][0]].n}/{len(sweep.seeds)}"
        lines.append(f"| {experiment} | {seeds} | " + " | ".join(cells) + " |")
    gaps = gap_stats(sweep)
    if gaps:
        titles = [title for key, title, _, _ in METRICS if key in GAP_METRICS]
        lines += ["", "| gap | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(GAP_METRICS)]
        for name, stats in gaps.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(stats[key], 3, signed=True) for key in GAP_METRICS) + " |")
    lines += [
        "",
        f"Seeds {', '.join(str(s) for s in sweep.seeds)}: mean ± sample standard deviation over seeds; a gap is the "
        "difference of the two means ± its standard error, √(s₁²/n₁ + s₂²/n₂). Test accuracy is that of the "
        "best-on-validation checkpoint; epochs and fit seconds are per run.",
    ]
    backbones = sorted({str(j.results.get("backbone")) for e in sweep.experiments for j in sweep.completed(e)})
    if backbones:
        lines.append(f"Backbone: {', '.join(backbones)}.")
    problems = sweep.problems
    if problems:
        lines += [
            "",
            f"**Incomplete sweep: {len(problems)} problem(s); the rows above average only the completed "
            "jobs (see the seeds column).**",
            "",
        ]
        lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def to_csv(sweep: Sweep) -> str:
    """One row per experiment (mean, sample std) and per gap (difference of means, its standard error)."""
    header = ["kind", "name", "seeds", "expected_seeds"]
    for _, _, stem, _ in METRICS:
        header += [f"{stem}_mean", f"{stem}_std"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for experiment in sweep.experiments:
        stats = experiment_stats(sweep, experiment)
        row = ["experiment", experiment, stats[METRICS[0][0]].n, len(sweep.seeds)]
        for key, *_ in METRICS:
            row += [_num(stats[key].mean), _num(stats[key].std)]
        writer.writerow(row)
    for name, stats in gap_stats(sweep).items():
        row = ["gap", name, stats[GAP_METRICS[0]].n, len(sweep.seeds)]
        for key, *_ in METRICS:
            row += [_num(stats[key].mean), _num(stats[key].std)] if key in stats else ["", ""]
        writer.writerow(row)
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def plot_curves(sweep: Sweep, path: Path) -> Path:
    """Two panels, train loss and validation accuracy per epoch: one line per experiment, a ±1 std band over seeds."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no GUI backend, nothing global to switch
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, len(CURVES))
    colors = {e: f"C{i}" for i, e in enumerate(sweep.experiments)}
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for experiment in sweep.experiments:
            jobs = sweep.completed(experiment)
            epochs, mean, std = curve(jobs, key)
            if not epochs:
                continue
            label = f"{experiment} ({len(jobs)} seed{'s' if len(jobs) != 1 else ''})"
            ax.plot(epochs, mean, marker="o", color=colors[experiment], label=label)
            lower = [m - s for m, s in zip(mean, std, strict=True)]
            upper = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(epochs, lower, upper, color=colors[experiment], alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(f"{title} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    figure.suptitle("Fine-tune vs scratch vs frozen: mean over seeds, band ±1 std")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def comparison_markdown(sweep: Sweep, table: str) -> str:
    """A skeleton for docs/comparison.md: command, machine, table, figure, and a place for the findings."""
    record = _read_launch_record(sweep.folder)
    if record:
        command = record.get("command", "")
        machine = record.get("machine", {})
        machine_text = ", ".join(f"{k}: {v}" for k, v in machine.items()) or "not recorded"
    else:
        command = _command_from_multirun(sweep.folder) or "not recorded"
        machine_text = "not recorded (the sweep was not launched by scripts/compare.py; say which machine ran it)"
    return "\n".join(
        [
            "# Fine-tune vs scratch vs frozen",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine_text}",
            "",
            f"Sweep folder: `{sweep.folder}`",
            "",
            table.rstrip("\n"),
            "",
            "![Train loss and validation accuracy per epoch](curves.png)",
            "",
            "## What it shows",
            "",
            "TODO: the finding in a few sentences, how the epoch count was chosen (on validation accuracy), and how it "
            "compares with the book (fine-tune about 0.94, scratch about 0.85 after 5 epochs on the d2l data).",
            "",
        ]
    )


def _read_launch_record(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / LAUNCH_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _command_from_multirun(sweep_dir: Path) -> str | None:
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    task = OmegaConf.to_container(OmegaConf.load(path).hydra.overrides.task)
    return shlex.join(["python", "-m", "finetune.train", "-m", *task])


def write_report(sweep: Sweep, out_dir: Path) -> list[Path]:
    """Write table.md, table.csv, curves.png and comparison.md into ``out_dir`` (regenerated, so overwritten)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = to_markdown(sweep)
    paths = [out_dir / name for name in REPORT_FILES]
    paths[0].write_text(table)
    paths[1].write_text(to_csv(sweep))
    plot_curves(sweep, paths[2])
    paths[3].write_text(comparison_markdown(sweep, table))
    return paths


# ---------------------------------------------------------------------------------------------------- launching

_RESERVED = {
    "experiment": "--experiments",
    "seed": "--seeds",
    "hydra.sweep.dir": "--sweep-dir",
}


def sweep_command(
    experiments: Sequence[str], seeds: Sequence[int], sweep_dir: Path, overrides: Sequence[str]
) -> list[str]:
    """The ``finetune.train`` multirun that compare launches; the user's overrides go through unchanged."""
    for override in overrides:
        if override in ("-m", "--multirun"):
            raise CompareError(f"{override!r}: compare.py always launches a multirun; leave it out.")
        key = override.lstrip("+~").split("=", 1)[0]
        if key in _RESERVED:
            raise CompareError(
                f"Override {override!r}: compare.py sets {key} itself; use {_RESERVED[key]} instead "
                "(e.g. --experiments finetune,scratch --seeds 0,1)."
            )
    return [
        sys.executable,
        "-m",
        "finetune.train",
        "-m",
        f"experiment={','.join(experiments)}",
        f"seed={','.join(str(s) for s in seeds)}",
        f"hydra.sweep.dir={_hydra_value(str(sweep_dir))}",
        *overrides,
    ]


def _hydra_value(text: str) -> str:
    """A path as one Hydra override value: quoted when it holds spaces, commas or brackets (a comma means a sweep)."""
    if re.fullmatch(r"[\w./:~+@%-]+", text):
        return text
    if "'" in text or "\\" in text:
        raise CompareError(f"Sweep folder {text!r}: pick a path without quotes or backslashes.")
    return f"'{text}'"


def default_sweep_dir(overrides: Sequence[str]) -> Path:
    """``<paths.log_dir>/multiruns/<now>_compare``, next to train's own multiruns."""
    log_dir = "logs"
    for override in overrides:
        if override.lstrip("+").startswith("paths.log_dir="):
            log_dir = override.split("=", 1)[1]
    return Path(log_dir) / "multiruns" / f"{datetime.now():%Y-%m-%d_%H-%M-%S.%f}_compare"


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
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line or shlex.join(command),
        "train_command": shlex.join(command),
        "experiments": list(experiments),
        "seeds": list(seeds),
        "machine": machine(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    (sweep_dir / LAUNCH_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    returncode = subprocess.run(command).returncode
    record.update(finished=datetime.now().isoformat(timespec="seconds"), returncode=returncode)
    (sweep_dir / LAUNCH_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return returncode


# ---------------------------------------------------------------------------------------------------- CLI


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. finetune,scratch,frozen")
    return items


def _seeds(text: str) -> list[int]:
    items = _list(text)
    if not all(_is_int(i) for i in items):
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, e.g. 0,1,2 (got {text!r})")
    return [int(i) for i in items]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/compare.py",
        description="Fine-tune vs scratch vs frozen over seeds: launch the Hydra multirun, then write a table "
        "(Markdown, CSV) and a figure of per-epoch curves. With --from, only aggregate an existing multirun folder.",
        epilog="Example: python scripts/compare.py data=folder data.root=../shared/data/hotdog-kaggle "
        "model.backbone=mobilenet_v2 pretrained_weights=../shared/weights/mobilenet_v2-imagenet-features.pth",
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
    """Exit status 0 when every expected job completed, 1 when some are missing or failed, 2 on a usage error."""
    args = parser().parse_intermixed_args(argv)  # overrides may come before and after the flags
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
        paths = write_report(sweep, args.out or sweep_dir)
    except CompareError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 2
    print(to_markdown(sweep))
    for job in sweep.ignored:
        print(
            f"compare: ignored {job.folder} (experiment {job.experiment}, seed {job.seed}: not in the expected "
            f"{','.join(sweep.experiments)} x seeds {','.join(map(str, sweep.seeds))})",
            file=sys.stderr,
        )
    print("Wrote " + ", ".join(str(p) for p in paths))
    problems = sweep.problems
    if problems:
        print(f"compare: {len(problems)} expected job(s) missing or failed:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 1 if returncode else 0
