"""RateLimitPolicy at the waypoint: which limits apply to a request, and whether it may pass.

A policy attaches to Services (every request to the Service through this waypoint) or to
HTTPRoutes/GRPCRoutes (the requests that route matched), in its own namespace. Each of its
limits is a token bucket of `burst` tokens (default: `requests`) refilled at `requests` per
`per`, one bucket per key value: the client's identity (SourceIdentity), a header's value
(Header; requests without the header share one bucket, so leaving it out is no way around the
limit), or one for the target (Target). A Local bucket lives in this waypoint; a Global one in
the shared store (`ratelimit_store.py`), shared by every replica.

Every limit that applies must allow a request. Local limits are taken first, all or nothing
(a denied request takes no token from the others); the Global ones then in one atomic step in
the store, and when they deny, the local tokens are given back. A denied request gets 429 with
`retry-after` (whole seconds, rounded up, when the limit that denied it has a token again).
When the store cannot answer, the policy's `failureMode` decides: Open lets the request pass,
Closed answers 503 (flag RLSE). Any Closed policy among those that apply makes it Closed.

The decision core here is pure: buckets take an explicit clock reading, the index is built
once per configuration change, and a request to a target without policies costs two dict
misses (see docs/decisions/0008).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshway.config.model import RateLimit, RateLimitPolicy
    from meshway.waypoint.messages import Request

# Buckets kept per limit and target before the least recently used ones are dropped. A
# dropped bucket starts full when its key comes back, so only a client among more than this
# many active ones at once can get more than its share.
MAX_KEYS = 10_000
# A key value (a header's) longer than this is hashed for the bucket's name.
MAX_KEY_LENGTH = 64

LOCAL_BODY = "local_rate_limited"
GLOBAL_BODY = "rate_limited"
STORE_DOWN_BODY = "rate limit store unavailable"


class StoreUnavailable(Exception):
    """The shared store did not answer (in time); the policies' failure mode decides."""


class GlobalStore(Protocol):
    async def take(self, buckets: Sequence[tuple[str, float, int]]) -> float:
        """Take one token from each bucket `(key, rate per second, capacity)`, all or none:
        0.0 when taken, else the seconds until all of them have a token again."""
        ...


# --------------------------------------------------------------------------- buckets


@dataclass(slots=True)
class TokenBucket:
    tokens: float
    stamp: float

    def refill(self, now: float, rate: float, capacity: int) -> float:
        """Tokens now, after adding what `rate` brought since the last reading."""
        if now > self.stamp:
            self.tokens = min(capacity, self.tokens + (now - self.stamp) * rate)
            self.stamp = now
        return self.tokens


