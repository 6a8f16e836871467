"""Fine-tune vs scratch vs frozen: a sweep's ``results.json`` files -> table.md, table.csv, curves.png, comparison.md.

Pure: it reads a sweep folder (Hydra's ``multirun.yaml`` and one job folder per job, laid out as
``finetune.harness.run_folder`` says) and writes files; launching and the command line are ``scripts/compare.py``'s. The
table covers exactly an expected grid of experiments x seeds (x folds of a ``data.fold=0,...,K-1`` sweep: a row's mean
over folds selects a configuration), and names every cell without a completed job instead of averaging it away."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from finetune import atomic
from finetune.harness.run_folder import HYDRA, RESULTS, RunFolder
from finetune.stats import Stat, gap, summarize

DEFAULT_EXPERIMENTS = ("finetune", "scratch", "frozen")  # conf/train.yaml's default experiment comes first
DEFAULT_SEEDS = (0, 1, 2)
TRAIN_DEFAULT_SEED = 0  # conf/train.yaml's seed
# (results.json key, table heading, CSV column stem, decimals)
METRICS = (
    ("test/acc", "test acc", "test_acc", 3),
    ("val/acc", "best val acc", "val_acc", 3),
    ("epochs", "epochs", "epochs", 1),
    ("fit_seconds", "fit s", "fit_seconds", 0),
)
# From a job's shift benchmark, when it has one (finetune.robustness run with hydra.run.dir=<job>/robustness):
# (key, heading, CSV column stem, decimals); the table gets these columns when any job of it has the file.
ROBUSTNESS = Path("robustness") / "robustness.json"
SHIFT_METRICS = (
    ("shift/mean_acc", "shift acc", "shift_mean_acc", 3),
    ("shift/gap", "shift gap", "shift_gap", 3),
    ("shift/ece", "shift ECE", "shift_ece", 3),
)
MS = ("mean", "std")  # a metric's two CSV columns, named after Stat's fields
GAP_METRICS = ("test/acc", "val/acc")
GAPS = (("finetune", "scratch"), ("finetune", "frozen"))
CURVES = (("train/loss", "train loss"), ("val/acc", "validation accuracy"))
MULTIRUN = "multirun.yaml"  # written by Hydra into the sweep folder
LAUNCH_RECORD = "compare.json"  # written by scripts/compare.py into the sweep folder: the command and the machine
REPORT_FILES = ("table.md", "table.csv", "curves.png", "comparison.md")
FIGURE_NEEDS = "curves.png needs matplotlib: pip install 'finetune[figures]'"


class ReportError(Exception):
    """A problem with the sweep folder, worded for the user."""


class FigureUnavailable(ReportError):
    """matplotlib is not installed: the report was written without ``curves.png`` (``written`` lists what was)."""

    def __init__(self, written: list[Path]) -> None:
        super().__init__(FIGURE_NEEDS)
        self.written = written


@dataclass(frozen=True)
class Job:
    """One job folder of a sweep. ``problem`` says why it does not count; ``None`` means it completed."""

    folder: Path
    experiment: str | None
    seed: int | None
    results: dict[str, Any] | None
    problem: str | None
    fold: int | None = None


@dataclass
class Sweep:
    """The jobs found in a sweep folder, matched against the expected experiments x seeds x folds."""

    folder: Path
    experiments: list[str]
    seeds: list[int]
    jobs: list[Job]
    folds: list[int | None] = field(default_factory=lambda: [None])  # [None]: no k-fold validation

    def expected(self, job: Job) -> bool:
        return job.experiment in self.experiments and job.seed in self.seeds and job.fold in self.folds

    def completed(self, experiment: str) -> list[Job]:
        """The jobs of ``experiment`` that count: completed, and for an expected seed and fold."""
        return [j for j in self.jobs if j.problem is None and j.experiment == experiment and self.expected(j)]

    @property
    def problems(self) -> list[str]:
        """Every expected job that did not complete (missing or failed), and duplicates; empty when all is well."""
        problems = []
        for experiment, seed, fold in itertools.product(self.experiments, self.seeds, self.folds):
            here = [j for j in self.jobs if (j.experiment, j.seed, j.fold) == (experiment, seed, fold)]
            done = [j for j in here if j.problem is None]
            cell = f"{experiment} seed {seed}" + ("" if fold is None else f" fold {fold}")
            if not here:
                problems.append(f"missing: {cell} (no job folder: the sweep never got to it)")
            for job in here:
                if job.problem is not None:
                    problems.append(f"failed: {cell} in {job.folder}: {job.problem}")
            if len(done) > 1:
                folders = ", ".join(str(j.folder) for j in done)
                problems.append(f"duplicate: {cell} completed {len(done)} times ({folders})")
        return problems

    @property
    def ignored(self) -> list[Job]:
        """Jobs outside the expected grid (another experiment, seed or fold, or not identifiable): not in the table."""
        return [j for j in self.jobs if not self.expected(j)]


def read_job(folder: Path) -> Job:
    """A job folder -> its identity (experiment, seed) and its results, or the reason it does not count.

    ``finetune.train`` writes results.json when a run ends; one without a ``status`` key, or ``completed``, counts.
    """
    run = RunFolder(folder)
    results: Any = None
    try:
        results = json.loads(run.results.read_text())
    except FileNotFoundError:
        problem: str | None = f"no {RESULTS} (the job failed or is still running; see its train.log)"
    except (OSError, json.JSONDecodeError) as error:
        problem = f"unreadable {RESULTS} ({error})"
    else:
        problem = _results_problem(results)
        if problem is None:
            results = {**results, **shift_results(run.path)}
    experiment, seed = _identify(run, results)
    fold = results.get("fold") if isinstance(results, dict) else (_saved_grid(run, folds=True) or [None])[0]
    return Job(run.path, experiment, seed, results if problem is None else None, problem, fold=fold)


def shift_results(folder: Path) -> dict[str, float | None]:
    """The shift columns of a job folder's ``robustness/robustness.json``; none without a readable one."""
    try:
        record = json.loads((Path(folder) / ROBUSTNESS).read_text())
        mean = record["mean_over_shifts"]
        return {"shift/mean_acc": mean["acc"], "shift/gap": record["gap"], "shift/ece": mean["ece"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def columns(sweep: Sweep) -> tuple[tuple[str, str, str, int], ...]:
    """The table's metrics: :data:`METRICS`, and :data:`SHIFT_METRICS` when some job of the sweep has them."""
    jobs = [j for e in sweep.experiments for j in sweep.completed(e)]
    return METRICS + (SHIFT_METRICS if any("shift/mean_acc" in j.results for j in jobs) else ())


def _saved_grid(run: RunFolder, folds: bool = False) -> Any:
    """:func:`_grid` of the job's ``.hydra/overrides.yaml``; ``None`` without one, or not what Hydra writes."""
    try:
        lines = yaml.safe_load(run.overrides.read_text())
        if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            return _grid(lines, folds=folds)
    except (OSError, ValueError, yaml.YAMLError, HydraException):
        pass
    return None


def _results_problem(results: Any) -> str | None:
    if not isinstance(results, dict):
        return f"{RESULTS} does not hold a JSON object"
    status = results.get("status", "completed")
    if status != "completed":
        error = results.get("error")
        because = f": {error}" if isinstance(error, str) and error else ""
        return f"{RESULTS} says status {status!r}, not 'completed'{because}"
    for key, *_ in METRICS:
        value = results.get(key)
        if key == "test/acc" and value is None and results.get("test_after_fit") is False:
            continue  # a validation-only run
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"{RESULTS} has no numeric {key!r} (got {value!r})"
    if not isinstance(results.get("history"), list):
        return f"{RESULTS} has no per-epoch 'history' list"
    return None


def _grid(overrides: list[str], folds: bool = False) -> tuple[list[str], list[int]] | list[int | None]:
    """The experiments and seeds that Hydra overrides select, conf/train.yaml's defaults for those not given; with
    ``folds``, the folds they select instead (``data.fold=0,...,K-1``; ``[None]``: no k-fold validation)."""
    values = {"experiment": [DEFAULT_EXPERIMENTS[0]], "seed": [str(TRAIN_DEFAULT_SEED)], "data.fold": ["null"]}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group in values and not override.is_delete():
            sweep = override.is_sweep_override()
            values[override.key_or_group] = list(override.sweep_string_iterator()) if sweep else [str(override.value())]
    if folds:
        return [None if fold == "null" else int(fold) for fold in values["data.fold"]]
    return values["experiment"], [int(seed) for seed in values["seed"]]


def _identify(run: RunFolder, results: Any) -> tuple[str | None, int | None]:
    """From results.json, else the job folder's name, else the job's ``.hydra/overrides.yaml``."""
    if isinstance(results, dict) and isinstance(results.get("experiment"), str) and type(results.get("seed")) is int:
        return results["experiment"], results["seed"]
    name = run.job_name()
    if name is not None:
        return name
    grid = _saved_grid(run)
    if grid is not None and len(grid[0]) == len(grid[1]) == 1:
        return grid[0][0], grid[1][0]
    return None, None  # no overrides.yaml, or not what Hydra writes: the job cannot be identified


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder directly below ``sweep_dir`` (see ``RunFolder.is_job_folder``), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"Sweep folder {str(sweep_dir)!r} does not exist. Pass --from the folder of one multirun.")
    folders = [p for p in sweep_dir.iterdir() if p.is_dir() and RunFolder(p).is_job_folder()]
    if not folders:
        sweeps = sorted(str(p) for p in sweep_dir.iterdir() if (p / MULTIRUN).is_file())
        hint = f" It holds several sweeps; pass one of: {', '.join(sweeps[-5:])}." if sweeps else ""
        raise ReportError(
            f"No job folders in {str(sweep_dir)!r} (a multirun writes one subfolder per job, each with {HYDRA}/ "
            f"and {RESULTS}).{hint}"
        )
    folders.sort(key=lambda p: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", p.name)])
    return [read_job(folder) for folder in folders]  # job 10 after job 9: digit runs sort as numbers


def _multirun_task(sweep_dir: Path) -> list[str] | None:
    """The overrides the sweep was launched with (``multirun.yaml``), or ``None`` without that file."""
    path = Path(sweep_dir) / MULTIRUN
    return list(OmegaConf.to_container(OmegaConf.load(path).hydra.overrides.task)) if path.is_file() else None


def expected_grid(sweep_dir: Path) -> tuple[list[str], list[int]]:
    """The experiments and seeds a sweep was launched with (its ``multirun.yaml``; conf/train.yaml's defaults for
    what it did not override), or finetune,scratch,frozen x 0,1,2 when the folder has no ``multirun.yaml``."""
    task = _multirun_task(sweep_dir)
    return _grid(task) if task is not None else (list(DEFAULT_EXPERIMENTS), list(DEFAULT_SEEDS))


def load_sweep(sweep_dir: Path, experiments: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> Sweep:
    """Read every job of a sweep; the expected grid is what is passed, else what the sweep was launched with."""
    jobs = find_jobs(Path(sweep_dir))
    grid_experiments, grid_seeds = expected_grid(Path(sweep_dir))
    experiments, seeds = list(experiments or grid_experiments), list(seeds or grid_seeds)
    return Sweep(Path(sweep_dir), experiments, seeds, jobs, _grid(_multirun_task(sweep_dir) or [], folds=True))


def experiment_stats(sweep: Sweep, experiment: str) -> dict[str, Stat]:
    """Every metric of the table over the completed seeds (and folds) of one experiment."""
    jobs = sweep.completed(experiment)
    values = {key: [j.results.get(key) for j in jobs] for key, *_ in columns(sweep)}
    return {key: summarize([float(v) for v in found if v is not None]) for key, found in values.items()}


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


def _fmt(stat: Stat, decimals: int, signed: bool = False) -> str:
    if stat.mean is None:
        return "n/a"
    text = f"{stat.mean:{'+' if signed else ''}.{decimals}f}"
    return text if stat.std is None else f"{text} ± {stat.std:.{decimals}f}"


def to_markdown(sweep: Sweep) -> str:
    """The results table, the gaps, what ± means, and every job that is missing or failed."""
    folded, metrics = sweep.folds != [None], columns(sweep)
    heading = f"| experiment | {'runs' if folded else 'seeds'} | " + " | ".join(t for _, t, _, _ in metrics) + " |"
    lines = [heading, "|---|---:|" + "---:|" * len(metrics)]
    for experiment in sweep.experiments:
        stats = experiment_stats(sweep, experiment)
        runs = len(sweep.completed(experiment))
        cells = [f"{runs}/{len(sweep.seeds) * len(sweep.folds)}", *(_fmt(stats[k], d) for k, _, _, d in metrics)]
        lines.append(f"| {experiment} | " + " | ".join(cells) + " |")
    if gaps := gap_stats(sweep):
        titles = " | ".join(title for key, title, _, _ in METRICS if key in GAP_METRICS)
        lines += ["", f"| gap | {titles} |", "|---|" + "---:|" * len(GAP_METRICS)]
        for name, stats in gaps.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(stats[key], 3, signed=True) for key in GAP_METRICS) + " |")
    lines += [
        "",
        f"Seeds {', '.join(str(s) for s in sweep.seeds)}: mean ± sample standard deviation over seeds; a gap is the "
        "difference of the two means ± its standard error, √(s₁²/n₁ + s₂²/n₂). Test accuracy is that of the "
        "best-on-validation checkpoint; epochs and fit seconds are per run.",
    ]
    if folded:
        lines.append(
            f"Folds {', '.join(str(f) for f in sweep.folds)} of k-fold validation: each row is over seeds × folds "
            "(runs), and its best val acc, the mean over folds, is what selects a configuration."
        )
    if metrics != METRICS:
        having = sum("shift/mean_acc" in j.results for e in sweep.experiments for j in sweep.completed(e))
        lines.append(
            f"Shift acc, gap and ECE: finetune.robustness's mean over its shifted test sets (clean acc minus it for "
            f"the gap), from the {having} job(s) with a {ROBUSTNESS.as_posix()}."
        )
    if backbones := sorted({str(j.results.get("backbone")) for e in sweep.experiments for j in sweep.completed(e)}):
        lines.append(f"Backbone: {', '.join(backbones)}.")
    if problems := sweep.problems:
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
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metrics = columns(sweep)
    writer.writerow(["kind", "name", "seeds", "expected_seeds", *(f"{s}_{x}" for _, _, s, _ in metrics for x in MS)])
    rows = [("experiment", e, experiment_stats(sweep, e)) for e in sweep.experiments]
    for kind, name, stats in rows + [("gap", name, stats) for name, stats in gap_stats(sweep).items()]:
        cells = [_num(getattr(stats[key], x)) if key in stats else "" for key, *_ in metrics for x in MS]
        writer.writerow([kind, name, stats["val/acc"].n, len(sweep.seeds) * len(sweep.folds), *cells])
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def plot_curves(sweep: Sweep, path: Path) -> Path:
    """Two panels, train loss and validation accuracy per epoch: one line per experiment, a ±1 std band over seeds.

    Raises ImportError when matplotlib is not installed (it is the optional ``figures`` extra).
    """
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
            band = [(m - s, m + s) for m, s in zip(mean, std, strict=True)]
            ax.fill_between(epochs, *zip(*band, strict=True), color=colors[experiment], alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel=title, title=f"{title} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    figure.suptitle("Fine-tune vs scratch vs frozen: mean over seeds, band ±1 std")
    atomic.save_figure(figure, path, dpi=120)
    return Path(path)


def comparison_markdown(sweep: Sweep, table: str) -> str:
    """A skeleton for docs/comparison.md: command, machine, table, figure, and a place for the findings."""
    try:
        record = json.loads((sweep.folder / LAUNCH_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        record = None  # not launched by scripts/compare.py, or its record is damaged
    if isinstance(record, dict):
        command = record.get("command", "")
        machine_text = ", ".join(f"{k}: {v}" for k, v in record.get("machine", {}).items()) or "not recorded"
    else:
        task = _multirun_task(sweep.folder)
        command = shlex.join(["python", "-m", "finetune.train", "-m", *task]) if task is not None else "not recorded"
        machine_text = "not recorded (the sweep was not launched by scripts/compare.py; say which machine ran it)"
    return f"""# Fine-tune vs scratch vs frozen

Command: `{command}`

Machine: {machine_text}

Sweep folder: `{sweep.folder}`

{table.rstrip(chr(10))}

![Train loss and validation accuracy per epoch](curves.png)

## What it shows

TODO: the finding in a few sentences, how the epoch count was chosen (on validation accuracy), and how it compares \
with the book (fine-tune about 0.94, scratch about 0.85 after 5 epochs on the d2l data).
"""


def write_report(sweep: Sweep, out_dir: Path) -> list[Path]:
    """Write table.md, table.csv, curves.png and comparison.md into ``out_dir`` (regenerated, so overwritten).

    Without matplotlib the other three are still written, a curves.png left from an earlier report is removed (it
    would not match the new table), and :class:`FigureUnavailable` is raised: a missing figure is never silent.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_md, table_csv, figure, doc = (out_dir / name for name in REPORT_FILES)
    table = to_markdown(sweep)
    atomic.write_text(table_md, table)
    atomic.write_text(table_csv, to_csv(sweep))
    atomic.write_text(doc, comparison_markdown(sweep, table))
    try:
        plot_curves(sweep, figure)
    except ImportError as error:
        figure.unlink(missing_ok=True)
        raise FigureUnavailable([table_md, table_csv, doc]) from error
    return [table_md, table_csv, figure, doc]
