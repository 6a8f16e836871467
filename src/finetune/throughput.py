"""Kept so that existing command lines keep working: the callback lives in :mod:`finetune.callbacks`."""

from finetune.callbacks import Throughput

__all__ = ["Throughput"]
