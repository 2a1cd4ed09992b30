"""Ordered, bounded look-ahead over a thread pool: decoding runs ahead of whoever consumes it.

Threads rather than processes: Pillow releases the GIL while decoding and resizing, and results
(float arrays of a few MB) would otherwise be pickled between processes.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, lookahead: int) -> Iterator[tuple[T, R | BaseException]]:
    """(item, result or the exception it raised), in input order, with at most `lookahead` pending."""
    lookahead = max(1, lookahead)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="loratrain-load") as pool:
        pending: deque[tuple[T, Future]] = deque()
        it = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < lookahead:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append((item, pool.submit(fn, item)))
                if not pending:
                    return
                item, fut = pending.popleft()
                try:
                    yield item, fut.result()
                except Exception as e:  # handed to the caller, which names the file
                    yield item, e
        finally:
            for _, fut in pending:
                fut.cancel()
