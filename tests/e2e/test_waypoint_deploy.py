"""Deploying a waypoint in the local runtime, as a user does it: `meshway waypoint apply`, the
control plane creates the waypoint's Workload and Service, the runtime starts its process in
the pod's network namespace with the node's credential, `meshway waypoint delete` removes it.

What the waypoint process then does (xDS, certificates, HBONE) is tested in test_waypoint.py;
this test checks what the control plane and the runtime guarantee, whether or not that process
stays up.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshway.runtime import host
from meshway.runtime.network import ClusterNames

from .meshcluster import Cluster, running_cluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-1}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-2}
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {name: app, namespace: shop, labels: {app: app}}
spec: {nodeName: node-1, command: [sleep, infinity]}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("waypoint-deploy"), MANIFEST) as c:
        yield c


def get_json(cluster: Cluster, *args: str) -> Any:
    result = cluster.meshway("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def proc_file(pid: int, name: str) -> list[str]:
    return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace").split("\0")


def started_process(netns: str, seconds: float = 45.0) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a process running in `netns`.

    Polled fast: a waypoint process that exits at once (and is restarted with back-off) must
    still be seen while it lives.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for pid in host.netns_pids(netns):
            try:
                cmdline = proc_file(pid, "cmdline")
                environ = proc_file(pid, "environ")
            except OSError:  # it exited between the listing and the read
                continue
            if cmdline[1:3] == ["netns", "exec"]:  # caught before `ip` exec'd the command
                continue
            env = dict(item.split("=", 1) for item in environ if "=" in item)
            return cmdline, env
        time.sleep(0.02)
    raise AssertionError(f"no process seen in {netns} within {seconds}s")


def test_waypoint_apply_runs_it_and_delete_removes_it(cluster: Cluster) -> None:
    names = ClusterNames(cluster.name)
    out = cluster.meshway("waypoint", "apply", "-n", "shop", "--enroll-namespace").stdout
    assert "waypoint shop/waypoint applied" in out

    # `apply` returns once the control plane has made the waypoint's objects.
    workload = get_json(cluster, "wl", "waypoint", "-n", "shop")
    service = get_json(cluster, "svc", "waypoint", "-n", "shop")
    assert workload["metadata"]["annotations"] == {"meshway.io/managed-by": "Gateway/waypoint"}
    assert workload["metadata"]["labels"]["meshway.io/proxy"] == "waypoint"
    assert workload["spec"]["command"][1:] == [
        "-m",
        "meshway.waypoint",
        "--gateway",
        "shop/waypoint",
    ]
    assert {p["port"] for p in service["spec"]["ports"]} == {15008, 15020}
    node = workload["spec"]["nodeName"]
    assert node == "node-2"  # node-1 already runs `app`
    namespace = get_json(cluster, "ns", "shop")
    assert namespace["metadata"]["labels"]["istio.io/use-waypoint"] == "waypoint"

    # The runtime starts it beside the pod (like a node proxy: it must reach the control
    # plane), with its sockets in the pod's network namespace and the node's credential file.
    netns = names.pod_ns("shop", "waypoint")
    state = cluster.wait(lambda s: (s["pods"].get("shop/waypoint") or {}).get("pid"))
    pid = state["pods"]["shop/waypoint"]["pid"]
    cmdline, environ = proc_file(pid, "cmdline"), proc_file(pid, "environ")
    env = dict(item.split("=", 1) for item in environ if "=" in item)
    assert cmdline[1:5] == ["-m", "meshway.waypoint", "--gateway", "shop/waypoint"]
    assert env["MESHWAY_NETNS"] == str(host.NETNS_DIR / netns)
    # It serves HBONE inside the pod's namespace, and its Gateway becomes Programmed.
    cluster.eventually(lambda: ":15008 " in cluster.in_netns(netns, "ss", "-ltn"), seconds=30)
    credentials = Path(env["MESHWAY_CREDENTIALS"])
    assert credentials == cluster.directory / "nodes" / f"{node}.yaml"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert json.loads(credentials.read_text())["node"] == node
    assert (env["POD_NAMESPACE"], env["POD_NAME"], env["NODE_NAME"]) == ("shop", "waypoint", node)
    # Any other pod runs without it.
    _, app_env = started_process(names.pod_ns("shop", "app"))
    assert "MESHWAY_CREDENTIALS" not in app_env

    # The runtime reports phases back; the Gateway's status carries the waypoint's address.
    cluster.eventually(
        lambda: get_json(cluster, "wl", "app", "-n", "shop")["status"]["phase"] == "Running"
    )
    (row,) = json.loads(cluster.meshway("waypoint", "list", "-n", "shop", "-o", "json").stdout)[
        "items"
    ]
    assert (row["node"], row["address"]) == (node, service["spec"]["clusterIP"])
    cluster.eventually(
        lambda: (
            json.loads(cluster.meshway("waypoint", "list", "-n", "shop", "-o", "json").stdout)[
                "items"
            ][0]["programmed"]
            == "True"
        ),
        seconds=30,
    )

    # The user cannot remove the waypoint's parts by hand ...
    refused = cluster.meshway("delete", "svc", "waypoint", "-n", "shop", check=False)
    assert refused.returncode == 1 and "managed by Gateway shop/waypoint" in refused.stderr

    # ... and deleting the waypoint removes them, the pod and the namespace label.
    out = cluster.meshway("waypoint", "delete", "-n", "shop").stdout
    assert "waypoint shop/waypoint deleted" in out
    assert get_json(cluster, "wl", "waypoint", "-n", "shop") is None
    assert get_json(cluster, "svc", "waypoint", "-n", "shop") is None
    assert "istio.io/use-waypoint" not in get_json(cluster, "ns", "shop")["metadata"]["labels"]
    cluster.wait(lambda s: "shop/waypoint" not in s["pods"])
    assert not host.netns_exists(netns)
    assert host.netns_exists(names.pod_ns("shop", "app"))
