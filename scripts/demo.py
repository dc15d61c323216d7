"""`make demo`: a two-node mesh on this host, shown working in plain words, then removed.

The sample app (examples/demo/cluster.yaml): a frontend on node-1 calling a backend on node-2
over HTTP, and a TCP client talking to an echo server, all in an ambient namespace. The demo
shows that the call works, that only TLS crosses between the nodes, that an
AuthorizationPolicy denying the frontend's identity stops it, and that the metrics count it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshway.controlplane.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "demo"
MESHWAY = [sys.executable, "-m", "meshway"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*args: str, check: bool = True, quiet: bool = False) -> str:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ {shown}", flush=True)
    cmd = [*MESHWAY, *args[1:]] if args[0] == "meshway" else list(args)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if not quiet:
        sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo step failed ({proc.returncode})")
    return proc.stdout


def in_netns(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *args], capture_output=True, text=True, check=False
    ).stdout


def call_frontend() -> str:
    return run(
        "meshway",
        "exec",
        "shop/client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "5",
        "http://frontend/",
        check=False,
    )


def show_access_log(path: Path, last: int = 3) -> None:
    """The waypoint's last access-log lines, shortened."""
    time.sleep(0.5)  # the waypoint writes its access log in batches, every 100 ms
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    entries = [json.loads(ln.split("meshway.access: ", 1)[1]) for ln in lines if "access: " in ln]
    for e in entries[-last:]:
        print(
            f"   waypoint: {e.get('method')} {e.get('path')} -> {e.get('response_code')} "
            f"{e.get('response_flags')}  from {e.get('source_principal')} "
            f"to {e.get('upstream_host')} ({e.get('duration_ms')} ms)"
        )


def main() -> int:
    if os.geteuid() != 0:
        print("the demo creates network namespaces: run it as root", file=sys.stderr)
        return 1
    try:
        say("Bring up a two-node cluster (nodes and pods are network namespaces)")
        run(
            "meshway", "cluster", "up", "-f", "examples/demo/cluster.yaml", "--name", CLUSTER,
            "--grpc-port", str(free_port()), "--admin-port", str(free_port()),
        )  # fmt: skip
        run("meshway", "get", "services", "-n", "shop")
        time.sleep(1.5)  # let the node proxies capture the pods
        run("meshway", "proxy-status")

        say("The call works: client -> frontend (node-1) -> backend (node-2)")
        call_frontend()
        print("   The backend saw the frontend's own pod address: the mesh is transparent.")
        client_log = run("meshway", "logs", "shop/client", quiet=True).splitlines()
        print("   The TCP client's log: " + " | ".join(client_log[-2:]))

        say("What the node proxies saw: mutual TLS with SPIFFE identities on both ends")
        state = Path(os.environ.get("MESHWAY_STATE_DIR", Path.home() / ".local/state/meshway"))
        node2 = (state / "clusters" / CLUSTER / "logs" / "node.node-2.log").read_text()
        inbound = [
            json.loads(line.split("meshway.connections: ", 1)[1])
            for line in node2.splitlines()
            if "meshway.connections: " in line
        ]
        for conn in [c for c in inbound if c["direction"] == "inbound"][-2:]:
            print(
                f"   {conn['source_identity']} -> {conn['destination_identity']}: "
                f"{conn['decision']}"
            )

        say("Between the nodes there is only TLS (a packet capture on the link)")
        capture_dir = tempfile.TemporaryDirectory(prefix="meshway-demo-")
        pcap = Path(capture_dir.name) / "link.pcap"
        dump = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                f"mw.{CLUSTER}",
                "tcpdump",
                "-i",
                "any",
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
                str(pcap),
                "tcp",
            ],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)
        call_frontend()
        time.sleep(1.0)
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
        data = pcap.read_bytes()
        summary = subprocess.run(
            ["tcpdump", "-r", str(pcap), "-n", "-q"], capture_output=True, text=True
        ).stdout.splitlines()
        ports = sorted(
            {
                m.group(1)
                for line in summary
                for m in re.finditer(r"\.(\d+)[ :]", line)
                if m.group(1) in ("15008", "8080", "80")
            }
        )
        print(f"   {len(summary)} packets captured; ports seen: {', '.join(ports)}")
        capture_dir.cleanup()
        print(
            f"   'hello from backend' in the capture: {b'hello from backend' in data}"
            "  (it crossed inside HBONE, port 15008)"
        )

        say("Deny the frontend's identity at the backend: the call stops")
        policy = ROOT / "examples" / "demo" / "deny-frontend.yaml"
        run("meshway", "apply", "-f", str(policy))
        time.sleep(1.0)
        call_frontend()

        say("The Prometheus metrics of node-2 count it")
        metrics = in_netns(f"mw.{CLUSTER}.node.node-2", "curl", "-s", "127.0.0.1:15020/metrics")
        for line in metrics.splitlines():
            if (
                line.startswith("istio_tcp_connections_opened_total")
                and 'reporter="destination"' in line
            ):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                print(
                    f"   opened {line.rsplit(' ', 1)[1]:>5}  {labels['source_principal']} -> "
                    f"{labels['destination_workload']} ({labels['connection_security_policy']})"
                )
            if line.startswith("meshway_node_rejected_connections_total"):
                print(f"   {line}")

        say("Remove the policy: the call works again")
        run("meshway", "delete", "-f", str(policy))
        time.sleep(1.0)
        call_frontend()

        say("Add a waypoint for L7: the control plane deploys it, the namespace uses it")
        run("meshway", "waypoint", "apply", "-n", "shop", "--enroll-namespace", "--wait")
        run("meshway", "waypoint", "list", "-n", "shop")
        time.sleep(1.0)
        call_frontend()
        waypoint_log = state / "clusters" / CLUSTER / "logs" / "shop.waypoint.log"
        show_access_log(waypoint_log)

        say("L7 policy at the waypoint: only the frontend, only GET /")
        l7 = ROOT / "examples" / "demo" / "l7-policy.yaml"
        run("meshway", "apply", "-f", str(l7))
        time.sleep(1.0)
        call_frontend()
        run(
            "meshway", "exec", "shop/client", "--", "curl", "-s", "-w", "  (HTTP %{http_code})\n",
            "--max-time", "5", "http://backend:8080/", check=False,
        )  # fmt: skip
        show_access_log(waypoint_log)

        say("Remove the waypoint: traffic goes straight to the backend again")
        run("meshway", "delete", "-f", str(l7))
        run("meshway", "waypoint", "delete", "-n", "shop")
        time.sleep(1.0)
        call_frontend()
        return 0
    finally:
        say("Tear everything down")
        run("meshway", "cluster", "down", "--name", CLUSTER, check=False, quiet=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        print(
            "   network namespaces of the demo left: "
            f"{sum(f'mw.{CLUSTER}' in line for line in left.splitlines())}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
