"""The runtime agent: what kubelet and kube-proxy do, for a cluster of network namespaces.

It lists and watches the control plane's objects and makes the host match them: a namespace
per Node, a namespace and a running process per Workload (restarted with back-off when it
exits), Service DNAT in every node, and each pod's hosts file; and it reports each pod's phase
back, as kubelet reports pod status. Reconciliation is level-triggered: on any change it
compares the whole desired state with what exists, so a missed event cannot leave the host
wrong for long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshway.config.labels import (
    ANNOTATION_MANAGED_BY,
    LABEL_PROXY_MODE,
    PROXY_MODE_SIDECAR,
    PROXY_MODE_WAYPOINT,
)
from meshway.config.model import KINDS, Node, Resource, Service, Workload
from meshway.config.selection import service_endpoints
from meshway.runtime import host
from meshway.runtime.dns import ServiceName, hosts_file, resolv_conf
from meshway.runtime.network import ClusterNames, ClusterNetwork, NodeAddress, node_ip
from meshway.runtime.ratelimitstore import STORE_ENV as RATELIMIT_STORE_ENV

log = logging.getLogger(__name__)

RESYNC_SECONDS = 1.0
MAX_BACKOFF = 30.0
# Where a waypoint pod finds its node's credential file (`python -m meshway.waypoint` reads it).
CREDENTIALS_ENV = "MESHWAY_CREDENTIALS"


def workload_phase(process_phase: str) -> str:
    """A supervised process's phase as a Workload phase: Running only while it runs."""
    if process_phase == "Running":
        return "Running"
    if process_phase.startswith("Failed"):
        return "Failed"
    return "Pending"


def is_waypoint_pod(wl: Workload) -> bool:
    """A waypoint the control plane deployed: its label and its owner annotation. Admission
    already refuses both from users; the node's credential is worth checking twice."""
    return (
        wl.metadata.labels.get(LABEL_PROXY_MODE) == PROXY_MODE_WAYPOINT
        and ANNOTATION_MANAGED_BY in wl.metadata.annotations
    )


