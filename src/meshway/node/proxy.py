"""`meshway node`: the node proxy.

One process per node. It reads the mesh from xDS (`ProxyState`), captures each enrolled pod
of its node from inside the pod's network namespace (`PodProxy`), and for every connection:

- outbound (15001): resolves the original destination (a Service VIP to an endpoint, round
  robin), then opens an HBONE stream (HTTP/2 CONNECT over mTLS with the *source* workload's
  certificate, checking the destination's identity) from the pod's own namespace, sends it to
  a waypoint when the destination uses one, or passes plain TCP through for destinations
  outside the mesh;
- inbound HBONE (15008): terminates mTLS with the pod's certificate, reads the client's
  SPIFFE identity, evaluates AuthorizationPolicy, and connects to the application from the
  client's own address, so the application sees the real peer;
- inbound plaintext (15006): accepted under PERMISSIVE, refused under STRICT, and subject to
  the same policies with no identity.

Open inbound connections are re-evaluated whenever policies change, and closed within a second
when they are no longer allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshway.api.v1 import address_pb2
from meshway.config.labels import LABEL_PROXY_MODE, PROXY_MODE_SIDECAR
from meshway.hbone import HboneConnectionPool, HboneRequest, HboneServer, HboneStream, relay, splice
from meshway.hbone.errors import HboneError, HboneRefused
from meshway.hbone.tls import WorkloadCredentials
from meshway.identity.caclient import CaClient
from meshway.identity.spiffe import SpiffeId
from meshway.node.certificates import CertificateManager, CertificateUnavailable
from meshway.node.inpod import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    NetnsError,
    PodNetns,
    original_destination,
)
from meshway.node.state import ProxyState, Upstream, ip_text, workload_identity
from meshway.node.waypoint_endpoints import WaypointEndpoints
from meshway.policy import Connection, PolicyIndex
from meshway.telemetry.metrics import NodeMetrics
from meshway.xds.client import Update, XdsClient
from meshway.xds.types import node_proxy_types

log = logging.getLogger(__name__)
conn_log = logging.getLogger("meshway.connections")


@dataclass
class NodeConfig:
    node: str
    xds_address: str
    token: str
    trust_bundle: bytes
    # Where each pod's network namespace is, from its Kubernetes-style namespace and name.
    pod_netns: Callable[[str, str], Path]
    cert_lifetime: timedelta | None = None
    root_namespace: str = "istio-system"
    # Sidecar mode: capture only this pod ("namespace/name").
    only_pod: str | None = None


@dataclass
class TrackedConnection:
    """An open inbound connection, kept so a policy change can close it."""

    pod: str
    conn: Connection
    close: Callable[[], object]
    started: float = field(default_factory=time.monotonic)


class NodeProxy:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state = ProxyState(config.node)
        self.waypoints = WaypointEndpoints(self.state)
        self.metrics = NodeMetrics()
        self.xds = XdsClient(
            config.xds_address,
            config.node,
            node_proxy_types(),
            token=config.token,
            root_certificates=config.trust_bundle,
        )
        self.ca = CaClient(config.xds_address, config.token, config.trust_bundle)
        self.certs = CertificateManager(self.ca, self.metrics, config.cert_lifetime)
        self.pods: dict[str, PodProxy] = {}
        self.policies = PolicyIndex({}, config.root_namespace)
        self.tracked: dict[int, TrackedConnection] = {}
        self._uncaptured: set[str] = set()
        self._ids = 0
        self._dirty = asyncio.Event()
        self.ready = asyncio.Event()
        self.xds.subscribe(self._on_update)

    def _on_update(self, update: Update) -> None:
        self.state.apply(update)
        self._dirty.set()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.xds.run())
            tg.create_task(self.certs.run())
            tg.create_task(self._reconcile_loop())

    async def _reconcile_loop(self) -> None:
        await self.xds.wait_synced(None)
        while True:
            self._dirty.clear()
            self.policies = PolicyIndex(self.state.policies, self.config.root_namespace)
            await self.reconcile()
            self.reevaluate()
            self.ready.set()
            await self._dirty.wait()

    async def reconcile(self) -> None:
        """Capture exactly the enrolled pods of this node; rebuild what a restart lost."""
        wanted = {wl.uid: wl for wl in self.state.local_workloads(self.config.only_pod)}
        self.certs.retain({workload_identity(wl) for wl in wanted.values()})
        for uid in [u for u in self.pods if u not in wanted]:
            await self.pods.pop(uid).stop(uncapture=True)
            self._uncaptured.add(uid)
        await self._uncapture_leftovers(wanted)
        for uid, wl in wanted.items():
            self._uncaptured.discard(uid)
            current = self.pods.get(uid)
            if current is not None and current.still_valid(wl):
                current.workload = wl
                continue
            if current is not None:
                await self.pods.pop(uid).stop(uncapture=False)
            path = self.config.pod_netns(wl.namespace, wl.name)
            try:
                fresh = PodProxy(self, wl, PodNetns(path))
                await fresh.start()
            except (NetnsError, OSError, CertificateUnavailable) as exc:
                log.warning("cannot capture pod %s yet: %s", uid, exc)
                asyncio.get_running_loop().call_later(1.0, self._dirty.set)
                continue
            self.pods[uid] = fresh
        self.metrics.enrolled.set(len(self.pods))

    async def _uncapture_leftovers(self, wanted: dict[str, address_pb2.Workload]) -> None:
        """Pods of this node that are no longer enrolled but kept our rules while we were
        away (a proxy restart): release them, once each."""
        for wl in self.state.workloads.values():
            if wl.node != self.config.node or wl.uid in wanted or wl.uid in self._uncaptured:
                continue
            if self.config.only_pod is not None and wl.uid != self.config.only_pod:
                continue  # a sidecar minds its own pod only
            if self.config.only_pod is None and wl.labels.get(LABEL_PROXY_MODE) == (
                PROXY_MODE_SIDECAR
            ):
                continue  # its capture is its sidecar's, not a leftover of ours
            path = self.config.pod_netns(wl.namespace, wl.name)
            try:
                netns = PodNetns(path)
            except NetnsError:
                continue  # not created yet, or gone
            try:
                if await netns.has_capture():
                    await netns.remove_capture()
                    log.info("released pod %s: captured before, no longer enrolled", wl.uid)
                self._uncaptured.add(wl.uid)
            except (NetnsError, OSError) as exc:
                log.warning("cannot inspect pod %s: %s", wl.uid, exc)
            finally:
                netns.close()

    def reevaluate(self) -> None:
        """Close open connections that the current policies no longer allow."""
        for cid, tracked in list(self.tracked.items()):
            pod = self.pods.get(tracked.pod)
            if pod is None:
                continue
            decision = self.policies.evaluate(pod.workload, tracked.conn)
            if not decision.allowed:
                log.info("closing connection %d: %s", cid, decision.reason)
                self.metrics.rejected.labels(reason="policy_changed").inc()
                self.tracked.pop(cid, None)
                tracked.close()

    def refresh_gauges(self) -> None:
        """Fold the HBONE servers' error counts into the metrics before a scrape."""
        totals: dict[str, int] = {}
        for pod in self.pods.values():
            if pod.hbone is not None:
                for reason, count in pod.hbone.errors.items():
                    totals[reason] = totals.get(reason, 0) + count
        self.metrics.hbone_errors.clear()
        for reason, count in totals.items():
            self.metrics.hbone_errors.labels(reason=reason).set(count)

    def dump(self) -> dict[str, Any]:
        return {
            "node": self.config.node,
            "xdsVersion": {t: self.xds.version(t) for t in self.xds.types},
            "workloads": sorted(self.state.workloads),
            "services": sorted(self.state.services),
            "policies": sorted(self.state.policies),
            "capturedPods": {
                uid: {"netns": str(p.netns.path), "identity": p.identity.uri}
                for uid, p in sorted(self.pods.items())
            },
            "certificates": self.certs.dump(),
            "connections": [
                {
                    "id": cid,
                    "pod": t.pod,
                    "source": str(t.conn.source_ip),
                    "sourceIdentity": t.conn.source_identity.uri
                    if t.conn.source_identity
                    else None,
                    "destination": f"{t.conn.destination_ip}:{t.conn.destination_port}",
                    "ageSeconds": round(time.monotonic() - t.started, 1),
                }
                for cid, t in sorted(self.tracked.items())
            ],
        }

    async def close(self) -> None:
        for pod in list(self.pods.values()):
            await pod.stop(uncapture=False)  # keep capture: fail closed while we are away
        self.pods.clear()
        await self.xds.close()
        await self.ca.close()


