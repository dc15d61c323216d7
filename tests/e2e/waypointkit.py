"""What the waypoint's end-to-end tests share: pods running the test apps, the waypoint's
log and access log, curl from a client pod, configuration applied for one test."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from .meshcluster import Cluster

APP = str(Path(__file__).parent / "apps" / "l7app.py")
PY = sys.executable


def waypoint_gateway(replicas: int | None = None) -> str:
    """The Gateway `waypoint` of class istio-waypoint in `shop`, for services; with
    `replicas`, the `meshway.io/replicas` annotation."""
    annotations = (
        f'  annotations: {{meshway.io/replicas: "{replicas}"}}\n' if replicas is not None else ""
    )
    return (
        "apiVersion: gateway.networking.k8s.io/v1\n"
        "kind: Gateway\n"
        "metadata:\n"
        "  name: waypoint\n"
        "  namespace: shop\n"
        "  labels: {istio.io/waypoint-for: service}\n" + annotations + "spec:\n"
        "  gatewayClassName: istio-waypoint\n"
        "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n"
    )


def shop_with_waypoint(*service_accounts: str, gateway: bool = True) -> str:
    """Two nodes, the namespace `shop` in ambient mode using the waypoint `waypoint` (a
    Gateway of class istio-waypoint, for services, unless `gateway` is False: the
    namespace then names it before it exists), and these service accounts in it."""
    accounts = "".join(
        f"- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: {sa}, namespace: shop}}}}\n"
        for sa in service_accounts
    )
    return (
        textwrap.dedent("""\
        apiVersion: v1
        kind: Namespace
        metadata:
          name: shop
          labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
        ---
        apiVersion: meshway.io/v1alpha1
        kind: Node
        metadata: {name: node-1}
        ---
        apiVersion: meshway.io/v1alpha1
        kind: Node
        metadata: {name: node-2}
        ---
        """)
        + (waypoint_gateway() + "---\n" if gateway else "")
        + "apiVersion: v1\nkind: List\nitems:\n"
        + accounts
        + "---\n"
    )


def http_service(name: str, selector: str) -> str:
    """A Service on port 80 (appProtocol http) for pods labelled `selector` on 8080."""
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: shop}}
        spec:
          selector: {{{selector}}}
          ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]
        ---
        """)


def workload(name: str, node: str, command: list[str], labels: str = "") -> str:
    return textwrap.dedent(f"""\
        apiVersion: meshway.io/v1alpha1
        kind: Workload
        metadata: {{name: {name}, namespace: shop, labels: {{app: {name.split("-")[0]}{labels}}}}}
        spec:
          serviceAccountName: {name.split("-")[0]}
          nodeName: {node}
          command: {json.dumps(command)}
        ---
        """)


def waypoint_log(cluster: Cluster, pod: str = "waypoint") -> str:
    """The log of a waypoint pod of `shop` (a replica: `waypoint-1`, ...)."""
    path = cluster.directory / "logs" / f"shop.{pod}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def access_log(cluster: Cluster, pod: str = "waypoint") -> list[dict[str, Any]]:
    marker = "meshway.access: "
    return [
        json.loads(line.split(marker, 1)[1])
        for line in waypoint_log(cluster, pod).splitlines()
        if marker in line
    ]


def logged(cluster: Cluster, match: Any, start: int = 0) -> dict[str, Any]:
    """The last access-log entry from `start` on that `match`es, waiting for it: the
    waypoint writes its access log in batches (every 100 ms)."""

    def find() -> dict[str, Any] | None:
        return next((e for e in reversed(access_log(cluster)[start:]) if match(e)), None)

    found: dict[str, Any] = cluster.eventually(find, seconds=5)
    return found


def curl(cluster: Cluster, url: str, *args: str) -> dict[str, Any]:
    """One request from the client pod: status code, headers and body."""
    out = cluster.exec(
        "shop/client-0", "curl", "-s", "-D", "-", "--max-time", "10", *args, url, check=False
    )
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    while head.startswith("HTTP/") and " 100 " in head.split("\n", 1)[0]:
        head, _, body = body.partition("\n\n")
    lines = head.split("\n")
    if not lines or not lines[0].startswith("HTTP/"):
        return {"code": 0, "headers": {}, "body": out}
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return {"code": int(lines[0].split()[1]), "headers": headers, "body": body}


def apply_temporarily(cluster: Cluster, text: str) -> Any:
    """Apply `text` now, delete it when the returned context ends."""

    class _Ctx:
        def __enter__(self) -> None:
            cluster.apply(text)
            time.sleep(1.0)  # within a second, as promised; one push is milliseconds

        def __exit__(self, *exc: object) -> None:
            cluster.delete(text)
            time.sleep(0.5)

    return _Ctx()
