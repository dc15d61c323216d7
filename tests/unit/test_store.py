"""SqliteStore: revisions, atomic batches, ordered watches, persistence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshway.config.model import Namespace, ObjectKey, Service
from meshway.config.store import (
    ApplyOutcome,
    EventType,
    ResourceVersionTooOld,
    SqliteStore,
    WatchEvent,
)

pytestmark = pytest.mark.unit


def ns(name: str, **labels: str) -> Namespace:
    return Namespace.model_validate(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    )


def svc(name: str, port: int = 80, namespace: str = "default") -> Service:
    return Service.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name}, "ports": [{"port": port}]},
        }
    )


def test_revisions_and_outcomes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    assert store.revision == 0
    results = store.apply([ns("a"), ns("b")])
    assert [r.outcome for r in results] == [ApplyOutcome.CREATED, ApplyOutcome.CREATED]
    assert [r.object.metadata.resource_version for r in results] == ["1", "2"]
    assert store.revision == 2
    uid = results[0].object.metadata.uid
    assert uid and results[0].object.metadata.generation == 1

    again = store.apply([ns("a"), ns("b", team="x")])
    assert [r.outcome for r in again] == [ApplyOutcome.UNCHANGED, ApplyOutcome.CONFIGURED]
    assert again[0].object.metadata.resource_version == "1"  # unchanged keeps its revision
    assert again[1].object.metadata.resource_version == "3"
    assert store.revision == 3
    assert store.get(ObjectKey("Namespace", "", "a")).metadata.uid == uid  # type: ignore[union-attr]


def test_generation_counts_spec_changes_only(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.apply([svc("web")])
    labelled = svc("web")
    labelled.metadata.labels["x"] = "y"
    (r,) = store.apply([labelled])
    assert r.outcome is ApplyOutcome.CONFIGURED and r.object.metadata.generation == 1
    (r,) = store.apply([svc("web", port=8080)])
    assert r.object.metadata.generation == 2


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    (r,) = store.apply([ns("a")], dry_run=True)
    assert r.outcome is ApplyOutcome.CREATED
    assert store.revision == 0 and store.get(ObjectKey("Namespace", "", "a")) is None


def test_persistence_across_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.apply([ns("a"), svc("web")])
    store.delete([ObjectKey("Namespace", "", "a")])
    before = {o.key: o.to_dict() for o in store.list()}
    store.close()

    reopened = SqliteStore(tmp_path / "s.db")
    assert reopened.revision == 3
    assert {o.key: o.to_dict() for o in reopened.list()} == before
    # The event log survives too: a watcher can resume from an old revision.
    assert [e.revision for e in reopened.events_since(0)] == [1, 2, 3]
    (r,) = reopened.apply([ns("c")])
    assert r.object.metadata.resource_version == "4"


async def test_watch_delivers_ordered_events_then_live_ones(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.apply([ns("a"), svc("web")])
    seen: list[WatchEvent] = []

    async def consume() -> None:
        async for event in store.watch(1):
            seen.append(event)
            if len(seen) == 5:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    store.apply([svc("web", port=81)])
    store.delete([ObjectKey("Service", "default", "web")])
    store.apply([ns("z"), ns("a", changed="yes")])
    await asyncio.wait_for(task, 5)
    assert [(e.type, e.object.metadata.name, e.revision) for e in seen] == [
        (EventType.ADDED, "web", 2),
        (EventType.MODIFIED, "web", 3),
        (EventType.DELETED, "web", 4),
        (EventType.ADDED, "z", 5),
        (EventType.MODIFIED, "a", 6),
    ]


def test_watch_from_compacted_revision_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", event_log_size=3)
    for i in range(6):
        store.apply([ns(f"n{i}")])
    assert [e.revision for e in store.events_since(3)] == [4, 5, 6]
    with pytest.raises(ResourceVersionTooOld):
        store.events_since(1)
    store.close()
    # The limit holds after a restart as well.
    reopened = SqliteStore(tmp_path / "s.db", event_log_size=3)
    with pytest.raises(ResourceVersionTooOld):
        reopened.events_since(2)
    assert [e.revision for e in reopened.events_since(3)] == [4, 5, 6]


def test_failed_commit_leaves_memory_and_disk_unchanged(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.apply([ns("a")])
    store._db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON events WHEN NEW.revision = 3 "
        "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
    )
    with pytest.raises(Exception, match="disk trouble"):
        store.apply([ns("b"), ns("c")])
    assert store.revision == 1
    assert [o.metadata.name for o in store.list()] == ["a"]
    store.close()
    assert [o.metadata.name for o in SqliteStore(tmp_path / "s.db").list()] == ["a"]
