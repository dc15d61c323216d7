"""The runtime agent: what kubelet and kube-proxy do, for a cluster of network namespaces.

It lists and watches the control plane's objects and makes the host match them: a namespace
per Node, a namespace and a running process per Workload (restarted with back-off when it
exits), Service DNAT in every node, and each pod's hosts file. Reconciliation is
level-triggered: on any change it compares the whole desired state with what exists, so a
missed event cannot leave the host wrong for long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshway.config.model import KINDS, Node, Resource, Service, Workload
from meshway.config.selection import service_endpoints
from meshway.runtime import host
from meshway.runtime.dns import ServiceName, hosts_file, resolv_conf
from meshway.runtime.network import ClusterNames, ClusterNetwork, NodeAddress, node_ip

log = logging.getLogger(__name__)

RESYNC_SECONDS = 1.0
MAX_BACKOFF = 30.0


@dataclass
class PodState:
    namespace: str
    name: str
    node: str
    ip: str
    netns: str
    command: list[str]
    pid: int | None = None
    phase: str = "Pending"
    restarts: int = 0
    started_at: float | None = None
    next_start: float = 0.0
    last_exit: int | None = None


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
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._events: queue.Queue[int] = queue.Queue()
        self._stop = threading.Event()
        self._program: dict[str, str] = {}

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
        self.state.nodes = {
            n.name: {"ip": n.ip, "podCIDR": n.pod_cidr, "netns": self.names.node_ns(n.name)}
            for n in addresses
        }

        wanted = {f"{w.metadata.namespace}/{w.metadata.name}": w for w in workloads}
        for key in [k for k in self.state.pods if k not in wanted]:
            self._remove_pod(key)
        for key, wl in wanted.items():
            self._ensure_pod(key, wl)

        # Service VIPs on every node, and every pod's names.
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
        command = list(wl.spec.command)
        if pod is not None and (pod.command != command or pod.node != wl.spec.node_name):
            self._stop_process(key)
            pod.command = command
            pod.restarts = 0
            pod.next_start = 0.0
        if pod is None:
            netns = self.net.ensure_pod(
                wl.spec.node_name, ns, wl.metadata.name, str(wl.status.pod_ip)
            )
            host.write_netns_file(netns, "resolv.conf", resolv_conf(ns, self.cluster_domain))
            pod = PodState(
                ns, wl.metadata.name, wl.spec.node_name, str(wl.status.pod_ip), netns, command
            )
            self.state.pods[key] = pod
        self._supervise(key, pod, wl)

    def _supervise(self, key: str, pod: PodState, wl: Workload) -> None:
        proc = self._procs.get(key)
        if proc is not None and proc.poll() is None:
            pod.phase = "Running"
            return
        if proc is not None:
            pod.last_exit = proc.returncode
            self._procs.pop(key)
            pod.pid = None
            pod.restarts += 1
            backoff = min(MAX_BACKOFF, 2.0 ** min(pod.restarts - 1, 5))
            pod.next_start = time.monotonic() + backoff
            pod.phase = "CrashLoopBackOff" if pod.restarts > 1 else "Restarting"
            log.warning("pod %s exited with %s; restarting in %.0fs", key, proc.returncode, backoff)
        if time.monotonic() < pod.next_start:
            return
        env = {
            **os.environ,
            **wl.spec.env,
            "POD_NAME": pod.name,
            "POD_NAMESPACE": pod.namespace,
            "POD_IP": pod.ip,
            "NODE_NAME": pod.node,
        }
        cwd = wl.spec.working_dir or str(self.dir)
        log_file = (self.logs / f"{pod.namespace}.{pod.name}.log").open("ab")
        try:
            started = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, *pod.command],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            pod.phase = f"Failed: {exc}"
            pod.next_start = time.monotonic() + MAX_BACKOFF
            return
        finally:
            log_file.close()
        self._procs[key] = started
        pod.pid = started.pid
        pod.started_at = time.time()
        pod.phase = "Running"

    def _stop_process(self, key: str) -> None:
        proc = self._procs.pop(key, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _remove_pod(self, key: str) -> None:
        pod = self.state.pods.pop(key)
        self._stop_process(key)
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
            "pods": {k: asdict(p) for k, p in sorted(self.state.pods.items())},
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
        for key in list(self.state.pods):
            self._remove_pod(key)
        removed = self.net.delete_everything()
        log.info("removed %d network namespaces", len(removed))
        self.state.pods.clear()
        self.state.nodes.clear()
        self.state.ready = False
        self.write_state()
