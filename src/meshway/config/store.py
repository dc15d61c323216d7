"""The configuration store: typed objects with resource versions and ordered watches.

`ConfigStore` is the interface the control plane programs against, so that a Kubernetes API
source can stand in for the embedded `SqliteStore` later. Semantics follow the Kubernetes API:
one cluster-wide revision counter, every write gets the next revision, a watch from revision R
delivers every event after R in order, and a watch from a revision older than the retained
event log fails with `ResourceVersionTooOld` (HTTP 410 Gone in Kubernetes) so the client
re-lists.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import enum
import json
import sqlite3
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meshway.config.model import KINDS, ObjectKey, Resource


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    object: Resource
    revision: int


class ApplyOutcome(enum.StrEnum):
    CREATED = "created"
    CONFIGURED = "configured"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcome: ApplyOutcome
    object: Resource


class StoreError(Exception):
    pass


class ResourceVersionTooOld(StoreError):
    """The requested revision is older than the retained event log: list again, then watch."""


class ConfigStore(abc.ABC):
    """What the control plane needs from a configuration source."""

    @property
    @abc.abstractmethod
    def revision(self) -> int: ...

    @abc.abstractmethod
    def get(self, key: ObjectKey) -> Resource | None: ...

    @abc.abstractmethod
    def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> builtins.list[Resource]: ...

    @abc.abstractmethod
    def apply(
        self, objects: Sequence[Resource], *, dry_run: bool = False
    ) -> builtins.list[ApplyResult]:
        """Create or update all objects atomically; unchanged objects keep their revision.

        With `dry_run`, report what would happen and change nothing."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[ObjectKey]) -> builtins.list[Resource]:
        """Delete all keys atomically; returns the deleted objects (missing keys are skipped)."""

    @abc.abstractmethod
    def watch(self, since: int) -> AsyncIterator[WatchEvent]:
        """Every event with a revision greater than `since`, in order, then live events."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _content(obj: Resource) -> dict[str, object]:
    """What makes two versions of an object different for the user (not server metadata)."""
    data = obj.to_dict()
    meta = data.get("metadata", {})
    assert isinstance(meta, dict)
    for server_field in ("resourceVersion", "uid", "creationTimestamp", "generation"):
        meta.pop(server_field, None)
    return data


def _spec_of(obj: Resource) -> object:
    return _content(obj).get("spec")


def decode_object(body: str | bytes) -> Resource:
    data = json.loads(body)
    return KINDS[data["kind"]].model_validate(data)


class SqliteStore(ConfigStore):
    """The embedded store: objects in SQLite (WAL) with an in-memory index and event log.

    Reads are served from memory; each `apply`/`delete` is one SQLite transaction, so a batch is
    all-or-nothing on disk and in memory.
    """

    def __init__(self, path: Path, *, event_log_size: int = 50_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS objects (
                kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                revision INTEGER NOT NULL, body TEXT NOT NULL,
                PRIMARY KEY (kind, namespace, name));
            CREATE TABLE IF NOT EXISTS events (
                revision INTEGER PRIMARY KEY, type TEXT NOT NULL, body TEXT NOT NULL);
            """
        )
        self._event_log_size = event_log_size
        self._objects: dict[ObjectKey, Resource] = {}
        for (body,) in self._db.execute("SELECT body FROM objects"):
            obj = decode_object(body)
            self._objects[obj.key] = obj
        row = self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        self._revision = int(row[0]) if row else 0
        self._log: deque[WatchEvent] = deque(maxlen=event_log_size)
        for rev, etype, body in self._db.execute(
            "SELECT revision, type, body FROM events ORDER BY revision DESC LIMIT ?",
            (event_log_size,),
        ).fetchall()[::-1]:
            self._log.append(WatchEvent(EventType(etype), decode_object(body), rev))
        # The oldest revision a watch can start from without missing events.
        self._compacted = self._log[0].revision - 1 if self._log else self._revision
        self._wakeups: set[asyncio.Event] = set()

    # -- reads -------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    def get(self, key: ObjectKey) -> Resource | None:
        return self._objects.get(key)

    def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> builtins.list[Resource]:
        return [
            obj
            for key, obj in self._objects.items()
            if (kind is None or key.kind == kind)
            and (namespace is None or key.namespace == namespace)
        ]

    def __len__(self) -> int:
        return len(self._objects)

    # -- writes ------------------------------------------------------------------------------

    def apply(
        self, objects: Sequence[Resource], *, dry_run: bool = False
    ) -> builtins.list[ApplyResult]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        results: builtins.list[ApplyResult] = []
        events: builtins.list[WatchEvent] = []
        revision = self._revision
        for obj in objects:
            old = self._objects.get(obj.key)
            if old is not None and _content(old) == _content(obj):
                results.append(ApplyResult(ApplyOutcome.UNCHANGED, old))
                continue
            revision += 1
            if old is None:
                meta = obj.metadata.model_copy(
                    update={
                        "resource_version": str(revision),
                        "uid": str(uuid.uuid4()),
                        "creation_timestamp": now,
                        "generation": 1,
                    }
                )
                outcome, etype = ApplyOutcome.CREATED, EventType.ADDED
            else:
                generation = old.metadata.generation or 1
                if _spec_of(old) != _spec_of(obj):
                    generation += 1
                meta = obj.metadata.model_copy(
                    update={
                        "resource_version": str(revision),
                        "uid": old.metadata.uid,
                        "creation_timestamp": old.metadata.creation_timestamp,
                        "generation": generation,
                    }
                )
                outcome, etype = ApplyOutcome.CONFIGURED, EventType.MODIFIED
            stored = obj.model_copy(update={"metadata": meta})
            results.append(ApplyResult(outcome, stored))
            events.append(WatchEvent(etype, stored, revision))
        if not dry_run:
            self._commit(events)
        return results

    def delete(self, keys: Sequence[ObjectKey]) -> builtins.list[Resource]:
        revision = self._revision
        events: builtins.list[WatchEvent] = []
        for key in dict.fromkeys(keys):
            old = self._objects.get(key)
            if old is None:
                continue
            revision += 1
            events.append(WatchEvent(EventType.DELETED, old, revision))
        self._commit(events)
        return [e.object for e in events]

    def _commit(self, events: Sequence[WatchEvent]) -> None:
        if not events:
            return
        encoded = [(e, json.dumps(e.object.to_dict(), separators=(",", ":"))) for e in events]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for event, body in encoded:
                key = event.object.key
                if event.type is EventType.DELETED:
                    db.execute(
                        "DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
                        (key.kind, key.namespace, key.name),
                    )
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                        (key.kind, key.namespace, key.name, event.revision, body),
                    )
                db.execute(
                    "INSERT INTO events VALUES (?, ?, ?)", (event.revision, event.type, body)
                )
            last = events[-1].revision
            db.execute("INSERT OR REPLACE INTO meta VALUES ('revision', ?)", (str(last),))
            db.execute("DELETE FROM events WHERE revision <= ?", (last - self._event_log_size,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Only after the transaction is durable does memory change.
        for event in events:
            if event.type is EventType.DELETED:
                self._objects.pop(event.object.key, None)
            else:
                self._objects[event.object.key] = event.object
            if len(self._log) == self._log.maxlen:
                self._compacted = self._log[0].revision
            self._log.append(event)
        self._revision = events[-1].revision
        for wakeup in self._wakeups:
            wakeup.set()

    # -- watch -------------------------------------------------------------------------------

    def events_since(self, since: int) -> builtins.list[WatchEvent]:
        if since < self._compacted:
            raise ResourceVersionTooOld(
                f"revision {since} is older than the oldest retained event "
                f"({self._compacted + 1}); list again and watch from the list's revision"
            )
        newer: builtins.list[WatchEvent] = []
        for event in reversed(self._log):  # the usual caller wants only the tail
            if event.revision <= since:
                break
            newer.append(event)
        newer.reverse()
        return newer

    async def wait_past(self, revision: int, timeout: float) -> bool:
        """Wait until the store moves past `revision`; False if `timeout` passed first."""
        if self._revision > revision:
            return True
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        try:
            async with asyncio.timeout(timeout):
                while self._revision <= revision:
                    wakeup.clear()
                    await wakeup.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._wakeups.discard(wakeup)

    async def watch(self, since: int) -> AsyncIterator[WatchEvent]:
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        try:
            position = since
            while True:
                wakeup.clear()
                for event in self.events_since(position):
                    yield event
                    position = event.revision
                await wakeup.wait()
        finally:
            self._wakeups.discard(wakeup)

    # -- small persistent settings (CIDRs, node credentials) ---------------------------------

    def get_setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (f"setting:{key}",)).fetchone()
        return str(row[0]) if row else None

    def put_setting(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"setting:{key}", value))

    def settings(self, prefix: str) -> Iterable[tuple[str, str]]:
        full = f"setting:{prefix}"
        for key, value in self._db.execute(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?", (full, full + "\uffff")
        ):
            yield key[len("setting:") :], value

    def close(self) -> None:
        self._db.close()
