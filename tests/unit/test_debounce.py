"""The push loop's debounce: bursts become one batch; a trickle still flushes by max_wait.

The margins are wide (tens of milliseconds of scheduling against 200 ms windows) so the test
checks the grouping, not the clock.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from meshway.controlplane.server import debounce

pytestmark = pytest.mark.unit


async def feed(queue: asyncio.Queue[tuple[float, int]], items: list[int], gap: float) -> None:
    for item in items:
        queue.put_nowait((time.monotonic(), item))
        await asyncio.sleep(gap)


async def test_a_burst_is_one_batch() -> None:
    queue: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
    producer = asyncio.create_task(feed(queue, list(range(5)), 0.001))
    _, batch = await debounce(queue, quiet=0.2, max_wait=5.0)
    await producer
    assert batch == [0, 1, 2, 3, 4]


async def test_quiet_time_separates_batches() -> None:
    queue: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
    queue.put_nowait((time.monotonic(), 1))
    _, first = await debounce(queue, quiet=0.05, max_wait=5.0)
    queue.put_nowait((time.monotonic(), 2))
    _, second = await debounce(queue, quiet=0.05, max_wait=5.0)
    assert (first, second) == ([1], [2])


async def test_a_steady_trickle_is_flushed_by_max_wait() -> None:
    queue: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
    producer = asyncio.create_task(feed(queue, list(range(200)), 0.01))
    _, batch = await debounce(queue, quiet=0.5, max_wait=0.2)
    producer.cancel()
    # Every gap is shorter than `quiet`, so only max_wait ended the batch, long before the end.
    assert 3 <= len(batch) < 150
    assert batch == list(range(len(batch)))
