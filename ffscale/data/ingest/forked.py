"""Work spread over forked processes, results as they finish: the sharder's and the indexer's.

Forked, so the work's inputs (up to ImageNet's 1.28M locators, some of them lambdas) are inherited,
not pickled; an executor, not a Pool, so a worker killed by the OOM killer raises BrokenProcessPool
instead of leaving the job waiting forever.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed


def forked_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for every item, in completion order; in this process when workers <= 1."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx) as pool:
        for fut in as_completed([pool.submit(fn, item) for item in items]):
            yield fut.result()