class SupervisedProcess:
    """A process kept running: started, restarted with back-off when it exits, stopped."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.phase = "Pending"
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self._next_start = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def tick(self, env: dict[str, str], cwd: str) -> None:
        """Start it if it is not running and its back-off has passed."""
        if self.proc is not None and self.proc.poll() is None:
            self.phase = "Running"
            return
        if self.proc is not None:
            self.last_exit = self.proc.returncode
            self.proc = None
            self.restarts += 1
            backoff = min(MAX_BACKOFF, 2.0 ** min(self.restarts - 1, 5))
            self._next_start = time.monotonic() + backoff
            self.phase = "CrashLoopBackOff" if self.restarts > 1 else "Restarting"
            log.warning(
                "%s exited with %s; restarting in %.0fs", self.name, self.last_exit, backoff
            )
        if time.monotonic() < self._next_start:
            return
        with self.log_path.open("ab") as log_file:
            try:
                self.proc = subprocess.Popen(
                    self.command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                self.phase = f"Failed: {exc}"
                self._next_start = time.monotonic() + MAX_BACKOFF
                return
        self.started_at = time.time()
        self.phase = "Running"

    def restart_with(self, command: list[str]) -> None:
        self.stop()
        self.command = command
        self.restarts = 0
        self._next_start = 0.0

    def stop(self, timeout: float = 3.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "phase": self.phase,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started_at": self.started_at,
        }


@dataclass
class PodState:
    namespace: str
    name: str
    node: str
    ip: str
    netns: str
    process: SupervisedProcess

    def describe(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "node": self.node,
            "ip": self.ip,
            "netns": self.netns,
            "command": self.process.command,
            **self.process.describe(),
        }


def pod_environment(
    wl: Workload, pod: PodState, base: Mapping[str, str], credentials: Path | None
) -> dict[str, str]:
    """A pod's environment: the agent's, the Workload's, the downward-API names, and for a
    waypoint its node's credential file. No other pod gets MESHWAY_CREDENTIALS, whatever the
    agent's own environment or the Workload's spec says."""
    env = {
        **base,
        **wl.spec.env,
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_IP": pod.ip,
        "NODE_NAME": pod.node,
    }
    env.pop(CREDENTIALS_ENV, None)
    if credentials is not None:
        env[CREDENTIALS_ENV] = str(credentials)
    return env


@dataclass
class AgentState:
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: dict[str, PodState] = field(default_factory=dict)
    revision: int = 0
    ready: bool = False
    error: str | None = None


class RuntimeAgent:
    def __init__(
        self,
        cluster: str,
        cluster_dir: Path,
        server: str,
        token: str,
        node_network: str,
        cluster_domain: str = "cluster.local",
        node_proxy_args: Sequence[str] = (),
        ratelimit_store: str = "",
    ) -> None:
        self.names = ClusterNames(cluster)
        self.dir = cluster_dir
        self.net = ClusterNetwork(self.names, node_network)
        self.http = httpx.Client(
            base_url=server, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        self.cluster_domain = cluster_domain
        self.state = AgentState()
        self.logs = cluster_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._node_proxies: dict[str, SupervisedProcess] = {}
        self._sidecars: dict[str, SupervisedProcess] = {}
        self.node_proxy_args = list(node_proxy_args)
        # Given to waypoint pods in MESHWAY_RATELIMIT_STORE (runtime/ratelimitstore.py).
        self.ratelimit_store = ratelimit_store
        self._events: queue.Queue[int] = queue.Queue()
        self._stop = threading.Event()
        self._program: dict[str, str] = {}
        self._service_names: list[ServiceName] = []

    # -- reading the desired state -------------------------------------------------------------

    def _list(self) -> tuple[int, list[Resource]]:
        body = self.http.get("/api/v1/objects").json()
        objects = [KINDS[item["kind"]].model_validate(item) for item in body["items"]]
        return int(body["revision"]), objects

    def _pod_cidr(self) -> str:
        network = self.http.get("/debug/config").json()["network"]
        return str(network.split(",")[0])

    def _watch(self, since: int) -> None:
        """Feed revisions from the control plane's watch stream; reconnect until stopped."""
        while not self._stop.is_set():
            try:
                with self.http.stream(
                    "GET", "/api/v1/watch", params={"since": since}, timeout=None
                ) as response:
                    if response.status_code == 410:
                        since = self._list()[0]
                        self._events.put(since)
                        continue
                    for line in response.iter_lines():
                        if self._stop.is_set():
                            return
                        if line:
                            since = int(json.loads(line)["revision"])
                            self._events.put(since)
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("watch interrupted (%s); reconnecting", exc)
                self._stop.wait(1.0)

    # -- reconciliation ------------------------------------------------------------------------

    def reconcile(self, objects: list[Resource], pod_cidr: str) -> None:
        nodes = [o for o in objects if isinstance(o, Node) and o.status.pod_cidr]
        workloads = [o for o in objects if isinstance(o, Workload) and o.status.pod_ip]
        services = [o for o in objects if isinstance(o, Service)]

        self.net.ensure_cluster()
        addresses = [
            NodeAddress(
                n.metadata.name,
                node_ip(str(self.net.node_network), str(n.status.pod_cidr), pod_cidr),
                str(n.status.pod_cidr),
            )
            for n in nodes
        ]
        for node in addresses:
            self.net.ensure_node(node)
        self.net.route_nodes(addresses)
        for node in addresses:
            self._ensure_node_proxy(node.name)
        for name in [n for n in self._node_proxies if n not in {a.name for a in addresses}]:
            self._node_proxies.pop(name).stop()
        self.state.nodes = {
            n.name: {"ip": n.ip, "podCIDR": n.pod_cidr, "netns": self.names.node_ns(n.name)}
            for n in addresses
        }

        # Service VIPs for every node, and names for every pod (written before a pod starts).
        table: dict[tuple[str, int], list[tuple[str, int]]] = {}
        names: list[ServiceName] = []
        for svc in services:
            vip = svc.spec.cluster_ip
            if not vip or vip == "None":
                continue
            names.append(ServiceName(svc.metadata.name, svc.metadata.namespace or "", vip))
            endpoints = service_endpoints(svc, workloads)
            for sp in svc.spec.ports:
                table[(vip, sp.port)] = [
                    (e.ip, target)
                    for e in endpoints
                    if e.ip
                    for port, target in e.ports
                    if port == sp.port
                ]
        self._service_names = names
        wanted = {f"{w.metadata.namespace}/{w.metadata.name}": w for w in workloads}
        for key in [k for k in self.state.pods if k not in wanted]:
            self._remove_pod(key)
        for key, wl in wanted.items():
            self._ensure_pod(key, wl)
        self._report_phases(workloads)

        for node in addresses:
            program = json.dumps(sorted(table.items()))
            if self._program.get(node.name) != program:
                self.net.program_services(node.name, table)
                self._program[node.name] = program
        for pod in self.state.pods.values():
            host.write_netns_file(
                pod.netns,
                "hosts",
                hosts_file(pod.name, pod.namespace, pod.ip, names, self.cluster_domain),
            )
        for node_name in [n for n in list(self._program) if n not in self.state.nodes]:
            self._program.pop(node_name)
        for node_ns in host.netns_list(self.names.prefix + "node."):
            node_name = node_ns.removeprefix(self.names.prefix + "node.")
            if node_name not in self.state.nodes and not any(
                p.node == node_name for p in self.state.pods.values()
            ):
                self.net.delete_node(node_name)

    def _ensure_pod(self, key: str, wl: Workload) -> None:
        ns = wl.metadata.namespace or ""
        pod = self.state.pods.get(key)
        if pod is None:
            netns = self.net.ensure_pod(
                wl.spec.node_name, ns, wl.metadata.name, str(wl.status.pod_ip)
            )
            host.write_netns_file(netns, "resolv.conf", resolv_conf(ns, self.cluster_domain))
            # Before the first process starts: `ip netns exec` bind-mounts only files that exist.
            hosts = hosts_file(
                wl.metadata.name,
                ns,
                str(wl.status.pod_ip),
                self._service_names,
                self.cluster_domain,
            )
            host.write_netns_file(netns, "hosts", hosts)
            process = SupervisedProcess(
                f"pod {key}", [], self.logs / f"{ns}.{wl.metadata.name}.log"
            )
            pod = PodState(
                ns, wl.metadata.name, wl.spec.node_name, str(wl.status.pod_ip), netns, process
            )
            self.state.pods[key] = pod
        waypoint = is_waypoint_pod(wl)
        if waypoint:
            # Like a node proxy, a waypoint runs beside the pod and makes its sockets inside
            # the pod's namespace: it must reach the control plane, which pods cannot.
            command = list(wl.spec.command)
        else:
            command = ["ip", "netns", "exec", pod.netns, *wl.spec.command]
        if pod.process.command != command:
            pod.process.restart_with(command)
        credentials = self._node_credentials(pod.node) if waypoint else None
        env = pod_environment(wl, pod, os.environ, credentials)
        if waypoint:
            env["MESHWAY_NETNS"] = str(host.NETNS_DIR / pod.netns)
            if self.ratelimit_store:
                env[RATELIMIT_STORE_ENV] = self.ratelimit_store
        pod.process.tick(env, wl.spec.working_dir or str(self.dir))
        self._ensure_sidecar(
            key, pod, wl.metadata.labels.get(LABEL_PROXY_MODE) == PROXY_MODE_SIDECAR
        )

    def _report_phases(self, workloads: Sequence[Workload]) -> None:
        """Tell the control plane the phases that differ from what it has; a failed report is
        retried by the next reconciliation, which compares again."""
        changed = []
        for wl in workloads:
            pod = self.state.pods.get(f"{wl.metadata.namespace}/{wl.metadata.name}")
            if pod is None:
                continue
            phase = workload_phase(pod.process.phase)
            if wl.status.phase != phase:
                changed.append({"namespace": pod.namespace, "name": pod.name, "phase": phase})
        if not changed:
            return
        try:
            self.http.post("/api/v1/workloads/status", json={"items": changed}).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("cannot report the phase of %d pod(s): %s", len(changed), exc)

    def _node_credentials(self, node: str) -> Path:
        """The node's credential file, from a `node join` done once."""
        creds = self.dir / "nodes" / f"{node}.yaml"
        if not creds.exists():
            creds.parent.mkdir(parents=True, exist_ok=True)
            reply = self.http.post(f"/api/v1/nodes/{node}/join")
            reply.raise_for_status()
            fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(reply.json(), f)
        return creds

    def _proxy_command(self, node: str, listen_netns: str, only_pod: str | None) -> list[str]:
        template = f"{host.NETNS_DIR}/{self.names.prefix}pod.{{namespace}}.{{name}}"
        return [
            sys.executable, "-m", "meshway.node",
            "--credentials", str(self._node_credentials(node)),
            "--pod-netns", template,
            "--listen-netns", str(host.NETNS_DIR / listen_netns),
            *(["--only-pod", only_pod] if only_pod else []),
            *self.node_proxy_args,
        ]  # fmt: skip

    def _ensure_node_proxy(self, node: str) -> None:
        """One `meshway node run` per node."""
        proxy = self._node_proxies.get(node)
        if proxy is None:
            command = self._proxy_command(node, self.names.node_ns(node), None)
            proxy = SupervisedProcess(f"node proxy {node}", command, self.logs / f"node.{node}.log")
            self._node_proxies[node] = proxy
        proxy.tick(dict(os.environ), str(self.dir))

    def _ensure_sidecar(self, key: str, pod: PodState, wanted: bool) -> None:
        """Sidecar mode for a pod labelled `meshway.io/proxy: sidecar`: the same proxy code,
        one process for this pod alone, its ports inside the pod."""
        sidecar = self._sidecars.get(key)
        if not wanted:
            if sidecar is not None:
                self._sidecars.pop(key).stop()
            return
        if sidecar is None:
            command = self._proxy_command(pod.node, pod.netns, key)
            log_path = self.logs / f"sidecar.{pod.namespace}.{pod.name}.log"
            sidecar = self._sidecars[key] = SupervisedProcess(f"sidecar {key}", command, log_path)
        sidecar.tick(dict(os.environ), str(self.dir))

    def _remove_pod(self, key: str) -> None:
        pod = self.state.pods.pop(key)
        sidecar = self._sidecars.pop(key, None)
        if sidecar is not None:
            sidecar.stop()
        pod.process.stop()
        for pid in host.netns_pids(pod.netns):  # anything else left inside the pod
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.net.delete_pod(pod.namespace, pod.name)

    # -- state file and lifecycle --------------------------------------------------------------

    def write_state(self) -> None:
        data: dict[str, Any] = {
            "revision": self.state.revision,
            "ready": self.state.ready,
            "error": self.state.error,
            "nodes": self.state.nodes,
            "pods": {k: p.describe() for k, p in sorted(self.state.pods.items())},
            "nodeProxies": {n: p.describe() for n, p in sorted(self._node_proxies.items())},
            "sidecars": {k: p.describe() for k, p in sorted(self._sidecars.items())},
            "updated": time.time(),
        }
        tmp = self.dir / "agent-state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.dir / "agent-state.json")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        pod_cidr = self._pod_cidr()
        revision, objects = self._list()
        watcher = threading.Thread(target=self._watch, args=(revision,), daemon=True)
        watcher.start()
        try:
            while not self._stop.is_set():
                try:
                    self.reconcile(objects, pod_cidr)
                    self.state.revision = revision
                    self.state.ready = True
                    self.state.error = None
                except (host.HostCommandError, OSError) as exc:
                    log.error("reconcile failed: %s", exc)
                    self.state.error = str(exc)
                self.write_state()
                changed = False
                with contextlib.suppress(queue.Empty):
                    revision = max(revision, self._events.get(timeout=RESYNC_SECONDS))
                    changed = True
                    while True:
                        revision = max(revision, self._events.get_nowait())
                if changed and not self._stop.is_set():
                    with contextlib.suppress(httpx.HTTPError):
                        revision, objects = self._list()
        finally:
            self.teardown()

    def teardown(self) -> None:
        for proxy in self._node_proxies.values():
            proxy.stop()
        for key in list(self.state.pods):
            self._remove_pod(key)
        removed = self.net.delete_everything()
        log.info("removed %d network namespaces", len(removed))
        self.state.pods.clear()
        self.state.nodes.clear()
        self.state.ready = False
        self.write_state()
