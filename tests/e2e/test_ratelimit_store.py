"""The Global rate limits' store against a real redis-server (started here on a free loopback
port, in a temporary directory, stopped afterwards): two limiters sharing it hold the rate
together, and a store that dies takes the failure mode at once, then limits again when back.

No root needed; skipped where redis-server is not installed (`make setup` installs it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshway.config.loader import parse_documents
from meshway.config.model import RateLimitPolicy
from meshway.runtime.ratelimitstore import RedisServer
from meshway.waypoint.messages import Request
from meshway.waypoint.ratelimit import (
    AppliedLimit,
    Denial,
    RateLimiter,
    RateLimitIndex,
    StoreFailure,
    StoreUnavailable,
)
from meshway.waypoint.ratelimit_store import RedisStore

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not RedisServer.installed(), reason="redis-server is not installed"),
]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def global_limits(
    requests: int, burst: int, failure_mode: str = "Open"
) -> tuple[AppliedLimit, ...]:
    (policy,) = parse_documents(
        "apiVersion: meshway.io/v1alpha1\nkind: RateLimitPolicy\n"
        "metadata: {name: g, namespace: shop}\n"
        "spec:\n  targetRefs: [{kind: Service, name: web}]\n"
        f"  limits: [{{name: all, requests: {requests}, burst: {burst}, scope: Global}}]\n"
        f"  failureMode: {failure_mode}\n",
        "t.yaml",
    )
    assert isinstance(policy, RateLimitPolicy)
    return RateLimitIndex.build([policy]).lookup("shop", "web", None, None)


REQUEST = Request("GET", "/", "web.shop")


async def test_two_limiters_sharing_one_store_admit_the_configured_rate(
    redis_server: RedisServer,
) -> None:
    rate, burst, duration = 200, 50, 3.0
    limits = global_limits(rate, burst)
    stores = [RedisStore(redis_server.url, timeout=0.5), RedisStore(redis_server.url, timeout=0.5)]
    limiters = [RateLimiter(s) for s in stores]
    admitted = denied = failed = 0
    started = time.monotonic()
    deadline = started + duration

    async def client(limiter: RateLimiter) -> None:
        nonlocal admitted, denied, failed
        for _ in range(50_000):  # bounded in count as well as in time
            if time.monotonic() >= deadline:
                return
            verdict = await limiter.check(limits, "id", REQUEST)
            if verdict is None:
                admitted += 1
            elif isinstance(verdict, Denial):
                denied += 1
            else:
                failed += 1

    try:
        await asyncio.gather(*(client(limiters[i % 2]) for i in range(8)))
    finally:
        for s in stores:
            await s.close()
    elapsed = time.monotonic() - started
    expected = burst + rate * elapsed
    print(f"admitted {admitted} of {admitted + denied} in {elapsed:.2f}s, expected {expected:.0f}")
    assert failed == 0
    assert denied > admitted  # they did send faster than the limit
    assert abs(admitted - expected) <= 0.10 * expected


async def test_a_dead_store_takes_the_failure_mode_at_once_and_limits_again_when_back(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, timeout=0.05, backoff=0.5)
    open_limits = global_limits(5, 5, "Open")
    closed_limits = global_limits(5, 5, "Closed")
    limiter = RateLimiter(store)
    try:
        verdicts = [await limiter.check(open_limits, "id", REQUEST) for _ in range(6)]
        assert verdicts[:5] == [None] * 5 and isinstance(verdicts[5], Denial)
        redis_server.stop()
        started = time.monotonic()
        opened = [await limiter.check(open_limits, "id", REQUEST) for _ in range(100)]
        closed = [await limiter.check(closed_limits, "id", REQUEST) for _ in range(100)]
        took = time.monotonic() - started
        assert all(isinstance(v, StoreFailure) for v in opened)  # Open: let through
        assert all(isinstance(v, Denial) and v.status == 503 and v.flags == "RLSE" for v in closed)
        # Never stalled: one failed call, then the back-off answers without asking the store
        # (a bound on behaviour, far above the 50 ms timeout, not a performance figure).
        assert took < 2.0
        assert not store.available
        with pytest.raises(StoreUnavailable):
            await store.take([("k", 1.0, 1)])
        # Back on the same port: after the back-off the store is asked again and limits.
        redis_server.start()  # the same port (the fixture stops it again)

        async def back() -> bool:
            await asyncio.sleep(0.1)
            return await limiter.check(open_limits, "id", REQUEST) is None and store.available

        for _ in range(50):
            if await back():
                break
        assert store.available
        after = [await limiter.check(open_limits, "id", REQUEST) for _ in range(10)]
        assert any(isinstance(v, Denial) and v.status == 429 for v in after)
        assert not any(isinstance(v, StoreFailure) for v in after)
    finally:
        await store.close()


async def test_a_store_that_answers_garbage_is_a_failed_store() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xff")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    limiter = RateLimiter(store)
    try:
        verdict = await limiter.check(global_limits(5, 5, "Closed"), "id", REQUEST)
        assert isinstance(verdict, Denial) and verdict.flags == "RLSE"
        assert not store.available and store.last_error
    finally:
        await store.close()
        server.close()
        await server.wait_closed()
