#!/usr/bin/env python
"""Rank candidate recipes by clean and shifted accuracy on the validation split (never the test split).

    python scripts/select_recipe.py NAME=DIR[,DIR...] [NAME=DIR...] [--shift-weight 0.5] [--out FILE.csv]

Each ``DIR`` is the folder of one shift benchmark (``python -m finetune.robustness ... hydra.run.dir=DIR``; its
``robustness.json``) of one run of the candidate ``NAME`` (one per seed), scored on a copy of the validation split
(``scripts/val_split_folder.py VAL ...``, then ``data.root=VAL split=test``). A benchmark of any other folder, a test
split among them, is refused: a recipe chosen here has never seen the test split. Every benchmark must have scored
the same validation photos and the same shifted sets.

Per run the score is ``(1 - w) * clean accuracy + w * mean accuracy over the shifted sets`` (``w``:
``--shift-weight``, 0.5 by default: both count the same); a candidate's is the mean over its runs. The table (mean ±
sample standard deviation over runs), best first, goes to stdout and with ``--out`` to a CSV file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, even where another copy is installed

RESULTS = "robustness.json"
COLUMNS = ("candidate", "runs", "score", "clean val acc", "shifted val acc", "gap")


def read_benchmark(path: Path) -> dict[str, Any]:
    """One benchmark's ``robustness.json`` (``path``: the file or its folder), refused unless it scored a copy of
    a validation split."""
    from finetune.errors import PathError, SettingError

    file = path / RESULTS if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise PathError(f"{str(path)!r}: no shift benchmark there ({file.name} cannot be read: {error}).") from None
    if not results.get("validation_split"):
        raise SettingError(
            f"{str(path)!r} is a shift benchmark of {results.get('source')!r}, which is not a copy of a validation "
            "split: recipes are chosen on validation only. Copy the runs' validation photos with "
            "scripts/val_split_folder.py VAL data=folder data.root=PHOTOS, and run the benchmark with "
            "data=folder data.root=VAL split=test."
        )
    return results


def run_scores(results: dict[str, Any], shift_weight: float) -> dict[str, float]:
    """Clean and mean shifted accuracy of one benchmark, their gap and the weighted score."""
    clean, shifted = results["sets"]["clean"]["acc"], results["mean_over_shifts"]["acc"]
    return {
        "score": (1 - shift_weight) * clean + shift_weight * shifted,
        "clean val acc": clean,
        "shifted val acc": shifted,
        "gap": clean - shifted,
    }


def rank(candidates: dict[str, list[Path]], shift_weight: float) -> list[dict[str, Any]]:
    """One row per candidate: the mean and standard deviation over its runs of each column, best score first."""
    from finetune.errors import SettingError
    from finetune.stats import summarize

    if not 0 <= shift_weight <= 1:
        raise SettingError(f"--shift-weight must be in [0, 1] (0: clean accuracy only), got {shift_weight}.")
    reference: tuple[str, Any, Any] | None = None
    rows = []
    for name, paths in candidates.items():
        scores = []
        for path in paths:
            results = read_benchmark(path)
            split = dict(results["validation_split"])
            sets = sorted(key for key in results["sets"] if key != "clean")
            if reference is None:
                reference = (str(path), split, sets)
            elif (split, sets) != reference[1:]:
                raise SettingError(
                    f"{str(path)!r} and {reference[0]!r} scored different photos or shifted sets ({split}, {sets} vs "
                    f"{reference[1]}, {reference[2]}): rank benchmarks of one validation split and one set of shifts."
                )
            scores.append(run_scores(results, shift_weight))
        row: dict[str, Any] = {"candidate": name, "runs": len(scores)}
        for column in COLUMNS[2:]:
            row[column] = summarize([s[column] for s in scores])
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["score"].mean, -r["clean val acc"].mean, r["candidate"]))


def _cell(stat: Any) -> str:
    if stat.std is None:
        return f"{stat.mean:.3f}"
    return f"{stat.mean:.3f} ± {stat.std:.3f}"


def to_markdown(rows: list[dict[str, Any]], shift_weight: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * (len(COLUMNS) - 2)]
    for row in rows:
        lines.append(f"| {row['candidate']} | {row['runs']} | " + " | ".join(_cell(row[c]) for c in COLUMNS[2:]) + " |")
    lines.append("")
    lines.append(
        f"score = {1 - shift_weight:g} x clean + {shift_weight:g} x mean over the shifted sets, on the validation "
        "split; mean ± standard deviation over each candidate's runs; best first."
    )
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    fields = ["candidate", "runs"] + [f"{c} {part}" for c in COLUMNS[2:] for part in ("mean", "std")]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = {"candidate": row["candidate"], "runs": row["runs"]}
        for column in COLUMNS[2:]:
            values[f"{column} mean"], values[f"{column} std"] = row[column].mean, row[column].std
        writer.writerow({k: "" if v is None else v for k, v in values.items()})
    return out.getvalue()


def parse_candidates(items: Sequence[str]) -> dict[str, list[Path]]:
    from finetune.errors import SettingError

    candidates: dict[str, list[Path]] = {}
    for item in items:
        name, sep, dirs = item.partition("=")
        if not sep or not name or not dirs:
            raise SettingError(f"{item!r}: give each candidate as NAME=DIR[,DIR...] (one benchmark folder per run).")
        if name in candidates:
            raise SettingError(f"The candidate {name!r} is given twice: list all its runs in one NAME=DIR,DIR,...")
        candidates[name] = [Path(d) for d in dirs.split(",") if d]
    return candidates


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidates", nargs="+", help="NAME=DIR[,DIR...]: shift benchmarks of a candidate's runs")
    parser.add_argument("--shift-weight", type=float, default=0.5, help="weight of the shifted accuracy (0.5)")
    parser.add_argument("--out", type=Path, help="also write the table as CSV to this file")
    args = parser.parse_args(argv)
    from finetune import atomic
    from finetune.errors import UserError

    try:
        rows = rank(parse_candidates(args.candidates), args.shift_weight)
    except UserError as error:  # a mistake: one line, exit code 2; a bug keeps its traceback
        parser.exit(2, f"Error: {error}\n")
    print(to_markdown(rows, args.shift_weight), end="")
    if args.out is not None:
        atomic.write_text(args.out, to_csv(rows))
        print(f"Wrote {args.out.resolve()}")


if __name__ == "__main__":
    main()
