"""`meshway cluster up|down|status`: a whole mesh on one Linux host.

`up` starts the cluster's control plane, its rate limit store (a `redis-server` on loopback,
see `ratelimitstore.py`) and its runtime agent as background processes (their pids, logs and
settings under the cluster's directory), applies the manifests and waits until
every pod runs. `down` stops them, and then sweeps by name anything of the cluster that is
still on the host, so that a crashed agent cannot leave namespaces behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshway.cli.client import default_state_dir
from meshway.controlplane.launcher import ControlPlaneProcess
from meshway.runtime import host
from meshway.runtime.network import ClusterNames
from meshway.runtime.ratelimitstore import RedisServer, stop_pid


class ClusterError(Exception):
    pass


@dataclass
class ClusterSettings:
    name: str
    server: str
    grpc_address: str
    token_file: str
    node_network: str
    controlplane_pid: int
    agent_pid: int = 0
    node_proxy_args: list[str] = field(default_factory=list)
    # The Global rate limits' Redis ("" when redis-server is not installed) and its pid.
    ratelimit_store: str = ""
    ratelimit_store_pid: int = 0


def clusters_dir() -> Path:
    return default_state_dir() / "clusters"


def cluster_dir(name: str) -> Path:
    return clusters_dir() / name


def context_file() -> Path:
    return default_state_dir() / "context.json"


def load_settings(name: str) -> ClusterSettings:
    path = cluster_dir(name) / "cluster.json"
    try:
        return ClusterSettings(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ClusterError(f"cluster '{name}' is not up (no {path})") from None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


def _terminate(pid: int, timeout: float) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def check_host() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the local runtime creates network namespaces: run it as root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` is missing: install iproute2 and nftables (make setup)")


def up(
    name: str,
    sources: list[tuple[str, str]],
    *,
    node_network: str = "10.250.0.0/24",
    grpc_port: int = 15012,
    admin_port: int = 15014,
    controlplane_args: list[str] | None = None,
    node_proxy_args: list[str] | None = None,
    timeout: float = 60.0,
    log: Any = print,
) -> dict[str, Any]:
    """Bring the cluster up and return the agent's state once every pod runs."""
    check_host()
    directory = cluster_dir(name)
    if (directory / "cluster.json").exists():
        settings = load_settings(name)
        if _alive(settings.agent_pid) or _alive(settings.controlplane_pid):
            raise ClusterError(
                f"cluster '{name}' is already up; `meshway cluster down --name {name}` first"
            )
    sweep(name)
    directory.mkdir(parents=True, exist_ok=True)
    cp = ControlPlaneProcess(
        directory / "controlplane",
        extra_args=controlplane_args or [],
        log_path=directory / "controlplane.log",
        grpc_port=grpc_port,
        admin_port=admin_port,
        detach=True,
    )
    try:
        cp.start()
    except (RuntimeError, TimeoutError) as exc:  # e.g. the ports are taken
        shutil.rmtree(directory, ignore_errors=True)
        raise ClusterError(f"the cluster's control plane did not start: {exc}") from exc
    assert cp.proc is not None
    settings = ClusterSettings(
        name=name,
        server=cp.server,
        grpc_address=cp.grpc_address,
        token_file=str(directory / "controlplane" / "admin.token"),
        node_network=node_network,
        controlplane_pid=cp.proc.pid,
        node_proxy_args=list(node_proxy_args or []),
    )
    _save(directory, settings)
    log(f"control plane ready at {cp.server}")
    try:
        if RedisServer.installed():
            store = RedisServer(directory / "ratelimit-store")
            try:
                settings.ratelimit_store_pid = store.start(detach=True)
            except RuntimeError as exc:
                raise ClusterError(f"the cluster's rate limit store did not start: {exc}") from exc
            settings.ratelimit_store = store.url
            _save(directory, settings)
            log(f"rate limit store ready at {store.url}")
        else:
            log("redis-server is not installed: Global rate limits will take their failure mode")
        from meshway.cli.client import ApiError, ControlPlaneClient

        client = ControlPlaneClient(cp.server, cp.token)
        try:
            result = client.apply(sources)
        except ApiError as exc:
            issues = "\n".join(f"  {i['text']}" for i in exc.body.get("issues", []))
            raise ClusterError(f"{exc}:\n{issues}") from exc
        log(f"applied {len(result['results'])} objects")
        agent_log = (directory / "agent.log").open("ab")
        agent = subprocess.Popen(
            [sys.executable, "-m", "meshway", "cluster", "agent", "--name", name],
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        agent_log.close()
        settings.agent_pid = agent.pid
        _save(directory, settings)
        state = wait_ready(name, timeout)
    except BaseException:
        down(name, log=lambda *_: None)
        raise
    context_file().write_text(
        json.dumps({"cluster": name, "server": cp.server, "tokenFile": settings.token_file})
    )
    return state


def _save(directory: Path, settings: ClusterSettings) -> None:
    (directory / "cluster.json").write_text(json.dumps(asdict(settings), indent=2))


def agent_state(name: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((cluster_dir(name) / "agent-state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data


def wait_ready(name: str, timeout: float) -> dict[str, Any]:
    """Until the agent has reconciled and every pod is Running."""
    settings = load_settings(name)
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if not _alive(settings.agent_pid):
            tail = (cluster_dir(name) / "agent.log").read_text(errors="replace")[-2000:]
            raise ClusterError(f"the runtime agent exited:\n{tail}")
        state = agent_state(name)
        pods = state.get("pods", {})
        if state.get("ready") and all(p["phase"] == "Running" for p in pods.values()):
            return state
        time.sleep(0.1)
    pods = json.dumps(state.get("pods", {}))[:2000]
    raise ClusterError(f"cluster '{name}' not ready after {timeout:.0f}s: {pods}")


def sweep(name: str) -> list[str]:
    """Remove whatever of the cluster is still on the host, found by its names."""
    names = ClusterNames(name)
    removed = []
    for ns in names.all_namespaces():
        for pid in host.netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        host.netns_delete(ns)
        removed.append(f"netns {ns}")
    if host.NETNS_ETC.is_dir():
        for leftover in host.NETNS_ETC.iterdir():
            if leftover.name == names.cluster_ns or leftover.name.startswith(names.prefix):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(f"/etc/netns/{leftover.name}")
        with contextlib.suppress(OSError):  # only when empty: other tools may use it too
            host.NETNS_ETC.rmdir()
    return removed


def down(name: str, log: Any = print) -> list[str]:
    directory = cluster_dir(name)
    removed: list[str] = []
    if (directory / "cluster.json").exists():
        settings = load_settings(name)
        _terminate(settings.agent_pid, 30.0)
        _terminate(settings.controlplane_pid, 10.0)
        stop_pid(settings.ratelimit_store_pid)
    removed += sweep(name)
    if directory.exists():
        shutil.rmtree(directory)
        removed.append(str(directory))
    with contextlib.suppress(FileNotFoundError, ValueError):
        if json.loads(context_file().read_text()).get("cluster") == name:
            context_file().unlink()
    for item in removed:
        log(f"removed {item}")
    return removed


def status(name: str) -> dict[str, Any]:
    settings = load_settings(name)
    ready = False
    with contextlib.suppress(httpx.HTTPError):
        ready = httpx.get(f"{settings.server}/readyz", timeout=2).status_code == 200
    return {
        "name": name,
        "controlplane": {
            "server": settings.server,
            "pid": settings.controlplane_pid,
            "ready": ready,
        },
        "agent": {"pid": settings.agent_pid, "alive": _alive(settings.agent_pid)},
        "ratelimitStore": {
            "url": settings.ratelimit_store,
            "pid": settings.ratelimit_store_pid,
            "alive": _alive(settings.ratelimit_store_pid),
        },
        **{
            k: v
            for k, v in agent_state(name).items()
            if k in ("nodes", "pods", "nodeProxies", "sidecars", "error", "revision")
        },
    }


def find_pod(pod: str, namespace: str | None) -> tuple[str, dict[str, Any]]:
    """A pod of the current cluster by `name`, `ns/name`, with -n; returns (cluster, pod)."""
    name = current_cluster()
    if "/" in pod:
        namespace, pod = pod.split("/", 1)
    pods = agent_state(name).get("pods", {})
    key = f"{namespace or 'default'}/{pod}"
    if key in pods:
        return name, pods[key]
    matches = [p for p in pods.values() if p["name"] == pod and namespace is None]
    if len(matches) == 1:
        return name, matches[0]
    raise ClusterError(f"pod '{key}' not found in cluster '{name}'")


def current_cluster() -> str:
    try:
        return str(json.loads(context_file().read_text())["cluster"])
    except (FileNotFoundError, ValueError, KeyError):
        raise ClusterError("no cluster is up: `meshway cluster up -f FILE` first") from None


def log_path(cluster: str, pod: dict[str, Any]) -> Path:
    return cluster_dir(cluster) / "logs" / f"{pod['namespace']}.{pod['name']}.log"
