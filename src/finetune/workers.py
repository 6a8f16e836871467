"""The start method for DataLoader worker processes, shared by every loader the package builds."""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

from torch.utils.data import DataLoader, Dataset


def worker_context(num_workers: int) -> BaseContext | None:
    """The loader workers' start method: the platform's usual one, even inside a joblib (loky) sweep worker.

    loky makes itself the default start method in its workers, and its Popen cannot start the plain Process
    objects a DataLoader creates ("'Process' object has no attribute 'env'"). Pass the result as a DataLoader's
    ``multiprocessing_context``; ``None`` (no workers, or a standard start method) leaves torch's default alone.
    """
    if num_workers == 0:
        return None
    method = multiprocessing.get_start_method(allow_none=True)
    if method in (None, "fork", "spawn", "forkserver"):
        return None
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def ordered_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A loader over ``dataset`` in its own order (no shuffling), for scoring or extracting every item once."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        multiprocessing_context=worker_context(num_workers),
    )