class LocalBuckets:
    """The buckets of one limit on one target, by key value, at most `max_keys` of them."""

    __slots__ = ("_buckets", "capacity", "max_keys", "rate")

    def __init__(self, rate: float, capacity: int, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.capacity = capacity
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is there."""
        buckets = self._buckets
        bucket = buckets.pop(key, None)  # re-inserted below: the dict's order is recency
        if bucket is None:
            bucket = TokenBucket(float(self.capacity), now)
            if len(buckets) >= self.max_keys:
                self._evict(now)
        buckets[key] = bucket
        tokens = bucket.tokens  # `refill`, inlined: this runs for every request and limit
        if now > bucket.stamp:
            tokens = min(self.capacity, tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return 0.0
        bucket.tokens = tokens
        return (1.0 - tokens) / self.rate

    def give_back(self, key: str) -> None:
        """Return the token `take` took (another limit denied the request)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(float(self.capacity), bucket.tokens + 1.0)

    def _evict(self, now: float) -> None:
        """Drop full buckets (a full bucket is the same as none), then the least recently
        used, down to 7/8 of the cap so that eviction is not paid per request."""
        target = self.max_keys - max(1, self.max_keys // 8)
        full = [
            k
            for k, b in self._buckets.items()
            if b.refill(now, self.rate, self.capacity) >= self.capacity
        ]
        for k in full:
            del self._buckets[k]
        excess = len(self._buckets) - target
        if excess > 0:
            for k in list(self._buckets)[:excess]:
                del self._buckets[k]


# --------------------------------------------------------------------------- compiled limits


@dataclass(slots=True, eq=False)
class AppliedLimit:
    """One limit of one policy on one target, ready for requests."""

    policy: str  # namespace/name
    name: str
    target: str  # "Service shop/web", "HTTPRoute shop/r"
    scope: str  # Local | Global
    key_type: str  # Target | SourceIdentity | Header
    header: str | None
    rate: float
    capacity: int
    fail_closed: bool
    buckets: LocalBuckets | None = None
    # The bucket's identity across config changes (same limit, same buckets) and in Redis.
    ident: tuple[object, ...] = field(default=())

    def key(self, identity: str, request: Request) -> str:
        """The bucket's key value for `request`."""
        if self.key_type == "SourceIdentity":
            return identity
        if self.key_type == "Header":
            assert self.header is not None
            value = request.header(self.header) or ""
            if len(value) > MAX_KEY_LENGTH:
                return "#" + hashlib.blake2b(value.encode(), digest_size=12).hexdigest()
            return value
        return ""

    def store_key(self, key: str) -> str:
        """The key of the Global bucket in the store."""
        return f"meshway:rl:{self.policy}/{self.name}|{self.target}|{key}"


def _applied(
    policy: RateLimitPolicy,
    limit: RateLimit,
    target: str,
    previous: dict[tuple[object, ...], AppliedLimit],
) -> AppliedLimit:
    ns = policy.metadata.namespace or "default"
    header = limit.key.name.lower() if limit.key.name is not None else None
    rate = limit.rate
    ident = (
        f"{ns}/{policy.metadata.name}",
        limit.name,
        target,
        limit.scope,
        limit.key.type,
        header,
        rate,
        limit.capacity,
    )
    buckets = None
    if limit.scope == "Local":
        # The same limit keeps its buckets through a configuration change.
        old = previous.get(ident)
        buckets = old.buckets if old is not None else None
        if buckets is None:
            buckets = LocalBuckets(rate, limit.capacity)
    return AppliedLimit(
        policy=f"{ns}/{policy.metadata.name}",
        name=limit.name,
        target=target,
        scope=limit.scope,
        key_type=limit.key.type,
        header=header,
        rate=rate,
        capacity=limit.capacity,
        fail_closed=policy.spec.failure_mode == "Closed",
        buckets=buckets,
        ident=ident,
    )


class RateLimitIndex:
    """The limits of every RateLimitPolicy by the Service or route they target; immutable
    once built."""

    __slots__ = ("_by_route", "_by_service", "_idents", "global_namespaces")

    def __init__(self) -> None:
        self._by_service: dict[tuple[str, str], tuple[AppliedLimit, ...]] = {}
        self._by_route: dict[tuple[str, str], tuple[AppliedLimit, ...]] = {}
        self._idents: dict[tuple[object, ...], AppliedLimit] = {}
        # The namespaces of the policies with a Global limit (a waypoint needs the store
        # only when one of them is a namespace it serves).
        self.global_namespaces: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls, policies: Iterable[RateLimitPolicy], previous: RateLimitIndex | None = None
    ) -> RateLimitIndex:
        index = cls()
        old = previous._idents if previous is not None else {}
        by_service: dict[tuple[str, str], list[AppliedLimit]] = {}
        by_route: dict[tuple[str, str], list[AppliedLimit]] = {}
        ordered = sorted(
            policies,
            key=lambda p: (
                p.metadata.creation_timestamp or "",
                p.metadata.namespace or "",
                p.metadata.name,
            ),
        )
        for policy in ordered:
            ns = policy.metadata.namespace or "default"
            for ref in policy.spec.target_refs:
                target = f"{ref.kind} {ns}/{ref.name}"
                if ref.kind == "Service":
                    slot = by_service.setdefault((ns, ref.name), [])
                else:  # routes are known by kind and "namespace/name" (RouteMatch.route)
                    slot = by_route.setdefault((ref.kind, f"{ns}/{ref.name}"), [])
                for limit in policy.spec.limits:
                    applied = _applied(policy, limit, target, old)
                    index._idents[applied.ident] = applied
                    if applied.scope == "Global":
                        index.global_namespaces |= {ns}
                    slot.append(applied)
        index._by_service = {k: tuple(v) for k, v in by_service.items()}
        index._by_route = {k: tuple(v) for k, v in by_route.items()}
        return index

    @property
    def empty(self) -> bool:
        return not self._by_service and not self._by_route

    def lookup(
        self, namespace: str, service: str, route_kind: str | None, route: str | None
    ) -> tuple[AppliedLimit, ...]:
        """The limits for a request to Service `namespace/service` that matched `route`
        ("namespace/name" of kind `route_kind`, or None): the Service's, then the route's."""
        found = self._by_service.get((namespace, service), ())
        if route is not None and route_kind is not None:
            on_route = self._by_route.get((route_kind, route))
            if on_route:
                found = found + on_route if found else on_route
        return found


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request may not pass, and how to answer it."""

    status: int  # 429, or 503 when the store is down and a policy fails closed
    flags: str  # RL | RLSE
    body: str
    retry_after: int  # whole seconds
    limit: AppliedLimit | None
    details: str


@dataclass(slots=True)
class StoreFailure:
    """Set when the store failed for a request that the failure mode then let through."""

    reason: str


class RateLimiter:
    """Takes tokens for a request from every limit that applies (see the module's docstring).

    `store` is the Global limits' store, or None when the waypoint has none configured: then
    every Global limit takes its policy's failure mode.
    """

    def __init__(
        self,
        store: GlobalStore | None,
        clock: Callable[[], float] = time.monotonic,
        store_retry_after: float = 1.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.store_retry_after = store_retry_after

    async def check(
        self, limits: Sequence[AppliedLimit], identity: str, request: Request
    ) -> Denial | StoreFailure | None:
        """None (or a StoreFailure when the failure mode let it pass) for a request that may
        pass; a Denial otherwise."""
        denial, taken, remote = self.take_local(limits, identity, request)
        if denial is not None or not remote:
            return denial
        return await self.take_global(taken, remote)

    def take_local(
        self, limits: Sequence[AppliedLimit], identity: str, request: Request
    ) -> tuple[Denial | None, list[tuple[LocalBuckets, str]], list[tuple[AppliedLimit, str]]]:
        """The Local limits' part of `check`, without awaiting anything: a Denial, or the
        tokens taken (given back if a Global limit then denies) and the Global limits left."""
        now = self.clock()
        taken: list[tuple[LocalBuckets, str]] = []
        remote: list[tuple[AppliedLimit, str]] = []
        for limit in limits:
            key = limit.key(identity, request)
            buckets = limit.buckets
            if buckets is None:
                remote.append((limit, key))
                continue
            wait = buckets.take(key, now)
            if wait > 0.0:
                _give_back(taken)
                return _denied(limit, wait, LOCAL_BODY), [], []
            taken.append((buckets, key))
        return None, taken, remote

    async def take_global(
        self, taken: list[tuple[LocalBuckets, str]], remote: list[tuple[AppliedLimit, str]]
    ) -> Denial | StoreFailure | None:
        """The Global limits' part of `check`: one call to the store for all of them."""
        try:
            if self.store is None:
                raise StoreUnavailable("no rate limit store configured")
            wait = await self.store.take(
                [(limit.store_key(key), limit.rate, limit.capacity) for limit, key in remote]
            )
        except StoreUnavailable as exc:
            if any(limit.fail_closed for limit, _ in remote):
                _give_back(taken)
                return Denial(
                    503,
                    "RLSE",
                    STORE_DOWN_BODY,
                    max(1, math.ceil(self.store_retry_after)),
                    None,
                    f"rate_limit_store_unavailable: {exc}",
                )
            return StoreFailure(str(exc))
        if wait > 0.0:
            _give_back(taken)
            # The store answers for all Global limits at once; name the first.
            return _denied(remote[0][0], wait, GLOBAL_BODY)
        return None


def _give_back(taken: list[tuple[LocalBuckets, str]]) -> None:
    for buckets, key in taken:
        buckets.give_back(key)


def _denied(limit: AppliedLimit, wait: float, body: str) -> Denial:
    return Denial(
        429,
        "RL",
        body,
        max(1, math.ceil(wait - 1e-9)),
        limit,
        f"rate_limited: {limit.policy}/{limit.name} on {limit.target}",
    )
