"""Silence upstream messages that are known to be harmless here, so that the warnings a run prints matter.

Each filter says why it is harmless. Anything not listed here is left alone.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is harmless in this template)
HARMLESS_WARNINGS = (
    # Lightning's own pytree helper calls a torch API that torch >= 2.9 deprecated; nothing of ours uses it.
    (r".*isinstance\(treespec, LeafSpec\)", "Lightning internals on a newer torch"),
    # We log epoch-level metrics only (on_step=False), so the per-step logging interval never applies.
    (r".*The number of training batches .* is smaller than the logging interval", "epoch-level logging only"),
    # A frozen backbone keeps its BatchNorm layers in eval mode on purpose (their statistics must not move).
    (r".*module\(s\) in eval mode at the start of training", "frozen BatchNorm is in eval mode by design"),
)


class _DropLightningTips(logging.Filter):
    """Lightning's '💡 Tip' lines advertise other products; they say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_warnings() -> None:
    """Install the filters (idempotent)."""
    for pattern, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
