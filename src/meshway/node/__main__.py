"""`python -m meshway.node`: the node proxy's own lean entry point.

The same as `meshway node run`, without loading the CLI's libraries (typer, rich, httpx, the
configuration model): the runtime starts node proxies and sidecars this way, because every
megabyte of a per-node (or per-pod) process counts.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m meshway.node", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--credentials", type=Path, required=True, help="from `meshway node join -o`"
    )
    parser.add_argument("--pod-netns", default="/run/netns/{namespace}.{name}")
    parser.add_argument("--listen-netns", type=Path, default=None)
    parser.add_argument("--cert-lifetime-seconds", type=int, default=0)
    parser.add_argument("--only-pod", default=None, help="sidecar mode: NAMESPACE/NAME")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        # The credential file is YAML from `node join -o`, or JSON (a subset of YAML) when the
        # runtime wrote it; only JSON is read here, to stay lean.
        creds = json.loads(args.credentials.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {args.credentials} as JSON: {exc}") from exc
    import uvloop

    from meshway.node.main import run_node

    uvloop.run(
        run_node(
            creds, args.pod_netns, args.listen_netns, args.cert_lifetime_seconds, args.only_pod
        )
    )


if __name__ == "__main__":
    main()
