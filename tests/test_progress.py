"""finetune.progress: a rich bar on a terminal, plain periodic log lines elsewhere, nothing for quick work."""

import io
import logging

import pytest
from rich.console import Console

from finetune.progress import Reporter, copy_with_progress, download_progress, track


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plain() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_quick_work_shows_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="finetune.progress"):
        assert list(track(range(5), description="Checking images", console=_plain())) == list(range(5))
    assert caplog.records == []


def test_plain_lines_every_interval_with_rate_and_time_left(caplog):
    clock = Clock()
    reporter = Reporter(100, "Checking images", unit="images", delay=3, interval=10, console=_plain(), clock=clock)
    with caplog.at_level(logging.INFO, logger="finetune.progress"):
        for _ in range(100):
            clock.now += 0.5  # 2 images/s, 50 s in all
            reporter.advance()
        reporter.close()
    lines = [record.getMessage() for record in caplog.records]
    # First line once the delay has passed (t=3), then one per 10 s (13, 23, 33, 43), then "done".
    assert len(lines) == 6, lines
    assert lines[0] == "Checking images: 6/100 images (6.0%), 2.0 images/s, 0:47 left"
    assert lines[-1] == "Checking images: 100/100 images (100.0%), done in 0:50 (2.0 images/s)"


def test_download_lines_show_size_speed_and_time_left(caplog):
    clock = Clock()
    reporter = Reporter(
        261_000_000, "Downloading hotdog.zip", in_bytes=True, delay=3, interval=10, console=_plain(), clock=clock
    )
    with caplog.at_level(logging.INFO, logger="finetune.progress"):
        for _ in range(4):
            clock.now += 1
            reporter.advance(3_000_000)
    assert [r.getMessage() for r in caplog.records] == [
        "Downloading hotdog.zip: 9.0 MB of 261.0 MB (3.4%), 3.0 MB/s, 1:24 left"
    ]


def test_unknown_total_still_reports_amount_and_speed():
    clock = Clock()
    reporter = Reporter(None, "Downloading x", in_bytes=True, console=_plain(), clock=clock)
    clock.now = 2
    reporter.advance(4_000_000)
    assert reporter.status_line() == "Downloading x: 4.0 MB, 2.0 MB/s"


def test_terminal_gets_a_rich_bar_with_download_columns(caplog):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    clock = Clock()
    reporter = Reporter(10_000_000, "Downloading hotdog.zip", in_bytes=True, delay=1, console=console, clock=clock)
    with caplog.at_level(logging.INFO, logger="finetune.progress"):
        for _ in range(10):
            clock.now += 0.5
            reporter.advance(1_000_000)
        reporter.close()
    text = out.getvalue()
    assert "Downloading hotdog.zip" in text and "10.0/10.0 MB" in text
    assert caplog.records == [], "a terminal gets the bar, not log lines"


def test_only_rank_zero_reports(caplog, monkeypatch):
    from pytorch_lightning.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    clock = Clock()
    reporter = Reporter(10, "Checking images", delay=0, console=_plain(), clock=clock)
    with caplog.at_level(logging.INFO, logger="finetune.progress"):
        for _ in range(10):
            clock.now += 100
            reporter.advance()
        reporter.close()
    assert caplog.records == [] and reporter.completed == 10


def test_copy_with_progress_copies_every_byte():
    source, destination = io.BytesIO(b"x" * 3_000_001), io.BytesIO()
    copy_with_progress(source, destination, 3_000_001, "Downloading", chunk_size=1 << 20)
    assert destination.getvalue() == b"x" * 3_000_001


def test_download_progress_counts_what_is_advanced():
    with download_progress(100, "Downloading", console=_plain()) as advance:
        advance(60)
        advance(40)
    assert advance.__self__.completed == 100
    with pytest.raises(RuntimeError):
        with download_progress(100, "Downloading", console=_plain()) as advance:
            raise RuntimeError("cut connection")  # the reporter closes and the error goes through