def _labels(
    reporter: str,
    src: address_pb2.Workload | None,
    src_identity: SpiffeId | None,
    dst: address_pb2.Workload | None,
    dst_identity: SpiffeId | None,
    service: str,
    mtls: bool,
    flags: str = "-",
) -> dict[str, str]:
    return {
        "reporter": reporter,
        "source_workload": src.canonical_name if src else "unknown",
        "source_workload_namespace": src.namespace if src else "unknown",
        "source_principal": src_identity.uri if src_identity else "unknown",
        "destination_workload": dst.canonical_name if dst else "unknown",
        "destination_workload_namespace": dst.namespace if dst else "unknown",
        "destination_service": service,
        "destination_principal": dst_identity.uri if dst_identity else "unknown",
        "connection_security_policy": "mutual_tls" if mtls else "none",
        "response_flags": flags,
        "request_protocol": "tcp",
    }


class PodProxy:
    """The capture of one pod: its listeners inside its namespace and their connections."""

    def __init__(self, node: NodeProxy, workload: address_pb2.Workload, netns: PodNetns) -> None:
        self.node = node
        self.workload = workload
        self.netns = netns
        self.identity = workload_identity(workload)
        self.ip = ip_text(workload.addresses[0])
        self.pool = HboneConnectionPool()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.hbone: HboneServer | None = None

    @property
    def uid(self) -> str:
        return self.workload.uid

    def still_valid(self, wl: address_pb2.Workload) -> bool:
        return (
            self.netns.still_current()
            and workload_identity(wl) == self.identity
            and ip_text(wl.addresses[0]) == self.ip
        )

    def creds(self) -> WorkloadCredentials:
        creds = self.node.certs.current(self.identity)
        if creds is None:
            raise CertificateUnavailable(f"no certificate for {self.identity.uri}")
        return creds

    async def start(self) -> None:
        await self.node.certs.get(self.identity)
        try:
            outbound = await self.netns.listen("127.0.0.1", OUTBOUND_PORT)
            self._listeners.append(outbound)
            plaintext = await self.netns.listen(
                "127.0.0.1", INBOUND_PLAINTEXT_PORT, transparent=True
            )
            self._listeners.append(plaintext)
            hbone = await self.netns.listen("0.0.0.0", HBONE_PORT)
            self._listeners.append(hbone)
            # Capture only once every listener is there, so nothing is redirected into a void.
            await self.netns.install_capture()
        except BaseException:
            await self.stop(uncapture=False)
            raise
        self.hbone = HboneServer(hbone, self.creds, self._inbound_hbone)
        self._spawn(self.hbone.serve())
        self._spawn(self._accept_loop(outbound, self._outbound))
        self._spawn(self._accept_loop(plaintext, self._inbound_plaintext))
        log.info("capturing pod %s (%s) in %s", self.uid, self.ip, self.netns.path)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, *, uncapture: bool) -> None:
        if uncapture:
            with contextlib.suppress(NetnsError, OSError):
                await self.netns.remove_capture()
        if self.hbone is not None:
            self.hbone.close()
        for sock in self._listeners:
            sock.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.pool.close()
        self.netns.close()
        log.info("stopped capturing pod %s%s", self.uid, " (uncaptured)" if uncapture else "")

    async def _accept_loop(
        self, listener: socket.socket, handle: Callable[[socket.socket], Awaitable[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                log.warning("accept failed on %s: %s", listener, exc)
                await asyncio.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._guard(handle, sock))

    async def _guard(
        self, handle: Callable[[socket.socket], Awaitable[None]], sock: socket.socket
    ) -> None:
        try:
            await handle(sock)
        except Exception as exc:  # one connection's failure is that connection's only
            log.warning("connection failed in pod %s: %r", self.uid, exc)
            self.node.metrics.rejected.labels(reason="error").inc()
        finally:
            sock.close()

    # -- outbound ----------------------------------------------------------------------------

    async def _outbound(self, sock: socket.socket) -> None:
        dst_ip, dst_port = original_destination(sock)
        src_addr = sock.getpeername()
        upstream = self.node.state.resolve(dst_ip, dst_port)
        metrics = self.node.metrics
        if upstream is None:
            metrics.rejected.labels(reason="no_endpoints").inc()
            _connection_log(
                "outbound",
                src_addr,
                (dst_ip, dst_port),
                self.identity,
                None,
                "no healthy endpoint",
                0,
                0,
                0.0,
            )
            return
        started = time.monotonic()
        service = self.node.state.service_name_for(upstream.service)
        mtls = upstream.identity is not None or upstream.waypoint is not None
        labels = _labels(
            "source",
            self.workload,
            self.identity,
            upstream.workload,
            upstream.identity,
            service,
            mtls,
        )
        try:
            stream = await self._open_upstream(upstream, (dst_ip, dst_port), src_addr[0])
        except (HboneError, OSError, CertificateUnavailable) as exc:
            flags = "UF"
            metrics.rejected.labels(reason="upstream_failed").inc()
            labels["response_flags"] = flags
            metrics.opened.labels(**labels).inc()
            self._finished(
                labels,
                "outbound",
                src_addr,
                upstream.address,
                self.identity,
                upstream.identity,
                f"upstream failed: {exc}",
                0,
                0,
                time.monotonic() - started,
            )
            return
        metrics.opened.labels(**labels).inc()
        sent = received = 0
        try:
            if isinstance(stream, HboneStream):
                sent, received = await relay(stream, sock)
            else:
                sent, received = await splice(sock, stream)
        finally:
            self._finished(
                labels,
                "outbound",
                src_addr,
                upstream.address,
                self.identity,
                upstream.identity,
                "allow",
                sent,
                received,
                time.monotonic() - started,
            )

    async def _open_upstream(
        self, upstream: Upstream, original: tuple[str, int], source_ip: str
    ) -> HboneStream | socket.socket:
        headers = {"forwarded": f'for="{source_ip}"'}
        if upstream.waypoint is not None:
            return await self._waypoint_stream(upstream.waypoint, original, headers)
        if upstream.identity is None:
            return await self.netns.connect(upstream.address)
        host, port = upstream.address
        return await self._hbone_stream(
            host, HBONE_PORT, upstream.identity, f"{host}:{port}", headers
        )

    async def _waypoint_stream(
        self,
        wp: address_pb2.GatewayAddress,
        original: tuple[str, int],
        headers: dict[str, str],
    ) -> HboneStream:
        """A tunnel through one of the waypoint's replicas, dialled at its pod IP (pooled per
        replica); the next one when a replica cannot be reached. Every replica presents the
        Gateway's service account."""
        order = self.node.waypoints.dial_order(wp)
        if not order:
            raise HboneRefused(503, f"waypoint {wp.service} has no address")
        ns, _, hostname = wp.service.partition("/")
        expected = SpiffeId(self.identity.trust_domain, ns, hostname.split(".")[0])
        authority = f"{original[0]}:{original[1]}"
        for attempt, endpoint in enumerate(order, 1):
            try:
                stream = await self._hbone_stream(*endpoint, expected, authority, headers)
            except HboneRefused:
                raise  # the replica answered: another would answer the same
            except (HboneError, OSError) as exc:
                self.node.waypoints.failed(endpoint)
                if attempt == len(order):
                    raise
                log.info(
                    "waypoint %s replica %s:%d failed (%s); trying another",
                    wp.service,
                    *endpoint,
                    exc,
                )
                continue
            self.node.waypoints.succeeded(endpoint)
            return stream
        raise AssertionError("unreachable: the loop returns or raises")

    async def _hbone_stream(
        self, host: str, port: int, expected: SpiffeId, authority: str, headers: dict[str, str]
    ) -> HboneStream:
        async def dial() -> socket.socket:
            return await self.netns.connect((host, port))

        return await self.pool.open_stream(
            self.creds(), expected, host, port, authority, headers, dial=dial
        )

    # -- inbound -----------------------------------------------------------------------------

    def _decide(self, conn: Connection) -> tuple[bool, str]:
        decision = self.node.policies.evaluate(self.workload, conn)
        return decision.allowed, decision.reason

    async def _inbound_hbone(self, request: HboneRequest) -> None:
        metrics = self.node.metrics
        host, _, port_text = request.authority.rpartition(":")
        if host != self.ip or not port_text.isdigit():
            metrics.rejected.labels(reason="wrong_destination").inc()
            request.refuse(400, f"{request.authority} is not an address of this pod")
            return
        port = int(port_text)
        peer_ip = request.peer_address[0]
        conn = Connection(
            source_ip=ipaddress.ip_address(peer_ip),
            source_identity=request.peer_identity,
            destination_ip=ipaddress.ip_address(self.ip),
            destination_port=port,
            destination_namespace=self.workload.namespace,
        )
        src_wl = self.node.state.workload_by_ip(peer_ip)
        labels = _labels(
            "destination",
            src_wl,
            request.peer_identity,
            self.workload,
            self.identity,
            self._service_for(port),
            True,
        )
        allowed, reason = self._decide(conn)
        started = time.monotonic()
        if not allowed:
            metrics.rejected.labels(reason="policy").inc()
            request.refuse(403, reason)
            _connection_log(
                "inbound",
                request.peer_address,
                (host, port),
                request.peer_identity,
                self.identity,
                f"deny: {reason}",
                0,
                0,
                0.0,
            )
            return
        try:
            app = await self.netns.connect((self.ip, port), source=(peer_ip, 0), timeout=5.0)
        except OSError as exc:
            metrics.rejected.labels(reason="app_unreachable").inc()
            request.refuse(503, f"connection to the application failed: {exc.strerror or exc}")
            return
        request.accept()
        metrics.opened.labels(**labels).inc()
        sent = received = 0
        task = asyncio.current_task()
        cid = self.node.next_id()
        assert task is not None
        self.node.tracked[cid] = TrackedConnection(self.uid, conn, task.cancel)
        outcome = "allow"
        try:
            received, sent = await relay(request.stream, app)
        except asyncio.CancelledError:
            outcome = "closed: policy no longer allows it"
            raise
        finally:
            self.node.tracked.pop(cid, None)
            self._finished(
                labels,
                "inbound",
                request.peer_address,
                (host, port),
                request.peer_identity,
                self.identity,
                outcome,
                received,
                sent,
                time.monotonic() - started,
            )

    def _finished(
        self,
        labels: dict[str, str],
        direction: str,
        source: Any,
        destination: Any,
        source_identity: SpiffeId | None,
        destination_identity: SpiffeId | None,
        decision: str,
        bytes_sent: int,
        bytes_received: int,
        duration: float,
    ) -> None:
        """Count a closed connection (bytes each way) and write its log line."""
        metrics = self.node.metrics
        metrics.sent.labels(**labels).inc(bytes_sent)
        metrics.received.labels(**labels).inc(bytes_received)
        metrics.closed.labels(**labels).inc()
        _connection_log(
            direction,
            source,
            destination,
            source_identity,
            destination_identity,
            decision,
            bytes_sent,
            bytes_received,
            duration,
        )

    def _service_for(self, port: int) -> str:
        """The service a connection to this workload's port most likely came through."""
        for name, ports in sorted(self.workload.services.items()):
            if any(mapping.target_port == port for mapping in ports.ports):
                return name.partition("/")[2]
        return "unknown"

    async def _inbound_plaintext(self, sock: socket.socket) -> None:
        metrics = self.node.metrics
        local_ip, port = sock.getsockname()[:2]
        peer = sock.getpeername()
        mode = self.workload.port_mtls.get(port, self.workload.mtls_mode)
        if mode == address_pb2.MTLS_STRICT:
            metrics.rejected.labels(reason="strict_mtls").inc()
            _connection_log(
                "inbound-plaintext",
                peer,
                (local_ip, port),
                None,
                self.identity,
                "deny: STRICT mTLS",
                0,
                0,
                0.0,
            )
            return
        conn = Connection(
            source_ip=ipaddress.ip_address(peer[0]),
            source_identity=None,
            destination_ip=ipaddress.ip_address(local_ip),
            destination_port=port,
            destination_namespace=self.workload.namespace,
        )
        allowed, reason = self._decide(conn)
        if not allowed:
            metrics.rejected.labels(reason="policy").inc()
            _connection_log(
                "inbound-plaintext",
                peer,
                (local_ip, port),
                None,
                self.identity,
                f"deny: {reason}",
                0,
                0,
                0.0,
            )
            return
        labels = _labels(
            "destination",
            self.node.state.workload_by_ip(peer[0]),
            None,
            self.workload,
            self.identity,
            self._service_for(port),
            False,
        )
        app = await self.netns.connect((local_ip, port), source=(peer[0], 0), timeout=5.0)
        metrics.opened.labels(**labels).inc()
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        cid = self.node.next_id()
        self.node.tracked[cid] = TrackedConnection(self.uid, conn, task.cancel)
        sent = received = 0
        try:
            received, sent = await splice(sock, app)
        finally:
            self.node.tracked.pop(cid, None)
            self._finished(
                labels,
                "inbound-plaintext",
                peer,
                (local_ip, port),
                None,
                self.identity,
                "allow",
                received,
                sent,
                time.monotonic() - started,
            )


def _connection_log(
    direction: str,
    source: Any,
    destination: Any,
    source_identity: SpiffeId | None,
    destination_identity: SpiffeId | None,
    decision: str,
    bytes_sent: int,
    bytes_received: int,
    duration: float,
) -> None:
    """One structured line per connection."""
    conn_log.info(
        json.dumps(
            {
                "direction": direction,
                "source": f"{source[0]}:{source[1]}",
                "destination": f"{destination[0]}:{destination[1]}",
                "source_identity": source_identity.uri if source_identity else None,
                "destination_identity": destination_identity.uri if destination_identity else None,
                "decision": decision,
                "bytes_sent": bytes_sent,
                "bytes_received": bytes_received,
                "duration_ms": round(duration * 1000, 1),
            }
        )
    )
