"""The delta ADS server and client over a real gRPC connection on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshway.api.v1 import address_pb2
from meshway.xds.client import ResourceType, Update, XdsClient
from meshway.xds.server import AggregatedDiscoveryService, CachedResource, Change, ResourceCache

pytestmark = pytest.mark.unit

ADDRESS = "type.googleapis.com/meshway.api.v1.Address"


def workload(name: str, node: str = "n1") -> CachedResource:
    msg = address_pb2.Address(workload=address_pb2.Workload(uid=f"ns/{name}", name=name, node=node))
    version = str(abs(hash(msg.SerializeToString(deterministic=True))))
    return CachedResource.build(f"ns/{name}", version, msg, ADDRESS)


class Harness:
    def __init__(self, cache: ResourceCache, server: grpc.aio.Server, port: int) -> None:
        self.cache = cache
        self.server = server
        self.port = port
        self.service: AggregatedDiscoveryService

    def client(self, validators: tuple = ()) -> XdsClient:
        return XdsClient(
            f"127.0.0.1:{self.port}",
            "n1",
            [ResourceType(ADDRESS, address_pb2.Address, validators)],
        )

    def push(
        self, version: str, updated: list[CachedResource] = (), removed: set[str] = ()
    ) -> None:  # type: ignore[assignment]
        self.cache.apply([Change(ADDRESS, {r.name: r for r in updated}, set(removed), version)])


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    cache = ResourceCache([ADDRESS])

    async def authenticate(context: grpc.aio.ServicerContext) -> str:
        return "n1"

    service = AggregatedDiscoveryService(cache, authenticate)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    h = Harness(cache, server, port)
    h.service = service
    h.push("1", [workload("a"), workload("b")])
    cache.ready.set()
    try:
        yield h
    finally:
        await server.stop(grace=None)


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def proxy_state(h: Harness) -> dict:
    (proxy,) = h.service.syncz()
    return proxy["types"][ADDRESS]


async def test_full_state_then_only_the_changed_resource(harness: Harness) -> None:
    client = harness.client()
    updates: list[Update] = []
    client.subscribe(updates.append)
    client.start()
    try:
        await client.wait_synced(5)
        assert set(client.snapshot(ADDRESS)) == {"ns/a", "ns/b"}
        assert len(updates) == 1 and set(updates[0].updated) == {"ns/a", "ns/b"}
        await wait_for(lambda: proxy_state(harness)["status"] == "SYNCED")

        harness.push("2", [workload("a", node="n2")])
        await wait_for(lambda: len(updates) == 2)
        assert set(updates[1].updated) == {"ns/a"}  # only the change, not the world
        assert client.snapshot(ADDRESS)["ns/a"].workload.node == "n2"
        assert client.version(ADDRESS) == "2"

        harness.push("3", removed={"ns/b"})
        await wait_for(lambda: len(updates) == 3)
        assert updates[2].removed == {"ns/b"} and not updates[2].updated
        assert set(client.snapshot(ADDRESS)) == {"ns/a"}
        await wait_for(lambda: proxy_state(harness)["acked_version"] == "3")
        assert proxy_state(harness)["status"] == "SYNCED"
    finally:
        await client.close()


async def test_nack_keeps_last_good_state_and_is_reported(harness: Harness) -> None:
    def reject_node_bad(name: str, msg: address_pb2.Address) -> None:
        if msg.workload.node == "bad":
            raise ValueError("node 'bad' is not supported")

    client = harness.client((reject_node_bad,))
    client.start()
    try:
        await client.wait_synced(5)
        harness.push("2", [workload("a", node="bad"), workload("c")])
        await wait_for(lambda: proxy_state(harness)["status"] == "NACKED")
        state = proxy_state(harness)
        assert "node 'bad' is not supported" in state["error"]
        assert state["nacked_version"] == "2"
        # The bad resource keeps its last good version; the good one in the same response lands.
        assert client.snapshot(ADDRESS)["ns/a"].workload.node == "n1"
        assert "ns/c" in client.snapshot(ADDRESS)
        assert client.nacks == 1

        harness.push("3", [workload("a", node="n3")])
        await wait_for(lambda: proxy_state(harness)["status"] == "SYNCED")
        assert client.snapshot(ADDRESS)["ns/a"].workload.node == "n3"
        assert proxy_state(harness)["error"] is None
    finally:
        await client.close()


async def test_reconnect_gets_full_state_and_removals(harness: Harness) -> None:
    client = harness.client()
    client.start()
    try:
        await client.wait_synced(5)
        assert set(client.snapshot(ADDRESS)) == {"ns/a", "ns/b"}
    finally:
        await client.close()
    # While the client is away: b goes, c comes, a changes.
    harness.push("2", [workload("a", node="n9"), workload("c")], removed={"ns/b"})
    client._task = None
    client.start()
    try:
        await wait_for(lambda: set(client.snapshot(ADDRESS)) == {"ns/a", "ns/c"})
        assert client.snapshot(ADDRESS)["ns/a"].workload.node == "n9"
    finally:
        await client.close()


async def test_named_subscription_receives_only_its_names(harness: Harness) -> None:
    client = XdsClient(
        f"127.0.0.1:{harness.port}",
        "n1",
        [ResourceType(ADDRESS, address_pb2.Address)],
        subscriptions={ADDRESS: ["ns/b", "ns/missing"]},
    )
    client.start()
    try:
        await client.wait_synced(5)
        assert set(client.snapshot(ADDRESS)) == {"ns/b"}
        harness.push("2", [workload("a", node="x"), workload("z")])
        harness.push("3", [workload("b", node="y")])
        await wait_for(lambda: client.snapshot(ADDRESS)["ns/b"].workload.node == "y")
        assert set(client.snapshot(ADDRESS)) == {"ns/b"}
    finally:
        await client.close()


async def test_state_of_the_world_is_refused_clearly(harness: Harness) -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{harness.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

        async def one() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(type_url=ADDRESS)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.StreamAggregatedResources(one()):
                pass
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "DeltaAggregatedResources" in (info.value.details() or "")


async def test_an_empty_type_still_gets_a_first_response(harness: Harness) -> None:
    client = harness.client()
    harness.push("2", removed={"ns/a", "ns/b"})
    client.start()
    try:
        await client.wait_synced(5)  # would time out without an (empty) first response
        assert not client.snapshot(ADDRESS)
        assert client.version(ADDRESS) == "2"
    finally:
        await client.close()
