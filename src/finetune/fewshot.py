"""Accuracy against training images per class: a few-shot sweep's ``results.json`` files -> fewshot.md, fewshot.csv,
fewshot.png.

Pure, as :mod:`finetune.report`: it reads the job folders of one or more multiruns of
``finetune.train -m data.shots=1,2,5,... data.shot_seed=0,1,2,3,4`` and writes files; ``scripts/fewshot.py``
launches. Per experiment and K, the mean test accuracy over the draws (``data.shot_seed``) with a 95% t-interval:
the draws are the repeated measurements, so the interval says how far another set of K images per class could move
the mean (the test split is fixed; its own sampling error is not in it).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune import atomic
from finetune.report import Job, ReportError, find_jobs
from finetune.stats import Stat, summarize, t_half_width

METRICS = (("test/acc", "test acc"), ("test/balanced_acc", "test balanced acc"), ("val/acc", "best val acc"))
FILES = ("fewshot.md", "fewshot.csv", "fewshot.png")


@dataclass(frozen=True)
class Cell:
    """One experiment at one K: its completed draws and their statistics."""

    experiment: str
    shots: int
    draws: list[int]
    stats: dict[str, Stat]

    def interval(self, key: str = "test/acc") -> float | None:
        return t_half_width(self.stats[key])


def few_shot_jobs(sweep_dirs: Iterable[Path]) -> tuple[list[Job], list[Job]]:
    """(the completed few-shot jobs, every other job) of the sweep folders."""
    jobs = [job for folder in sweep_dirs for job in find_jobs(Path(folder))]
    done = [j for j in jobs if j.problem is None and isinstance(j.results.get("shots"), int)]
    return done, [j for j in jobs if j not in done]


def cells(jobs: Sequence[Job]) -> list[Cell]:
    """Per (experiment, K), the statistics over its draws; a draw that ran twice counts once (the first)."""
    grouped: dict[tuple[str, int], dict[int, Job]] = {}
    for job in jobs:
        key = (str(job.results.get("experiment")), int(job.results["shots"]))
        grouped.setdefault(key, {}).setdefault(int(job.results.get("shot_seed") or 0), job)
    found = []
    for (experiment, shots), draws in sorted(grouped.items()):
        stats = {}
        for key, _ in METRICS:
            values = [float(j.results[key]) for j in draws.values() if isinstance(j.results.get(key), int | float)]
            stats[key] = summarize(values)
        found.append(Cell(experiment, shots, sorted(draws), stats))
    return found


def _fmt(stat: Stat, half: float | None) -> str:
    if stat.mean is None:
        return "n/a"
    return f"{stat.mean:.3f}" + ("" if half is None else f" ± {half:.3f}")


def to_markdown(found: Sequence[Cell]) -> str:
    """One row per experiment and K: draws, then each metric's mean ± the half-width of its 95% t-interval."""
    lines = ["| experiment | K | draws | " + " | ".join(title for _, title in METRICS) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(METRICS))
    for cell in found:
        values = [_fmt(cell.stats[key], t_half_width(cell.stats[key])) for key, _ in METRICS]
        lines.append(f"| {cell.experiment} | {cell.shots} | {len(cell.draws)} | " + " | ".join(values) + " |")
    lines += [
        "",
        "K: training images per class (data.shots); draws: data.shot_seed values. Mean over the draws ± half the "
        "width of its 95% t-interval (t with draws - 1 degrees of freedom); the validation and test splits are the "
        "same for every K and draw.",
    ]
    return "\n".join(lines) + "\n"


def to_csv(found: Sequence[Cell]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [f"{key.replace('/', '_')}_{part}" for key, _ in METRICS for part in ("mean", "std", "ci95")]
    writer.writerow(["experiment", "shots", "draws", *columns])
    for cell in found:
        values = []
        for key, _ in METRICS:
            stat, half = cell.stats[key], t_half_width(cell.stats[key])
            values += ["" if v is None else repr(round(v, 6)) for v in (stat.mean, stat.std, half)]
        writer.writerow([cell.experiment, cell.shots, len(cell.draws), *values])
    return out.getvalue()


def plot(found: Sequence[Cell], path: Path, key: str = "test/acc") -> Path:
    """Mean test accuracy against K (log scale), one line per experiment, error bars the 95% t-intervals.
    Raises ImportError without matplotlib (the optional ``figures`` extra)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    for i, experiment in enumerate(dict.fromkeys(c.experiment for c in found)):
        mine = [c for c in found if c.experiment == experiment and c.stats[key].mean is not None]
        draws = sorted({len(c.draws) for c in mine})
        label = f"{experiment} ({'/'.join(map(str, draws))} draws per K)"
        ax.errorbar(
            [c.shots for c in mine],
            [c.stats[key].mean for c in mine],
            yerr=[c.interval(key) or 0.0 for c in mine],
            marker="o",
            capsize=3,
            color=f"C{i}",
            label=label,
        )
    shots = sorted({c.shots for c in found})
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set(xlabel="training images per class (K)", ylabel=dict(METRICS)[key], title="Few-shot: mean and 95% t-interval")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic.save_figure(figure, path, dpi=120)
    return Path(path)


def write(sweep_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """fewshot.md, fewshot.csv and fewshot.png of the sweeps' completed few-shot jobs, in ``out_dir``."""
    jobs, others = few_shot_jobs(sweep_dirs)
    if not jobs:
        raise ReportError(
            f"No completed few-shot job (a results.json with shots set) in {', '.join(map(str, sweep_dirs))}: "
            f"{len(others)} other job folder(s). Run finetune.train -m data.shots=1,2,5 data.shot_seed=0,1,2 first."
        )
    found = cells(jobs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table, figure = (out_dir / name for name in FILES)
    atomic.write_text(md, to_markdown(found))
    atomic.write_text(table, to_csv(found))
    written = [md, table]
    try:
        written.append(plot(found, figure))
    except ImportError:
        figure.unlink(missing_ok=True)
    return written
