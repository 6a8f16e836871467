"""Progress of long preparation work: downloads, image checks, cache building, feature extraction.

One library for all of it, the one Lightning's ``RichProgressBar`` uses (``rich``): on a terminal a live bar
(a download shows its size, speed and time left); elsewhere (a SLURM log, a file, a pipe) a plain log line every
``interval`` seconds. Work that ends within ``delay`` seconds shows nothing at all. Only the main process of rank 0
reports, so DDP ranks do not print the same bar N times.

    for path in track(paths, total=len(paths), description="Checking images"):
        ...
    with download_progress(total_bytes, "Downloading hotdog.zip") as advance:
        for chunk in chunks:
            advance(len(chunk))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DELAY = 3.0  # seconds before anything is shown: quick work stays silent
INTERVAL = 30.0  # seconds between two plain lines


class Reporter:
    """Counts progress towards ``total`` and shows it once the work has lasted ``delay`` seconds.

    ``console`` decides the form: a terminal gets a rich bar, anything else plain lines through ``logging`` (so they
    also land in the run's ``train.log``). ``in_bytes=True`` formats sizes and speeds as a download.
    """

    def __init__(
        self,
        total: float | None,
        description: str,
        *,
        unit: str = "items",
        in_bytes: bool = False,
        delay: float = DELAY,
        interval: float = INTERVAL,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total if total else None
        self.description = description
        self.unit = unit
        self.in_bytes = in_bytes
        self.delay = delay
        self.interval = interval
        self.clock = clock
        self.console = console or Console(stderr=True)
        self.enabled = rank_zero_only.rank == 0
        self.completed = 0.0
        self.start = clock()
        self.last_line: float | None = None
        self.lines = 0
        self._progress: Progress | None = None
        self._task = None
        self._rich = self.console.is_terminal and not self.console.is_dumb_terminal

    # --- counting -----------------------------------------------------------------------------------------------
    def advance(self, amount: float = 1) -> None:
        self.completed += amount
        if not self.enabled:
            return
        now = self.clock()
        if self._progress is not None:
            self._progress.update(self._task, completed=self.completed)
        elif now - self.start < self.delay:
            return
        elif self._rich:
            self._start_rich()
        elif self.last_line is None or now - self.last_line >= self.interval:
            self._line(now)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.completed)
            self._progress.stop()
            self._progress = None
        elif self.lines:  # plain lines were printed: say that the work is done
            self._line(self.clock(), done=True)

    # --- output -------------------------------------------------------------------------------------------------
    def _start_rich(self) -> None:
        if self.in_bytes:
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            ]
        else:
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ]
        progress = Progress(*columns, console=self.console)
        self._task = progress.add_task(self.description, total=self.total, completed=self.completed)
        try:
            progress.start()
        except LiveError:  # another live display (e.g. Lightning's rich bar) owns the terminal: plain lines then
            self._rich = False
            self._line(self.clock())
            return
        self._progress = progress

    def _line(self, now: float, done: bool = False) -> None:
        self.last_line = now
        self.lines += 1
        log.info("%s", self.status_line(now, done))

    def status_line(self, now: float | None = None, done: bool = False) -> str:
        """``Downloading x.zip: 12.0 MB of 261.0 MB (4.6%), 3.1 MB/s, 1:20 left``, or for items
        ``Checking images: 412/998 images (41.3%), 120.5 images/s, 0:05 left``."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.completed / elapsed
        if self.in_bytes:
            amount = _size(self.completed) + (f" of {_size(self.total)}" if self.total else "")
            speed = f"{_size(rate)}/s"
        else:
            amount = f"{self.completed:.0f}" + (f"/{self.total:.0f}" if self.total else "") + f" {self.unit}"
            speed = f"{rate:.1f} {self.unit}/s"
        if self.total:
            amount += f" ({100 * self.completed / self.total:.1f}%)"
        if done:
            return f"{self.description}: {amount}, done in {_duration(elapsed)} ({speed})"
        left = ""
        if self.total and rate > 0:
            left = f", {_duration(max(self.total - self.completed, 0) / rate)} left"
        return f"{self.description}: {amount}, {speed}{left}"


def track(
    iterable: Iterable[T],
    total: float | None = None,
    description: str = "Working",
    *,
    unit: str = "items",
    delay: float = DELAY,
    interval: float = INTERVAL,
    console: Console | None = None,
) -> Iterator[T]:
    """Yield from ``iterable``, reporting progress after ``delay`` seconds (``total`` defaults to ``len``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    reporter = Reporter(total, description, unit=unit, delay=delay, interval=interval, console=console)
    try:
        for item in iterable:
            yield item
            reporter.advance(1)
    finally:
        reporter.close()


@contextmanager
def download_progress(
    total_bytes: int | None,
    description: str,
    *,
    delay: float = DELAY,
    interval: float = INTERVAL,
    console: Console | None = None,
) -> Iterator[Callable[[int], None]]:
    """A context whose value, ``advance(nbytes)``, counts downloaded bytes (size, speed, time left are shown)."""
    reporter = Reporter(total_bytes, description, in_bytes=True, delay=delay, interval=interval, console=console)
    try:
        yield reporter.advance
    finally:
        reporter.close()


def copy_with_progress(source, destination, total_bytes: int | None, description: str, chunk_size: int = 1 << 20):
    """``shutil.copyfileobj`` for a download (``source`` a response, ``destination`` a file), with progress."""
    with download_progress(total_bytes, description) as advance:
        while chunk := source.read(chunk_size):
            destination.write(chunk)
            advance(len(chunk))


def _size(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
