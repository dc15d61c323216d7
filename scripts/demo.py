"""`make demo`: a control plane with the example mesh, shown working, then stopped cleanly.

Until the node proxy lands this shows the control plane on its own: configuration applied and
validated, addresses assigned, a node joined, a workload certificate issued over gRPC (and
checked with openssl), a refused request, and the xDS state a node receives.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshway.controlplane.launcher import ControlPlaneProcess

ROOT = Path(__file__).resolve().parent.parent
MESHWAY = [sys.executable, "-m", "meshway"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(args: list[str], env: dict[str, str], check: bool = True) -> int:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ {shown}", flush=True)
    cmd = MESHWAY + args[1:] if args[0] == "meshway" else args
    code = subprocess.run(cmd, env=env, cwd=ROOT, check=False).returncode
    if check and code != 0:
        raise SystemExit(f"demo step failed with exit code {code}")
    return code


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="meshway-demo-"))
    cp = ControlPlaneProcess(work / "state")
    try:
        step("Start the control plane")
        cp.start()
        env = cp.env()
        print(f"control plane ready: admin {cp.server}, xDS+CA grpcs://{cp.grpc_address}")

        step("Apply the example mesh (validated as a whole)")
        run(["meshway", "apply", "-f", "examples/"], env)

        step("Stored resources, with the addresses the control plane assigned")
        run(["meshway", "get", "nodes"], env)
        run(["meshway", "get", "workloads", "-A"], env)
        run(["meshway", "get", "services", "-A"], env)
        run(["meshway", "get", "endpoints", "-n", "shop"], env)
        run(["meshway", "get", "all", "-n", "shop"], env)

        step("A bad config is rejected with the file, document, object and field")
        bad = work / "bad.yaml"
        bad.write_text(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: typo, namespace: shop}\n"
            "spec:\n  rules:\n  - from:\n    - source: {principal: [cluster.local/ns/shop/sa/x]}\n"
        )
        run(["meshway", "apply", "-f", str(bad)], env, check=False)

        step("Join node-1 and request a certificate for a workload on it")
        creds = work / "node-1.yaml"
        run(["meshway", "node", "join", "node-1", "-o", str(creds)], env)
        certs = work / "certs"

        def cert_request(service_account: str, check: bool = True) -> int:
            identity = f"spiffe://cluster.local/ns/shop/sa/{service_account}"
            args = ["--credentials", str(creds), "--identity", identity, "--out-dir", str(certs)]
            return run(["meshway", "cert", "request", *args], env, check=check)

        cert_request("frontend")
        chain, root = str(certs / "cert-chain.pem"), str(certs / "root-cert.pem")
        fields = ["-subject", "-issuer", "-dates", "-ext", "subjectAltName,extendedKeyUsage"]
        run(["openssl", "x509", "-in", chain, "-noout", *fields], env)
        run(["openssl", "verify", "-CAfile", root, chain], env)

        step("node-1 may not obtain an identity of a workload scheduled elsewhere")
        cert_request("backend", check=False)

        step("node-1 connects over xDS; a change pushes only the changed workload")
        print(f"$ meshway node xds --credentials {creds} --follow 4 &", flush=True)
        watcher = subprocess.Popen(
            [*MESHWAY, "node", "xds", "--credentials", str(creds), "--follow", "4"], env=env
        )
        time.sleep(1.5)
        run(["meshway", "proxy-status"], env)
        change = work / "change.yaml"
        change.write_text(
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            "metadata: {name: client, namespace: shop, labels: {app: client, rollout: canary}}\n"
            "spec:\n  serviceAccountName: client\n  nodeName: node-1\n"
            '  command: ["python3", "-m", "http.server", "8000"]\n'
        )
        run(["meshway", "apply", "-f", str(change)], env)
        watcher.wait(timeout=30)

        step("Stop the control plane")
        code = cp.stop()
        print(f"control plane exited with code {code}")
        return 0 if code == 0 else 1
    finally:
        cp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
