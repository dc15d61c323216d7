"""The Global rate limits' shared store: token buckets in Redis, taken by an atomic Lua script.

Every waypoint replica runs the same script against the same Redis, so a bucket is shared
exactly: the script reads each bucket, refills it by the time passed on the *store's* clock
(`TIME`, so replicas' clocks need not agree), and takes one token from every bucket only when
each has one. A bucket's key expires once it would be full again (an absent key is a full
bucket), so idle keys cost nothing.

A dead or slow store must not stall requests: each call has a short timeout (tens of
milliseconds), and after a failure the store is not asked again for `backoff` seconds (the
requests meanwhile take their failure mode at once); then one request probes it while the
others keep the failure mode, and the first success closes the circuit again. redis-py
reconnects by itself.

redis-py is imported on the first Global check, not before: importing it costs a waypoint
about 24 MiB (it loads OpenTelemetry's metrics SDK when that is installed), and most
waypoints never check a Global limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from meshway.waypoint.ratelimit import StoreUnavailable

log = logging.getLogger(__name__)

# KEYS: the buckets. ARGV: rate (tokens per second) and capacity for each, in KEYS' order.
# Returns {1, "0"} when a token was taken from every bucket, else {0, seconds to wait}.
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local tokens = {}
local wait = 0
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'stamp')
  local have = tonumber(state[1])
  local stamp = tonumber(state[2])
  if have == nil or stamp == nil then
    have = capacity
  elseif now > stamp then
    have = math.min(capacity, have + (now - stamp) * rate)
  end
  tokens[i] = have
  if have < 1 then
    wait = math.max(wait, (1 - have) / rate)
  end
end
if wait > 0 then
  return {0, string.format('%.6f', wait)}
end
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local left = tokens[i] - 1
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.6f', left),
             'stamp', string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((capacity - left) / rate * 1000) + 1000)
end
return {1, '0'}
"""

STORE_SCHEMES = ("redis", "rediss", "unix")


def store_url_error(url: str) -> str | None:
    """What is wrong with a store URL (checked without importing redis-py), or None."""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as exc:
        return str(exc)
    if parsed.scheme not in STORE_SCHEMES:
        return f"the scheme must be one of {', '.join(STORE_SCHEMES)}, not {parsed.scheme!r}"
    if parsed.scheme == "unix":
        return None if parsed.path else "a unix:// URL needs the socket's path"
    if not parsed.hostname:
        return "the URL needs a host, e.g. redis://127.0.0.1:6379"
    if port == 0:
        return "port 0 is not a port"
    return None


DEFAULT_TIMEOUT = 0.05
DEFAULT_BACKOFF = 1.0
MAX_CONNECTIONS = 32


class RedisStore:
    """`GlobalStore` on one Redis server (a `redis://host:port/db` or `unix://path` URL)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.backoff = backoff
        self._clock = clock
        if error := store_url_error(url):
            raise ValueError(error)
        self._redis: Any = None  # made on the first `take`
        self._script: Any = None
        self._errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        # The circuit: closed while `_down_until` is 0; open until then; half-open (one
        # probe in flight) while `_probing`.
        self._down_until = 0.0
        self._probing = False
        self.last_error = ""

    @property
    def available(self) -> bool:
        return self._down_until == 0.0

    async def take(self, buckets: Sequence[tuple[str, float, int]]) -> float:
        probe = False
        if self._down_until:
            if self._probing or self._clock() < self._down_until:
                raise StoreUnavailable(f"store unavailable ({self.last_error})")
            self._probing = probe = True
        if self._redis is None:
            self._connect()
        keys = [key for key, _, _ in buckets]
        args: list[str] = []
        for _, rate, capacity in buckets:
            args += [repr(rate), str(capacity)]
        try:
            async with asyncio.timeout(self.timeout * 2):
                allowed, wait = await self._script(keys=keys, args=args)
        except self._errors as exc:
            self._failed(exc)
            raise StoreUnavailable(self.last_error) from exc
        finally:
            if probe:
                self._probing = False
        if self._down_until:
            log.info("rate limit store %s is back", self.url)
            self._down_until = 0.0
        return 0.0 if int(allowed) == 1 else float(wait)

    def prepare(self) -> None:
        """Import redis-py and make the client now (no connection yet): called when a Global
        limit is configured, so that the first request it checks does not wait for the import
        (a few hundred milliseconds on a busy machine)."""
        if self._redis is None:
            self._connect()

    def _connect(self) -> None:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=MAX_CONNECTIONS,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(TAKE_SCRIPT)
        self._errors = (RedisError, OSError, TimeoutError)

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not self._down_until:
            log.warning("rate limit store %s failed: %s", self.url, self.last_error)
        self._down_until = self._clock() + self.backoff

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
