"""`meshway controlplane`: the store, the CA, the xDS push, the waypoint controller and the admin
API in one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshway.api.v1 import ca_pb2, ca_pb2_grpc
from meshway.config.errors import ConfigError
from meshway.config.loader import parse_sources_with_origins
from meshway.config.model import ObjectKey, Resource, Workload
from meshway.config.store import (
    ApplyOutcome,
    ApplyResult,
    ResourceVersionTooOld,
    SqliteStore,
    WatchEvent,
)
from meshway.controlplane.admission import Admission, ClusterNetwork
from meshway.controlplane.nodes import CredentialError, NodeCredentials
from meshway.controlplane.translate import MeshSettings, MeshTranslator
from meshway.controlplane.waypoints import WaypointController
from meshway.identity.ca import CertificateAuthority, CsrRejected
from meshway.identity.spiffe import SpiffeId
from meshway.telemetry.metrics import CONTROLPLANE
from meshway.xds.server import (
    SERVER_GRPC_OPTIONS,
    AggregatedDiscoveryService,
    Change,
    ResourceCache,
)
from meshway.xds.types import ALL_TYPE_URLS

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVING_NAME = "meshway-controlplane"
WORKLOAD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")


@dataclass
class ControlPlaneConfig:
    state_dir: Path
    grpc_address: str = "127.0.0.1:15012"
    admin_address: str = "127.0.0.1:15014"
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    node_prefix: int = 24
    cacerts_dir: Path | None = None
    extra_roots: Sequence[Path] = field(default_factory=tuple)
    cert_ttl: timedelta = timedelta(hours=24)
    debounce_after: float = 0.05
    debounce_max: float = 0.5


def load_or_create_admin_token(state_dir: Path) -> str:
    """The credential of `meshway apply`/`delete`: a random token in a 0600 file."""
    path = state_dir / "admin.token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


LARGE_BATCH = 1000


def _settle_heap() -> None:
    """Move the (large, long-lived) configuration out of the collector's sight.

    A full collection walks every object the store and translator hold (about 0.2 s at 10,000
    workloads), and one landing during a push shows up as push latency. Objects frozen here are
    still freed by reference counting when they are replaced or deleted.
    """
    gc.collect()
    gc.freeze()


async def debounce(
    queue: asyncio.Queue[tuple[float, T]], quiet: float, max_wait: float
) -> tuple[float, list[T]]:
    """The next batch: items until `quiet` seconds pass with none, or `max_wait` after the first.

    Returns when the first item arrived and the batch. A burst of applies becomes one push, and
    a steady trickle still pushes at least every `max_wait` seconds.
    """
    first_seen, item = await queue.get()
    batch = [item]
    deadline = first_seen + max_wait
    while (timeout := min(quiet, deadline - time.monotonic())) > 0:
        try:
            _, item = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            break
        batch.append(item)
    while not queue.empty():
        batch.append(queue.get_nowait()[1])
    return first_seen, batch


class RequestDenied(Exception):
    """A certificate request this node may not make."""


class ControlPlane:
    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        self.store = SqliteStore(state / "store.db")
        network = ClusterNetwork.parse(config.pod_cidr, config.service_cidr, config.node_prefix)
        self.admission = Admission(self.store, network)
        self.waypoints = WaypointController(
            self.store, self.admission, cluster_domain=config.cluster_domain
        )
        self.ca = CertificateAuthority.load_or_create(
            state, config.trust_domain, config.cacerts_dir, config.extra_roots
        )
        self.credentials = NodeCredentials(self.store)
        self.admin_token = load_or_create_admin_token(state)
        self.settings = MeshSettings(
            config.trust_domain, config.cluster_domain, config.root_namespace
        )
        self.translator = MeshTranslator(self.settings)
        self.cache = ResourceCache(ALL_TYPE_URLS)
        self.ads = AggregatedDiscoveryService(self.cache, self._authenticate)
        self._identities_revision = -1
        self._identities: dict[str, set[tuple[str, str]]] = {}
        self.grpc_port = 0
        self.serving = asyncio.Event()
        self.started_at = time.time()
        self._ensure_defaults()

    def _ensure_defaults(self) -> None:
        """Like a new Kubernetes cluster: the `default` namespace exists from the start."""
        if self.store.revision == 0:
            self.apply_sources(
                [("<built-in>", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n")]
            )

    # -- configuration -----------------------------------------------------------------------

    def apply_sources(
        self, sources: Sequence[tuple[str, str]], *, dry_run: bool = False
    ) -> list[ApplyResult]:
        try:
            objects, origins = parse_sources_with_origins(sources)
            results = self.admission.apply(objects, origins, dry_run=dry_run)
        except ConfigError:
            CONTROLPLANE.config_rejections.labels(operation="apply").inc()
            raise
        if not dry_run:
            CONTROLPLANE.config_applies.labels(operation="apply").inc()
            # The watch would get there too; doing it now means that when `apply` returns, a
            # waypoint Gateway's Workload and Service exist (read-your-writes for the user).
            changed = [r.object for r in results if r.outcome is not ApplyOutcome.UNCHANGED]
            self.waypoints.sync(self.waypoints.affected(changed))
        return results

    def delete(self, keys: Sequence[ObjectKey]) -> list[Resource]:
        try:
            deleted = self.admission.delete(keys)
        except ConfigError:
            CONTROLPLANE.config_rejections.labels(operation="delete").inc()
            raise
        CONTROLPLANE.config_applies.labels(operation="delete").inc()
        for obj in deleted:
            if obj.KIND == "Node":
                self.credentials.revoke(obj.metadata.name)
        self.waypoints.sync(self.waypoints.affected(deleted))
        return deleted

    def report_workload_phases(self, phases: Mapping[ObjectKey, str]) -> list[ObjectKey]:
        """Record the phases the runtime observed (kubelet's pod status); returns the workloads
        whose phase changed. Unknown workloads are skipped: one may have just been deleted."""
        for key, phase in phases.items():
            if phase not in WORKLOAD_PHASES:
                raise ValueError(
                    f"phase {phase!r} of {key} is not one of {', '.join(WORKLOAD_PHASES)}"
                )
        updated = []
        for key, phase in phases.items():
            wl = self.store.get(key)
            if isinstance(wl, Workload) and wl.status.phase != phase:
                status = wl.status.model_copy(update={"phase": phase})
                updated.append(wl.model_copy(update={"status": status}))
        self.store.apply(updated)
        self.waypoints.sync(self.waypoints.affected(updated))
        return [wl.key for wl in updated]

    def join_node(self, name: str) -> str:
        """Create the Node if needed and issue it a fresh credential."""
        if self.store.get(ObjectKey("Node", "", name)) is None:
            doc = f"apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata:\n  name: {name}\n"
            self.apply_sources([(f"<join {name}>", doc)])
        return self.credentials.issue(name)

    # -- certificates ------------------------------------------------------------------------

    def identities_on(self, node: str) -> set[tuple[str, str]]:
        if self._identities_revision != self.store.revision:
            index: dict[str, set[tuple[str, str]]] = {}
            for wl in self.store.list("Workload"):
                assert isinstance(wl, Workload)
                index.setdefault(wl.spec.node_name, set()).add(
                    (wl.metadata.namespace or "", wl.spec.service_account_name)
                )
            self._identities = index
            self._identities_revision = self.store.revision
        return self._identities.get(node, set())

    def sign_for_node(self, node: str, csr_pem: bytes, ttl: timedelta | None = None) -> list[str]:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound) as exc:
            raise CsrRejected(f"the CSR must carry exactly one SPIFFE URI SAN ({exc})") from exc
        if len(uris) != 1:
            raise CsrRejected(f"the CSR must carry exactly one URI SAN, it has {len(uris)}")
        try:
            identity = SpiffeId.parse(uris[0])
        except ValueError as exc:
            raise CsrRejected(str(exc)) from exc
        if identity.trust_domain != self.config.trust_domain:
            raise RequestDenied(
                f"trust domain '{identity.trust_domain}' is not this mesh's "
                f"('{self.config.trust_domain}')"
            )
        if (identity.namespace, identity.service_account) not in self.identities_on(node):
            raise RequestDenied(
                f"node '{node}' may not obtain a certificate for {identity.uri}: no workload "
                f"with service account '{identity.service_account}' in namespace "
                f"'{identity.namespace}' is scheduled on node '{node}'"
            )
        issued = self.ca.sign_csr(csr_pem, identity, ttl or self.config.cert_ttl)
        return issued.cert_chain_pem

    @property
    def grpc_target(self) -> str:
        """host:port a proxy dials (the bound port, when the configured one was 0)."""
        host = self.config.grpc_address.rpartition(":")[0]
        return f"{host}:{self.grpc_port}"

    # -- gRPC --------------------------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value.removeprefix("Bearer ")
        if not token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no node credential: send 'authorization: Bearer <credential>' "
                "(from `meshway node join`)",
            )
        try:
            return self.credentials.authenticate(token)
        except CredentialError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # unreachable: abort raises

    def _serving_credentials(self) -> grpc.ServerCredentials:
        host = self.config.grpc_address.rpartition(":")[0].strip("[]")
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
            ipaddress.ip_address("127.0.0.1")
        ]
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            if not ip.is_unspecified and ip not in ips:
                ips.append(ip)
        chain, key = self.ca.issue_serving_certificate([SERVING_NAME, "localhost"], ips)
        return grpc.ssl_server_credentials([(key, chain)])

    async def _start_grpc(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_GRPC_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        ca_pb2_grpc.add_CertificateServiceServicer_to_server(_CertificateService(self), server)
        self.grpc_port = server.add_secure_port(
            self.config.grpc_address, self._serving_credentials()
        )
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {self.config.grpc_address}")
        await server.start()
        return server

    # -- push loop ---------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        """Watch the store, debounce, translate, and hand changes to the xDS cache."""
        queue: asyncio.Queue[tuple[float, WatchEvent]] = asyncio.Queue()
        watcher = self._rebuild(queue)
        self.cache.ready.set()
        try:
            while True:
                first_seen, batch = await debounce(
                    queue, self.config.debounce_after, self.config.debounce_max
                )
                if watcher.done():
                    # The watch fell behind the store's event log: start again from a full list.
                    exc = watcher.exception()
                    if not isinstance(exc, ResourceVersionTooOld):
                        raise exc or RuntimeError("store watch ended")
                    log.warning("push loop fell behind the store; rebuilding from a full list")
                    watcher = self._rebuild(queue)
                    continue
                changes = self.translator.apply(batch, str(batch[-1].revision))
                for change in changes:
                    change.started = first_seen
                self.cache.apply(changes)
                if len(batch) >= LARGE_BATCH:
                    _settle_heap()
        finally:
            watcher.cancel()

    def _rebuild(self, queue: asyncio.Queue[tuple[float, WatchEvent]]) -> asyncio.Task[None]:
        """Translate the whole store into the cache and start watching after its revision."""
        revision = self.store.revision
        self.translator = MeshTranslator(self.settings)
        changes = self.translator.full(self.store.list(), str(revision))
        for type_url in ALL_TYPE_URLS:
            fresh = next((c for c in changes if c.type_url == type_url), None)
            keep = set(fresh.updated) if fresh else set()
            gone = set(self.cache.resources[type_url]) - keep
            if gone:
                changes.append(Change(type_url, {}, gone, str(revision)))
        self.cache.apply(changes)
        while not queue.empty():
            queue.get_nowait()
        _settle_heap()

        async def watch() -> None:
            async for event in self.store.watch(revision):
                queue.put_nowait((time.monotonic(), event))

        return asyncio.create_task(watch(), name="store-watch")

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[ControlPlane], None] | None = None) -> None:
        from meshway.controlplane.admin import AdminServer

        server = await self._start_grpc()
        admin = AdminServer(self)
        try:
            await admin.start(self.config.admin_address)
        except OSError:
            await server.stop(grace=None)
            self.store.close()
            raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        log.info(
            "control plane serving: xDS+CA grpcs://%s, admin http://%s, state %s",
            self.config.grpc_address,
            admin.address,
            self.config.state_dir,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                push = tg.create_task(self._push_loop())
                waypoints = tg.create_task(self.waypoints.run(), name="waypoint-controller")
                await self.cache.ready.wait()
                self.serving.set()
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
                push.cancel()
                waypoints.cancel()
        finally:
            log.info("control plane stopping")
            await admin.stop()
            await server.stop(grace=1.0)
            self.store.close()


class _CertificateService(ca_pb2_grpc.CertificateServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def CreateCertificate(
        self, request: ca_pb2.CertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.CertificateResponse:
        node = await self.cp._authenticate(context)
        ttl = (
            timedelta(seconds=request.validity_duration_seconds)
            if request.validity_duration_seconds > 0
            else None
        )
        try:
            chain = self.cp.sign_for_node(node, request.csr.encode(), ttl)
        except RequestDenied as exc:
            CONTROLPLANE.certs_refused.labels(reason="not-on-node").inc()
            log.warning("refused CSR from node %s: %s", node, exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except CsrRejected as exc:
            CONTROLPLANE.certs_refused.labels(reason="bad-csr").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        CONTROLPLANE.certs_issued.inc()
        bundle = [
            cert.public_bytes(Encoding.PEM).decode() for cert in self.cp.ca.trust_bundle.roots
        ]
        return ca_pb2.CertificateResponse(cert_chain=chain, trust_bundle=bundle)
