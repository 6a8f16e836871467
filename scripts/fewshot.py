#!/usr/bin/env python
"""Accuracy against training images per class: launch a few-shot multirun, then draw the curve.

    python scripts/fewshot.py [--experiments LIST] [--shots LIST] [--draws N] [--sweep-dir DIR] [--out DIR] [overrides]
    python scripts/fewshot.py --from DIR [--from DIR ...] [--out DIR]

Launches ``python -m finetune.train -m experiment=E data.shots=K1,K2,... data.shot_seed=0,...,N-1 <overrides>``
once per experiment (each into ``<sweep-dir>/<experiment>``), then writes fewshot.md, fewshot.csv and fewshot.png
(``finetune.fewshot``) of every experiment's sweep in ``<sweep-dir>``: launch experiments that need other overrides
(``features=cached`` for frozen only) by separate calls with the same ``--sweep-dir``. Every K trains for the same
``trainer.max_epochs``: with K images per class under the batch size an epoch is one optimizer step, so pass the
steps you want as epochs. ``--help`` lists every flag.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from finetune.fewshot import write
from finetune.report import ReportError

RESERVED = ("experiment", "data.shots", "data.shot_seed", "hydra.sweep.dir")


def command(experiment: str, shots: list[int], draws: int, sweep_dir: Path, overrides: list[str]) -> list[str]:
    taken = [o for o in overrides if o.lstrip("+~").split("=")[0] in RESERVED]
    if taken:
        raise ReportError(f"{', '.join(taken)}: fewshot.py sets these itself (--experiments, --shots, --draws).")
    return [
        sys.executable,
        "-m",
        "finetune.train",
        "-m",
        f"experiment={experiment}",
        f"data.shots={','.join(map(str, shots))}",
        f"data.shot_seed={','.join(map(str, range(draws)))}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 1,2,5 (got {text!r})") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, e.g. 1,2,5 (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fewshot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to every job (data, model, trainer, ...)")
    p.add_argument("--from", dest="from_dirs", type=Path, action="append", metavar="DIR", help="aggregate only")
    p.add_argument("--experiments", default="frozen,finetune", help="comma-separated (default frozen,finetune)")
    p.add_argument("--shots", type=_ints, default=[1, 2, 5, 10, 20, 50], help="K values (default 1,2,5,10,20,50)")
    p.add_argument("--draws", type=int, default=5, help="data.shot_seed=0..N-1 per K (default 5)")
    p.add_argument("--sweep-dir", type=Path, help="new folder (default logs/multiruns/<date>_<time>_fewshot)")
    p.add_argument("--out", type=Path, help="where fewshot.md/.csv/.png go (default: the sweep folder)")
    args = p.parse_intermixed_args(argv)
    try:
        if args.from_dirs:
            if args.overrides:
                raise ReportError("--from aggregates existing sweeps: it takes no overrides.")
            sweeps, returncode = args.from_dirs, 0
        else:
            root = args.sweep_dir or Path("logs") / "multiruns" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}_fewshot"
            experiments = [e for e in args.experiments.split(",") if e]
            taken = [str(root / e) for e in experiments if (root / e).exists() and any((root / e).iterdir())]
            if taken:
                raise ReportError(f"{', '.join(taken)} already holds files: pass a new --sweep-dir, or --from it.")
            returncode = 0
            for experiment in experiments:
                launch = command(experiment, args.shots, args.draws, root / experiment, args.overrides)
                print("+ " + shlex.join(launch), flush=True)
                returncode = subprocess.run(launch).returncode or returncode
            # Every experiment's sweep in the folder, those of earlier calls included (experiments that need
            # different overrides, e.g. features=cached for frozen only, are launched by separate calls).
            sweeps = sorted(d for d in root.iterdir() if (d / "multirun.yaml").is_file())
        written = write(sweeps, args.out or (sweeps[0] if args.from_dirs else root))
    except ReportError as error:
        print(f"fewshot: {error}", file=sys.stderr)
        return 2
    print(written[0].read_text())
    print("Wrote " + ", ".join(str(p.resolve()) for p in written))
    return 1 if returncode else 0


if __name__ == "__main__":
    sys.exit(main())
