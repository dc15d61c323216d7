"""`python -m meshway.waypoint`: the waypoint process the control plane deploys for a Gateway
of class `istio-waypoint`."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m meshway.waypoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--gateway", required=True, help="NAMESPACE/NAME of the waypoint Gateway")
    parser.add_argument(
        "--credentials",
        type=Path,
        default=os.environ.get("MESHWAY_CREDENTIALS"),
        help="the node credential file (default: $MESHWAY_CREDENTIALS)",
    )
    parser.add_argument(
        "--netns",
        type=Path,
        default=os.environ.get("MESHWAY_NETNS"),
        help="the pod network namespace to listen and connect in (default: $MESHWAY_NETNS;"
        " none: this process's own)",
    )
    parser.add_argument(
        "--ratelimit-store",
        default=os.environ.get("MESHWAY_RATELIMIT_STORE") or None,
        help="the Redis URL of Global rate limits (default: $MESHWAY_RATELIMIT_STORE; none: "
        "Global limits take their policy's failure mode)",
    )
    parser.add_argument("--cluster-domain", default="cluster.local")
    parser.add_argument("--cert-lifetime-seconds", type=int, default=0)
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True,
        help="one JSON line per request on stderr (default: on)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    namespace, slash, name = args.gateway.partition("/")
    if not slash or not namespace or not name:
        raise SystemExit(f"--gateway must be NAMESPACE/NAME, not {args.gateway!r}")
    if args.ratelimit_store:
        from meshway.waypoint.ratelimit_store import store_url_error

        if error := store_url_error(args.ratelimit_store):
            raise SystemExit(f"--ratelimit-store {args.ratelimit_store!r}: {error}")
    if args.credentials is None:
        raise SystemExit("no credentials: pass --credentials or set MESHWAY_CREDENTIALS")
    try:
        creds = json.loads(Path(args.credentials).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {args.credentials} as JSON: {exc}") from exc
    from datetime import timedelta

    import uvloop

    from meshway.waypoint.server import WaypointConfig, run_waypoint

    config = WaypointConfig(
        namespace=namespace,
        name=name,
        xds_address=creds["xdsAddress"],
        token=creds["credential"],
        trust_bundle=creds["trustBundle"].encode(),
        node=creds["node"],
        cluster_domain=args.cluster_domain,
        cert_lifetime=(
            timedelta(seconds=args.cert_lifetime_seconds) if args.cert_lifetime_seconds else None
        ),
        access_log=args.access_log,
        netns=Path(args.netns) if args.netns else None,
        ratelimit_store=args.ratelimit_store,
    )
    uvloop.run(run_waypoint(config))


if __name__ == "__main__":
    main()
