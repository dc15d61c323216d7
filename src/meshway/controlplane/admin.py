"""The control plane's HTTP side: health, metrics, debug views and the configuration API.

Health, readiness, metrics and the trust bundle are open; everything that reads or changes
configuration or issues credentials needs the admin token (`<state dir>/admin.token`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from meshway import __version__
from meshway.config.errors import ConfigError, ConfigIssue
from meshway.config.model import ObjectKey, Service, Workload, kind_for
from meshway.config.selection import service_endpoints
from meshway.config.store import ResourceVersionTooOld
from meshway.telemetry.metrics import CONTROLPLANE

if TYPE_CHECKING:
    from meshway.controlplane.server import ControlPlane

log = logging.getLogger(__name__)

WATCH_BOOKMARK_SECONDS = 15.0
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/version", "/api/v1/trust-bundle"}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, default=str) + "\n",
        status=status,
        content_type="application/json",
    )


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status)


def _issues(exc: ConfigError) -> web.Response:
    return _json(
        {"error": "configuration rejected", "issues": [_issue_dict(i) for i in exc.issues]}, 422
    )


def _issue_dict(issue: ConfigIssue) -> dict[str, Any]:
    return {
        "source": issue.source,
        "document": issue.document,
        "object": issue.object,
        "path": issue.path,
        "message": issue.message,
        "text": str(issue),
    }


class AdminServer:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024 * 1024)
        r = self.app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/version", self.version)
        r.add_get("/debug/config", self.debug_config)
        r.add_get("/debug/syncz", self.syncz)
        r.add_get("/api/v1/trust-bundle", self.trust_bundle)
        r.add_post("/api/v1/apply", self.apply)
        r.add_post("/api/v1/delete", self.delete)
        r.add_get("/api/v1/objects", self.list_objects)
        r.add_get("/api/v1/watch", self.watch)
        r.add_get("/api/v1/endpoints", self.endpoints)
        r.add_post("/api/v1/nodes/{name}/join", self.join)
        r.add_post("/api/v1/workloads/status", self.workload_status)
        r.add_get("/api/v1/proxies", self.syncz)
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.address = ""

    async def start(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or "127.0.0.1", int(port))
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        self.address = f"{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ").strip()
            if not token or not hmac.compare_digest(token, self.cp.admin_token):
                return _error(
                    401,
                    "missing or wrong admin token (see <state dir>/admin.token, or set "
                    "MESHWAY_TOKEN)",
                )
        result: web.StreamResponse = await handler(request)
        return result

    # -- open --------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.cp.serving.is_set():
            return web.Response(status=503, text="starting\n")
        return web.Response(text="ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        counts: dict[str, int] = {}
        for obj in self.cp.store.list():
            counts[obj.KIND] = counts.get(obj.KIND, 0) + 1
        CONTROLPLANE.config_objects.clear()
        for kind, n in counts.items():
            CONTROLPLANE.config_objects.labels(kind=kind).set(n)
        return web.Response(
            body=CONTROLPLANE.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": __version__, "trustDomain": self.cp.config.trust_domain})

    async def trust_bundle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.cp.ca.trust_bundle.to_pem(), content_type="application/x-pem-file"
        )

    # -- debug -------------------------------------------------------------------------------

    async def debug_config(self, request: web.Request) -> web.Response:
        cfg = self.cp.config
        return _json(
            {
                "revision": self.cp.store.revision,
                "trustDomain": cfg.trust_domain,
                "clusterDomain": cfg.cluster_domain,
                "rootNamespace": cfg.root_namespace,
                "network": self.cp.admission.network.describe(),
                "nodes": self.cp.credentials.nodes(),
                "xds": {
                    type_url: len(resources)
                    for type_url, resources in self.cp.cache.resources.items()
                },
                "objects": [obj.to_dict() for obj in self.cp.store.list()],
            }
        )

    async def syncz(self, request: web.Request) -> web.Response:
        return _json({"version": self.cp.cache.version, "proxies": self.cp.ads.syncz()})

    # -- configuration API -------------------------------------------------------------------

    async def _sources(self, request: web.Request) -> list[tuple[str, str]]:
        try:
            body = await request.json()
            sources = [(str(s["name"]), str(s["text"])) for s in body["sources"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"expected {{'sources': [{{'name', 'text'}}]}}: {exc}"}),
                content_type="application/json",
            ) from exc
        return sources

    async def apply(self, request: web.Request) -> web.Response:
        sources = await self._sources(request)
        dry_run = request.query.get("dryRun") in ("1", "true", "All")
        try:
            results = self.cp.apply_sources(sources, dry_run=dry_run)
        except ConfigError as exc:
            return _issues(exc)
        return _json(
            {
                "dryRun": dry_run,
                "revision": self.cp.store.revision,
                "results": [
                    {
                        "kind": r.object.KIND,
                        "namespace": r.object.metadata.namespace,
                        "name": r.object.metadata.name,
                        "outcome": str(r.outcome),
                        "resourceVersion": r.object.metadata.resource_version,
                    }
                    for r in results
                ],
            }
        )

    async def delete(self, request: web.Request) -> web.Response:
        body = await request.json()
        keys: list[ObjectKey] = []
        try:
            if "sources" in body:
                from meshway.config.loader import parse_sources_with_origins

                objects, _ = parse_sources_with_origins(
                    [(s["name"], s["text"]) for s in body["sources"]]
                )
                keys = [o.key for o in objects]
            else:
                for k in body.get("keys", []):
                    cls = kind_for(k["kind"])
                    keys.append(
                        ObjectKey(
                            cls.KIND,
                            (k.get("namespace") or "default") if cls.NAMESPACED else "",
                            k["name"],
                        )
                    )
        except ConfigError as exc:
            return _issues(exc)
        except KeyError as exc:
            return _error(400, f"bad delete request: {exc}")
        try:
            deleted = self.cp.delete(keys)
        except ConfigError as exc:
            return _issues(exc)
        gone = {o.key for o in deleted}
        return _json(
            {
                "revision": self.cp.store.revision,
                "deleted": [k._asdict() for k in keys if k in gone],
                "notFound": [k._asdict() for k in keys if k not in gone],
            }
        )

    async def list_objects(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        namespace = request.query.get("namespace") or None
        name = request.query.get("name")
        if kind:
            try:
                cls = kind_for(kind)
            except KeyError as exc:
                return _error(400, str(exc.args[0]) if exc.args else str(exc))
            kind = cls.KIND
            if not cls.NAMESPACED:
                namespace = None
        items = [
            obj.to_dict()
            for obj in sorted(
                self.cp.store.list(kind, namespace),
                key=lambda o: (o.KIND, o.metadata.namespace or "", o.metadata.name),
            )
            if name is None or obj.metadata.name == name
        ]
        if name is not None and not items:
            return _error(404, f"{kind or 'object'} '{name}' not found")
        return _json({"revision": self.cp.store.revision, "items": items})

    async def endpoints(self, request: web.Request) -> web.Response:
        """Each Service with the workloads its selector picks (Kubernetes' Endpoints)."""
        namespace = request.query.get("namespace") or None
        name = request.query.get("name")
        store = self.cp.store
        workloads = [w for w in store.list("Workload", namespace) if isinstance(w, Workload)]
        services = [
            s
            for s in store.list("Service", namespace)
            if isinstance(s, Service) and (name is None or s.metadata.name == name)
        ]
        if name is not None and not services:
            return _error(404, f"Service '{name}' not found")
        items = []
        for svc in sorted(services, key=lambda s: (s.metadata.namespace or "", s.metadata.name)):
            items.append(
                {
                    "namespace": svc.metadata.namespace,
                    "service": svc.metadata.name,
                    "endpoints": [
                        {
                            "workload": e.workload,
                            "node": e.node,
                            "ip": e.ip,
                            "ports": [{"port": p, "targetPort": t} for p, t in e.ports],
                        }
                        for e in service_endpoints(svc, workloads)
                    ],
                }
            )
        return _json({"revision": store.revision, "items": items})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Newline-delimited JSON events after `since` (default: now)."""
        since = int(request.query.get("since", self.cp.store.revision))
        try:
            self.cp.store.events_since(since)
        except ResourceVersionTooOld as exc:
            return _error(410, str(exc))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        store = self.cp.store
        position = since
        try:
            while True:
                events = store.events_since(position)
                lines: list[dict[str, Any]] = [
                    {"type": str(e.type), "revision": e.revision, "object": e.object.to_dict()}
                    for e in events
                ]
                if events:
                    position = events[-1].revision
                elif not await store.wait_past(position, WATCH_BOOKMARK_SECONDS):
                    # A bookmark keeps idle streams alive and finds clients that went away.
                    lines = [{"type": "BOOKMARK", "revision": store.revision}]
                if lines:
                    await response.write(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        except (ConnectionResetError, ResourceVersionTooOld):
            pass
        finally:
            self._streams.discard(task)
        return response

    async def workload_status(self, request: web.Request) -> web.Response:
        """The runtime's report of pod phases: {"items": [{namespace, name, phase}]}."""
        try:
            body = await request.json()
            phases = {
                ObjectKey(Workload.KIND, str(i["namespace"]), str(i["name"])): str(i["phase"])
                for i in body["items"]
            }
            updated = self.cp.report_workload_phases(phases)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"expected {{'items': [{{'namespace', 'name', 'phase'}}]}}: {exc}")
        return _json({"revision": self.cp.store.revision, "updated": len(updated)})

    async def join(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            credential = self.cp.join_node(name)
        except ConfigError as exc:
            return _issues(exc)
        return _json(
            {
                "node": name,
                "credential": credential,
                "xdsAddress": self.cp.grpc_target,
                "trustDomain": self.cp.config.trust_domain,
                "trustBundle": self.cp.ca.trust_bundle.to_pem().decode(),
            }
        )
