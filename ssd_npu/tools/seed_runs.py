"""Whole training runs for scripts/converge.py: several at once, and when to stop adding seeds.

`RunPool(jobs, threads)` trains configs with `ssd_npu.train.run`, `jobs` at a time, each in
its own process (spawn: a fresh interpreter, no state inherited from the parent), with
`threads` torch threads per run. jobs=1 trains in this process, as converge.py always did.
A run's numbers depend on its config and its thread count only (the data's randomness is
seeded per sample, whatever the loader's workers: ssd_npu/data/loader.py; the CPU kernels'
float rounding follows the thread count), so runs at the same `threads` give the same numbers
whether trained one at a time or side by side.

`stop_reason` is the sequential rule: after each completed seed pair, the paired difference's
95% interval is computed; the comparison stops when its half-width is at most the target
(after at least `min_seeds` seeds) or when `max_seeds` seeds are done.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from itertools import count
from time import perf_counter
from typing import Any

StopReason = str  # "target" | "max_seeds" | "seeds" (the listed seeds done, no target set)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def per_run_threads(jobs: int, threads: int | None) -> int:
    """Torch threads per run: `threads` if given, else the cores split between the runs."""
    return threads if threads is not None else max(1, cores() // jobs)


def per_run_workers(num_workers: int, jobs: int) -> int:
    """DataLoader workers per run: `num_workers` split between the runs (0 stays 0)."""
    return 0 if num_workers == 0 else max(1, num_workers // jobs)


def timed_run(cfg: Any, threads: int) -> tuple[dict[str, Any], float]:
    """Train `cfg` (a train.py config) with `threads` torch threads: (its summary, wall s)."""
    import torch

    from ssd_npu.train import run

    torch.set_num_threads(threads)
    start = perf_counter()
    summary = run(cfg)
    return summary, perf_counter() - start


class _Inline(Executor):
    """An executor that runs each call at once, in this process (jobs=1)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to whoever reads the result, as a pool would
            future.set_exception(err)
        return future


@contextmanager
def run_pool(jobs: int) -> Iterator[Executor]:
    """`jobs` worker processes (spawned), or this process for jobs=1. On leaving, runs not
    started are cancelled and running ones waited for."""
    if jobs == 1:
        yield _Inline()
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def seed_sequence(listed: list[int], target: float | None, max_seeds: int) -> list[int]:
    """The seeds to run, in order: the listed ones; with a target, continued past the largest
    listed seed (+1, +2, ...) up to `max_seeds` in all."""
    if target is None:
        return list(listed)
    extra = (s for s in count(max(listed) + 1) if s not in listed)
    seeds = list(listed[:max_seeds])
    while len(seeds) < max_seeds:
        seeds.append(next(extra))
    return seeds


def halfwidth(interval: list[float]) -> float:
    """Half the width of a [low, high] interval."""
    return (interval[1] - interval[0]) / 2.0


def stop_reason(
    diffs: list[float],
    ci: Callable[[list[float]], list[float]],
    target: float | None,
    min_seeds: int,
    max_seeds: int,
    listed: int,
) -> StopReason | None:
    """Whether to stop after these paired differences (one per completed seed, in order).

    "target": the half-width of `ci(diffs)` <= target, with at least `min_seeds` seeds;
    "max_seeds": `max_seeds` seeds done (with a target); "seeds": no target and the `listed`
    seeds done; None: go on.
    """
    n = len(diffs)
    if target is None:
        return "seeds" if n >= listed else None
    if n >= min_seeds and halfwidth(ci(diffs)) <= target:
        return "target"
    return "max_seeds" if n >= max_seeds else None
