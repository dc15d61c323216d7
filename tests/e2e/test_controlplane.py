"""The control plane as a user meets it: a real process, the real CLI, real gRPC and TLS."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meshway.controlplane.launcher import ControlPlaneProcess
from meshway.identity.caclient import CaClient
from meshway.identity.spiffe import SpiffeId
from meshway.xds.channel import GrpcError, StatusCode
from meshway.xds.client import Update, XdsClient
from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE, node_proxy_types

from .conftest import EXAMPLES, Cli

pytestmark = pytest.mark.e2e


def items(cli: Cli, *args: str) -> list[dict[str, Any]]:
    return json.loads(cli.ok("get", *args, "-o", "json"))["items"]


def join(cli: Cli, tmp_path: Path, node: str) -> dict[str, str]:
    path = tmp_path / f"{node}.yaml"
    cli.ok("node", "join", node, "-o", str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    creds: dict[str, str] = yaml.safe_load(path.read_text())
    return creds


def xds_client(creds: dict[str, str], validators: tuple[Any, ...] = ()) -> XdsClient:
    return XdsClient(
        creds["xdsAddress"],
        creds["node"],
        node_proxy_types(extra_address=validators),
        token=creds["credential"],
        root_certificates=creds["trustBundle"].encode(),
    )


async def until(predicate: Any, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.02)


def workload_doc(name: str, node: str, labels: dict[str, str], sa: str = "client") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "meshway.io/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"serviceAccountName": sa, "nodeName": node, "command": ["sleep", "60"]},
        }
    )


# -- apply, get, delete ------------------------------------------------------------------------


def test_apply_assigns_addresses_and_is_idempotent(cli: Cli) -> None:
    first = cli.ok("apply", "-f", str(EXAMPLES))
    assert "workload/shop/frontend created" in first
    again = cli.ok("apply", "-f", str(EXAMPLES))
    assert "created" not in again and "configured" not in again
    assert "workload/shop/frontend unchanged" in again

    nodes = {n["metadata"]["name"]: n["status"]["podCIDR"] for n in items(cli, "nodes")}
    assert set(nodes) == {"node-1", "node-2"}
    cidrs = {ipaddress.ip_network(c) for c in nodes.values()}
    assert len(cidrs) == 2 and all(
        c.subnet_of(ipaddress.ip_network("10.244.0.0/16")) for c in cidrs
    )

    workloads = items(cli, "workloads", "-n", "shop")
    ips = [w["status"]["podIP"] for w in workloads]
    # Four pods from the manifest and the waypoint the control plane deploys for its Gateway.
    assert len(set(ips)) == len(ips) == 5
    for w in workloads:
        node_cidr = ipaddress.ip_network(nodes[w["spec"]["nodeName"]])
        assert ipaddress.ip_address(w["status"]["podIP"]) in node_cidr

    services = items(cli, "svc", "-n", "shop")
    vips = {s["spec"]["clusterIP"] for s in services}
    assert len(vips) == len(services)
    assert all(ipaddress.ip_address(v) in ipaddress.ip_network("10.96.0.0/16") for v in vips)

    # Updating a workload keeps its IP; re-applying a Service without clusterIP keeps its VIP.
    before = {w["metadata"]["name"]: w["status"]["podIP"] for w in workloads}
    cli.ok("apply", "-f", "-", stdin=workload_doc("client", "node-1", {"app": "client", "x": "1"}))
    after = {w["metadata"]["name"]: w["status"]["podIP"] for w in items(cli, "wl", "-n", "shop")}
    assert after == before


def test_table_and_yaml_output(cli: Cli) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    table = cli.ok("get", "workloads", "-n", "shop")
    assert table.splitlines()[0].split()[:4] == ["NAMESPACE", "NAME", "NODE", "IP"]
    doc = yaml.safe_load(cli.ok("get", "ap", "backend-allow-frontend", "-n", "shop", "-o", "yaml"))
    assert doc["kind"] == "AuthorizationPolicy"
    assert doc["metadata"]["resourceVersion"]
    # What `get -o yaml` prints can be applied back unchanged.
    assert "unchanged" in cli.ok("apply", "-f", "-", stdin=yaml.safe_dump(doc))


def test_invalid_apply_is_rejected_whole_and_good_config_stays(cli: Cli, tmp_path: Path) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    before = cli.ok("get", "all", "-A", "-o", "json")
    bad = tmp_path / "change.yaml"
    bad.write_text(
        workload_doc("client", "node-1", {"app": "client", "changed": "yes"})
        + "---\n"
        + "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: broken, namespace: shop}\n"
        "spec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/33]}\n"
        + "---\n"
        + "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: split, namespace: shop}\n"
        "spec:\n  hosts: [backend]\n  http:\n  - route:\n"
        "    - {destination: {host: backend, subset: v1}, weight: 80}\n"
        "    - {destination: {host: backend, subset: v2}, weight: 30}\n"
    )
    result = cli("apply", "-f", str(bad))
    assert result.returncode == 1
    lines = [ln.strip() for ln in result.stderr.splitlines()]
    assert any(
        ln.startswith(f"{bad}: document 2 (AuthorizationPolicy shop/broken): ")
        and "spec.rules[0].from[0].source.ipBlocks[0]" in ln
        for ln in lines
    ), result.stderr
    assert any(
        f"{bad}: document 3 (VirtualService shop/split)" in ln and "100" in ln for ln in lines
    ), result.stderr
    assert "nothing was changed" in result.stderr
    # The valid change to `client` in the same file was not applied either.
    assert cli.ok("get", "all", "-A", "-o", "json") == before


def test_reference_errors(cli: Cli) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    result = cli(
        "apply", "-f", "-", stdin=workload_doc("ghost", "node-9", {"app": "x"}, sa="nobody")
    )
    assert result.returncode == 1
    assert "node-9" in result.stderr and "nobody" in result.stderr
    assert "document 1 (Workload shop/ghost)" in result.stderr

    # Deleting a namespace that still holds objects is refused, naming what is left.
    result = cli("delete", "namespace", "shop")
    assert result.returncode == 1 and "shop" in result.stderr
    # Deleting everything in one go is fine.
    out = cli.ok("delete", "-f", str(EXAMPLES))
    assert "namespace/shop deleted" in out
    assert items(cli, "workloads", "-A") == []


def test_cli_errors_and_exit_codes(cli: Cli, controlplane: ControlPlaneProcess) -> None:
    missing = cli("get", "workload", "nope", "-n", "shop")
    assert missing.returncode == 1 and "not found" in missing.stderr
    unknown = cli("get", "gizmos")
    assert unknown.returncode == 2 and "known kinds" in unknown.stderr.lower()
    not_found = cli("delete", "workload", "nope")
    assert not_found.returncode == 1 and "not found" in not_found.stderr
    assert cli("delete", "workload", "nope", "--ignore-not-found").returncode == 0
    no_file = cli("apply", "-f", "/nonexistent/x.yaml")
    assert no_file.returncode == 1 and "/nonexistent/x.yaml" in no_file.stderr

    wrong_token = cli("get", "ns", "--token", "wrong")
    assert wrong_token.returncode == 1 and "admin token" in wrong_token.stderr
    down = cli("get", "ns", "--server", "http://127.0.0.1:9")
    assert down.returncode == 3 and "cannot reach the control plane" in down.stderr


def test_dry_run(cli: Cli) -> None:
    out = cli.ok("apply", "--dry-run", "-f", str(EXAMPLES))
    assert "created (dry run)" in out
    assert items(cli, "workloads", "-A") == []


# -- persistence and watch ---------------------------------------------------------------------


def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ControlPlaneProcess(state, log_path=tmp_path / "cp1.log") as cp:
        cli = Cli(cp)
        cli.ok("apply", "-f", str(EXAMPLES))
        objects = cli.ok("get", "all", "-A", "-o", "json")
        bundle = httpx.get(f"{cp.server}/api/v1/trust-bundle").text
    with ControlPlaneProcess(state, log_path=tmp_path / "cp2.log") as cp:
        cli = Cli(cp)
        assert cli.ok("get", "all", "-A", "-o", "json") == objects  # same versions, same IPs
        assert httpx.get(f"{cp.server}/api/v1/trust-bundle").text == bundle  # same root CA
        assert "unchanged" in cli.ok("apply", "-f", str(EXAMPLES))


def test_watch_stream_is_ordered(cli: Cli, controlplane: ControlPlaneProcess) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    since = json.loads(cli.ok("get", "ns", "-o", "json"))
    revision = httpx.get(
        f"{controlplane.server}/debug/config",
        headers={"Authorization": f"Bearer {controlplane.token}"},
    ).json()["revision"]
    assert since["items"]
    cli.ok("apply", "-f", "-", stdin=workload_doc("w1", "node-1", {"app": "a"}))
    cli.ok("apply", "-f", "-", stdin=workload_doc("w1", "node-1", {"app": "b"}))
    cli.ok("delete", "workload", "w1", "-n", "shop")
    events = []
    with httpx.stream(
        "GET",
        f"{controlplane.server}/api/v1/watch",
        params={"since": revision},
        headers={"Authorization": f"Bearer {controlplane.token}"},
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            events.append(json.loads(line))
            if len(events) == 3:
                break
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "w1"),
        ("MODIFIED", "w1"),
        ("DELETED", "w1"),
    ]
    revisions = [e["revision"] for e in events]
    assert revisions == sorted(revisions) and revisions[0] == revision + 1
    too_old = httpx.get(
        f"{controlplane.server}/api/v1/watch",
        params={"since": -5},
        headers={"Authorization": f"Bearer {controlplane.token}"},
    )
    assert too_old.status_code == 410


# -- certificates --------------------------------------------------------------------------------


def test_certificate_issuance_verified_by_openssl(cli: Cli, tmp_path: Path) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    creds = tmp_path / "node-1.yaml"
    cli.ok("node", "join", "node-1", "-o", str(creds))
    out = tmp_path / "certs"
    cli.ok(
        "cert", "request", "--credentials", str(creds),
        "--identity", "spiffe://cluster.local/ns/shop/sa/frontend", "--out-dir", str(out),
    )  # fmt: skip
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            out / "root-cert.pem",
            out / "cert-chain.pem",
        ],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", out / "cert-chain.pem", "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "URI:spiffe://cluster.local/ns/shop/sa/frontend" in san
    assert "DNS:" not in san and "IP Address:" not in san


async def test_node_restriction_and_bad_credentials(cli: Cli, tmp_path: Path) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    creds = join(cli, tmp_path, "node-1")
    bundle = creds["trustBundle"].encode()
    client = CaClient(creds["xdsAddress"], creds["credential"], bundle)
    try:
        ok = await client.fetch(SpiffeId("cluster.local", "shop", "client"))
        assert ok.cert_chain_pem and ok.trust_bundle_pem
        with pytest.raises(GrpcError) as denied:
            await client.fetch(SpiffeId("cluster.local", "shop", "backend"))  # on node-2
        assert denied.value.code is StatusCode.PERMISSION_DENIED
        assert "not" in denied.value.details and "node-1" in denied.value.details
        with pytest.raises(GrpcError) as foreign:
            await client.fetch(SpiffeId("other.domain", "shop", "client"))
        assert foreign.value.code is StatusCode.PERMISSION_DENIED
    finally:
        await client.close()

    # A re-join revokes the old credential.
    join(cli, tmp_path, "node-1")
    stale = CaClient(creds["xdsAddress"], creds["credential"], bundle)
    try:
        with pytest.raises(GrpcError) as revoked:
            await stale.fetch(SpiffeId("cluster.local", "shop", "client"))
        assert revoked.value.code is StatusCode.UNAUTHENTICATED
    finally:
        await stale.close()
    forged = CaClient(creds["xdsAddress"], "mwn1.node-1.forged", bundle)
    try:
        with pytest.raises(GrpcError) as bad:
            await forged.fetch(SpiffeId("cluster.local", "shop", "client"))
        assert bad.value.code is StatusCode.UNAUTHENTICATED
    finally:
        await forged.close()


# -- xDS -----------------------------------------------------------------------------------------


async def test_xds_full_snapshot_then_only_the_change(cli: Cli, tmp_path: Path) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    client = xds_client(join(cli, tmp_path, "node-1"))
    updates: list[Update] = []
    client.subscribe(updates.append)
    client.start()
    try:
        await client.wait_synced(10)
        addresses = client.snapshot(ADDRESS_TYPE)
        assert {n for n in addresses if "svc" not in n} == {
            "shop/client",
            "shop/frontend",
            "shop/backend-v1",
            "shop/backend-v2",
            "shop/waypoint",
        }
        assert "shop/backend.shop.svc.cluster.local" in addresses
        assert set(client.snapshot(AUTHORIZATION_TYPE)) == {"shop/backend-allow-frontend"}
        updates.clear()

        cli.ok(
            "apply", "-f", "-", stdin=workload_doc("client", "node-1", {"app": "client", "v": "2"})
        )
        await until(lambda: bool(updates))
        await asyncio.sleep(0.3)  # nothing else follows
        assert [(u.type_url, set(u.updated), set(u.removed)) for u in updates] == [
            (ADDRESS_TYPE, {"shop/client"}, set())
        ]
        assert client.snapshot(ADDRESS_TYPE)["shop/client"].workload.labels["v"] == "2"

        status = cli.ok("proxy-status")
        assert "node-1" in status and status.count("SYNCED") >= 2

        cli.ok("delete", "workload", "client", "-n", "shop")
        await until(lambda: "shop/client" not in client.snapshot(ADDRESS_TYPE))
    finally:
        await client.close()


async def test_xds_nack_is_reported_and_last_good_state_kept(
    cli: Cli, controlplane: ControlPlaneProcess, tmp_path: Path
) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))

    def refuse_canary(name: str, msg: Any) -> None:
        if msg.WhichOneof("type") == "workload" and msg.workload.labels.get("track") == "canary":
            raise ValueError("canary workloads are not supported by this proxy")

    client = xds_client(join(cli, tmp_path, "node-1"), (refuse_canary,))
    client.start()
    try:
        await client.wait_synced(10)
        cli.ok(
            "apply",
            "-f",
            "-",
            stdin=workload_doc("client", "node-1", {"app": "client", "track": "canary"}),
        )
        headers = {"Authorization": f"Bearer {controlplane.token}"}

        def address_state() -> dict[str, Any]:
            proxies = httpx.get(f"{controlplane.server}/debug/syncz", headers=headers).json()[
                "proxies"
            ]
            state: dict[str, Any] = proxies[0]["types"][ADDRESS_TYPE]
            return state

        await until(lambda: address_state()["status"] == "NACKED")
        assert "canary workloads are not supported" in address_state()["error"]
        assert "track" not in client.snapshot(ADDRESS_TYPE)["shop/client"].workload.labels
        assert "NACKED" in cli.ok("proxy-status")
        metrics = httpx.get(f"{controlplane.server}/metrics").text
        assert "meshway_xds_nacks_total" in metrics

        cli.ok(
            "apply",
            "-f",
            "-",
            stdin=workload_doc("client", "node-1", {"app": "client", "track": "stable"}),
        )
        await until(lambda: address_state()["status"] == "SYNCED")
        assert client.snapshot(ADDRESS_TYPE)["shop/client"].workload.labels["track"] == "stable"
    finally:
        await client.close()


async def test_xds_refuses_a_stream_without_credentials(controlplane: ControlPlaneProcess) -> None:
    bundle = httpx.get(f"{controlplane.server}/api/v1/trust-bundle").content
    client = XdsClient(
        controlplane.grpc_address, "node-1", node_proxy_types(), root_certificates=bundle
    )
    client.start()
    try:
        # The client keeps retrying; gRPC can report a refusal racing the client's first
        # write as INTERNAL, so wait for an attempt that carries the server's status.
        await until(lambda: "UNAUTHENTICATED" in (client.last_error or ""))
        assert not client.snapshot(ADDRESS_TYPE)
    finally:
        await client.close()


# -- admin -----------------------------------------------------------------------------------------


def test_admin_endpoints(cli: Cli, controlplane: ControlPlaneProcess, tmp_path: Path) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    base = controlplane.server
    assert httpx.get(f"{base}/healthz").text.strip() == "ok"
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/debug/config").status_code == 401  # needs the admin token
    creds = tmp_path / "n.yaml"
    cli.ok("node", "join", "node-1", "-o", str(creds))
    cli.ok("cert", "request", "--credentials", str(creds), "--identity",
           "spiffe://cluster.local/ns/shop/sa/client", "--out-dir", str(tmp_path))  # fmt: skip
    cli("cert", "request", "--credentials", str(creds), "--identity",
        "spiffe://cluster.local/ns/shop/sa/backend", "--out-dir", str(tmp_path))  # fmt: skip
    cli("apply", "-f", "-", stdin="kind: Nope\n")
    metrics = httpx.get(f"{base}/metrics").text
    for name in (
        "meshway_xds_connected_proxies",
        "meshway_xds_pushes_total",
        "meshway_xds_push_latency_seconds_bucket",
        "meshway_certificates_issued_total 1.0",
        'meshway_certificates_refused_total{reason="not-on-node"} 1.0',
        'meshway_config_rejections_total{operation="apply"} 1.0',
        'meshway_config_objects{kind="Workload"} 5.0',
        "process_resident_memory_bytes",
    ):
        assert name in metrics, name
    config = httpx.get(
        f"{base}/debug/config", headers={"Authorization": f"Bearer {controlplane.token}"}
    ).json()
    assert config["trustDomain"] == "cluster.local" and config["nodes"] == ["node-1"]
    assert config["xds"][ADDRESS_TYPE] == 10  # 5 workloads + 5 services (one of each: the waypoint)


def test_endpoints_follow_selectors(cli: Cli) -> None:
    cli.ok("apply", "-f", str(EXAMPLES))
    eps = json.loads(cli.ok("get", "endpoints", "-n", "shop", "-o", "json"))["items"]
    by_service = {e["service"]: e["endpoints"] for e in eps}
    assert {e["workload"] for e in by_service["backend"]} == {"backend-v1", "backend-v2"}
    assert [e["workload"] for e in by_service["backend-v2"]] == ["backend-v2"]
    ip = next(e["ip"] for e in by_service["backend"] if e["workload"] == "backend-v1")
    table = cli.ok("get", "ep", "-n", "shop")
    assert f"{ip}:8080" in table
    # A label change moves the workload out of the service.
    retired = workload_doc("backend-v1", "node-2", {"app": "retired"}, sa="backend")
    cli.ok("apply", "-f", "-", stdin=retired)
    eps = json.loads(cli.ok("get", "ep", "backend", "-n", "shop", "-o", "json"))["items"]
    assert [e["workload"] for e in eps[0]["endpoints"]] == ["backend-v2"]


def test_version(cli: Cli) -> None:
    out = cli.ok("version")
    assert "client: 0.1.0" in out and "control plane: 0.1.0" in out


def test_garbage_on_every_port_leaves_the_control_plane_serving(
    cli: Cli, controlplane: ControlPlaneProcess
) -> None:
    import socket

    for port in (controlplane.grpc_port, controlplane.admin_port):
        for payload in (
            b"\x16\x03\x01\x00\xff" + b"\x00" * 300,
            b"GARBAGE\r\n\r\n" * 100,
            b"\xff" * 70000,
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                try:
                    s.sendall(payload)
                    s.settimeout(5)
                    while s.recv(65536):
                        pass
                except OSError:
                    pass  # a reset is a fine answer to garbage
    bad_json = httpx.post(
        f"{controlplane.server}/api/v1/apply",
        content=b"{not json",
        headers={"Authorization": f"Bearer {controlplane.token}"},
    )
    assert bad_json.status_code == 400
    assert "sources" in bad_json.json()["error"]
    assert "namespace/default" not in cli.ok("apply", "-f", str(EXAMPLES))
    assert httpx.get(f"{controlplane.server}/readyz").status_code == 200
