"""The `meshway` command.

Exit codes: 0 success; 1 the control plane refused (invalid config, not found, denied);
2 bad usage; 3 the control plane could not be reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table

from meshway import __version__
from meshway.cli.client import ApiError, ControlPlaneClient, Unreachable, default_state_dir

app = typer.Typer(
    name="meshway",
    help="Meshway: a sidecarless service mesh.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
node_app = typer.Typer(help="Node membership.", no_args_is_help=True)
cert_app = typer.Typer(help="Workload certificates.", no_args_is_help=True)
cluster_app = typer.Typer(
    help="The local runtime: a mesh in network namespaces.", no_args_is_help=True
)
waypoint_app = typer.Typer(
    help="Waypoints: the L7 proxies of a namespace (as `istioctl waypoint`).",
    no_args_is_help=True,
)
app.add_typer(node_app, name="node")
app.add_typer(cert_app, name="cert")
app.add_typer(cluster_app, name="cluster")
app.add_typer(waypoint_app, name="waypoint")

# Tables keep their columns when piped (rich would otherwise squeeze them to 80).
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ServerOpt = Annotated[
    str | None, typer.Option("--server", envvar="MESHWAY_SERVER", help="Admin API URL.")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="MESHWAY_TOKEN", help="Admin token.", show_default=False),
]
FilesOpt = Annotated[list[Path], typer.Option("-f", "--filename", help="A YAML file or directory.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", markup=True)
    raise typer.Exit(code)


def _call(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run an API call, turning its failures into messages and exit codes."""
    try:
        result: dict[str, Any] = fn(*args, **kwargs)
    except Unreachable as exc:
        _fail(str(exc), 3)
    except ApiError as exc:
        issues = exc.body.get("issues")
        if issues:
            err.print(f"[red]error:[/red] {exc} ({len(issues)} problem(s)); nothing was changed:")
            for issue in issues:
                err.print(f"  {issue['text']}", markup=False)
            raise typer.Exit(1) from exc
        _fail(str(exc), 1)
    return result


def _read_sources(files: list[Path]) -> list[tuple[str, str]]:
    from meshway.config.errors import ConfigError
    from meshway.config.loader import load_paths

    if not files:
        _fail("give at least one -f FILE|DIR", 2)
    try:
        if files == [Path("-")]:
            return [("<stdin>", sys.stdin.read())]
        return load_paths(files)
    except ConfigError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(str(exc), 1)


@app.command()
def version(server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Print the CLI version, and the control plane's when it is reachable."""
    out.print(f"client: {__version__}")
    try:
        info = ControlPlaneClient(server, token).version()
        out.print(f"control plane: {info['version']} (trust domain {info['trustDomain']})")
    except (Unreachable, ApiError) as exc:
        out.print(f"control plane: unreachable ({exc})")


@app.command()
def apply(
    filename: FilesOpt = [],  # noqa: B006 - typer needs a literal default
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate only.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create or update objects from YAML. The whole set is accepted or rejected."""
    sources = _read_sources(filename)
    result = _call(ControlPlaneClient(server, token).apply, sources, dry_run)
    suffix = " (dry run)" if result.get("dryRun") else ""
    for r in result["results"]:
        name = f"{r['namespace']}/{r['name']}" if r.get("namespace") else r["name"]
        out.print(f"{r['kind'].lower()}/{name} {r['outcome']}{suffix}", markup=False)


@app.command()
def delete(
    args: Annotated[list[str] | None, typer.Argument(help="KIND NAME... (instead of -f)")] = None,
    filename: FilesOpt = [],  # noqa: B006
    namespace: Annotated[str, typer.Option("-n", "--namespace")] = "default",
    ignore_not_found: Annotated[bool, typer.Option("--ignore-not-found")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete objects named in YAML files, or KIND NAME..."""
    client = ControlPlaneClient(server, token)
    if filename:
        result = _call(client.delete_sources, _read_sources(filename))
    elif args and len(args) >= 2:
        kind, names = args[0], args[1:]
        keys = [{"kind": kind, "namespace": namespace, "name": n} for n in names]
        result = _call(client.delete_keys, keys)
    else:
        _fail("give -f FILE|DIR, or KIND NAME...", 2)
    for k in result["deleted"]:
        name = f"{k['namespace']}/{k['name']}" if k["namespace"] else k["name"]
        out.print(f"{k['kind'].lower()}/{name} deleted", markup=False)
    for k in result["notFound"]:
        name = f"{k['namespace']}/{k['name']}" if k["namespace"] else k["name"]
        err.print(f"{k['kind'].lower()}/{name} not found", markup=False)
    if result["notFound"] and not ignore_not_found:
        raise typer.Exit(1)


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "-"
    import calendar

    seconds = int(time.time() - calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _columns(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = obj["metadata"].get("labels") or {}
    if kind == "Workload":
        return {
            "NODE": spec.get("nodeName", ""),
            "IP": status.get("podIP", "<pending>"),
            "SERVICE ACCOUNT": spec.get("serviceAccountName", "default"),
        }
    if kind == "Service":
        ports = ",".join(
            f"{p['port']}/{p.get('appProtocol') or p.get('protocol', 'TCP')}"
            for p in spec.get("ports", [])
        )
        selector = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items())
        return {"CLUSTER-IP": spec.get("clusterIP", ""), "PORTS": ports, "SELECTOR": selector}
    if kind == "Node":
        return {"POD-CIDR": status.get("podCIDR", "")}
    if kind == "Namespace":
        return {"LABELS": ",".join(f"{k}={v}" for k, v in labels.items())}
    if kind == "AuthorizationPolicy":
        target = (
            "selector"
            if spec.get("selector")
            else ("targetRefs" if spec.get("targetRefs") or spec.get("targetRef") else "namespace")
        )
        return {"ACTION": spec.get("action", "ALLOW"), "APPLIES TO": target}
    if kind == "Gateway":
        return {
            "CLASS": spec.get("gatewayClassName", ""),
            "ADDRESS": ",".join(a["value"] for a in status.get("addresses", [])) or "<pending>",
            "PROGRAMMED": _condition(obj, "Programmed").get("status", "Unknown"),
        }
    return {}


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions", [])
    return next((c for c in conditions if c.get("type") == ctype), {})


def _print_table(items: list[dict[str, Any]], show_kind: bool) -> None:
    if not items:
        err.print("No resources found.")
        return
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item)
    for i, (kind, objs) in enumerate(by_kind.items()):
        if i:
            out.print()
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        namespaced = any(o["metadata"].get("namespace") for o in objs)
        extra = [_columns(kind, o) for o in objs]
        headers = (["NAMESPACE"] if namespaced else []) + ["NAME"] + list(extra[0]) + ["AGE"]
        for h in headers:
            table.add_column(h, no_wrap=True)
        for obj, cols in zip(objs, extra, strict=True):
            name = obj["metadata"]["name"]
            if show_kind:
                name = f"{kind.lower()}/{name}"
            row = ([obj["metadata"].get("namespace", "")] if namespaced else []) + [name]
            row += [*cols.values(), _age(obj["metadata"].get("creationTimestamp"))]
            table.add_row(*row)
        out.print(table)


@app.command()
def get(
    kind: Annotated[str, typer.Argument(help="Kind (workloads, svc, ap, ...), or 'all'.")],
    name: Annotated[str | None, typer.Argument()] = None,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces")] = False,
    output: Annotated[str, typer.Option("-o", "--output", help="table, yaml or json")] = "table",
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """List or show objects."""
    if output not in ("table", "yaml", "json", "wide"):
        _fail(f"unknown output format '{output}' (table, yaml, json)", 2)
    ns = None if all_namespaces else (namespace or "default")
    client = ControlPlaneClient(server, token)
    if kind in ("endpoints", "endpoint", "ep"):
        _print_endpoints(_call(client.endpoints, ns, name)["items"], output)
        return
    if kind == "all":
        result = _call(client.list, None, ns, name)
    else:
        from meshway.config.model import kind_for

        try:
            cls = kind_for(kind)
        except KeyError as exc:
            _fail(str(exc.args[0]) if exc.args else str(exc), 2)
        result = _call(client.list, cls.KIND, ns if cls.NAMESPACED else None, name)
    items = result["items"]
    if output == "json":
        out.print_json(json.dumps(items[0] if name and len(items) == 1 else {"items": items}))
    elif output == "yaml":
        docs = items if not name else items[:1]
        out.print(yaml.safe_dump_all(docs, sort_keys=False).rstrip(), markup=False)
    else:
        _print_table(items, show_kind=kind == "all")


def _print_endpoints(items: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        out.print_json(json.dumps({"items": items}))
        return
    if output == "yaml":
        out.print(yaml.safe_dump({"items": items}, sort_keys=False).rstrip(), markup=False)
        return
    if not items:
        err.print("No resources found.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in ("NAMESPACE", "NAME", "ENDPOINTS"):
        table.add_column(h, no_wrap=True)
    for item in items:
        addrs = [
            f"{e['ip'] or '<pending>'}:{p['targetPort']}"
            for e in item["endpoints"]
            for p in e["ports"]
        ]
        shown = ",".join(addrs[:4]) + (f" + {len(addrs) - 4} more" if len(addrs) > 4 else "")
        table.add_row(item["namespace"], item["service"], shown or "<none>")
    out.print(table)


@app.command("proxy-status")
def proxy_status(server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Each connected proxy and whether it is in sync with the control plane."""
    result = _call(ControlPlaneClient(server, token).proxies)
    proxies = result["proxies"]
    if not proxies:
        err.print("No proxies connected.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in ("PROXY", "NODE", "ADDRESS", "AUTHORIZATION", "VERSION"):
        table.add_column(h, no_wrap=True)
    for p in proxies:
        types = p["types"]

        def cell(suffix: str, types: dict[str, Any] = types) -> str:
            state = next((v for k, v in types.items() if k.endswith(suffix)), None)
            if state is None:
                return "NOT SENT"
            text = str(state["status"])
            if state.get("error"):
                text += f" ({state['error'][:60]})"
            return text

        acked = {t.get("acked_version") for t in types.values()}
        table.add_row(
            p["id"],
            p["node"],
            cell(".Address"),
            cell(".Authorization"),
            ",".join(sorted(a for a in acked if a)),
        )
    out.print(table)
    out.print(f"control plane version: {result['version']}")


@node_app.command("join")
def node_join(
    name: Annotated[str, typer.Argument(help="Node name.")],
    output_file: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the credential file here.")
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Register a node (if new) and issue it a fresh credential; earlier ones stop working."""
    result = _call(ControlPlaneClient(server, token).join, name)
    text = yaml.safe_dump(result, sort_keys=False)
    if output_file is None:
        out.print(text.rstrip(), markup=False)
        return
    fd = os.open(output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    out.print(f"node/{name} joined; credential written to {output_file}")


@node_app.command("run")
def node_run(
    credentials: Annotated[Path, typer.Option("--credentials", help="From `node join -o`.")],
    pod_netns: Annotated[
        str,
        typer.Option(
            help="Path of a pod's network namespace, with {namespace} and {name} placeholders."
        ),
    ] = "/run/netns/{namespace}.{name}",
    listen_netns: Annotated[
        Path | None,
        typer.Option(help="Network namespace for ports 15000/15020/15021 (default: our own)."),
    ] = None,
    cert_lifetime_seconds: Annotated[
        int, typer.Option(help="Requested certificate lifetime (0: the CA's default).")
    ] = 0,
    only_pod: Annotated[
        str | None,
        typer.Option(help="Sidecar mode: capture only this pod (NAMESPACE/NAME)."),
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the node proxy: capture enrolled pods of this node, HBONE mTLS, L4 policy."""
    from meshway.node.main import run_node

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        creds = yaml.safe_load(credentials.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(str(exc), 2)
    import uvloop

    uvloop.run(run_node(creds, pod_netns, listen_netns, cert_lifetime_seconds, only_pod))


@node_app.command("xds")
def node_xds(
    credentials: Annotated[
        Path, typer.Option("--credentials", help="From `meshway node join -o`.")
    ],
    follow: Annotated[
        float, typer.Option("--follow", help="Keep printing updates for this many seconds.")
    ] = 0.0,
) -> None:
    """Connect to the control plane as the node and print what xDS delivers."""
    from meshway.xds.client import Update, XdsClient
    from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE, node_proxy_types

    try:
        creds = yaml.safe_load(credentials.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(str(exc), 2)

    def show(update: Update) -> None:
        short = update.type_url.rsplit(".", 1)[-1]
        for name in sorted(update.updated):
            out.print(f"{short} {name} updated (version {update.version})", markup=False)
        for name in sorted(update.removed):
            out.print(f"{short} {name} removed (version {update.version})", markup=False)

    async def run() -> None:
        client = XdsClient(
            creds["xdsAddress"],
            creds["node"],
            node_proxy_types(),
            token=creds["credential"],
            root_certificates=creds["trustBundle"].encode(),
        )
        client.start()
        try:
            await client.wait_synced(10)
            for type_url in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
                n = len(client.snapshot(type_url))
                out.print(f"{type_url}: {n} resource(s) at version {client.version(type_url)}")
            if follow > 0:
                client.subscribe(show)
                await asyncio.sleep(follow)
        except TimeoutError:
            _fail(f"no xDS state within 10 s: {client.last_error or 'no answer'}", 3)
        finally:
            await client.close()

    asyncio.run(run())


@cert_app.command("request")
def cert_request(
    credentials: Annotated[
        Path, typer.Option("--credentials", help="From `meshway node join -o`.")
    ],
    identity: Annotated[str, typer.Option("--identity", help="spiffe://TD/ns/NS/sa/SA")],
    out_dir: Annotated[Path, typer.Option("--out-dir")] = Path("."),
    ttl: Annotated[int, typer.Option("--ttl-seconds", help="0: the CA's default")] = 0,
) -> None:
    """Generate a key here, send a CSR with a node credential, write key, chain and bundle."""
    from meshway.identity.caclient import CaClient
    from meshway.identity.spiffe import SpiffeId
    from meshway.xds.channel import GrpcError, StatusCode

    try:
        creds = yaml.safe_load(credentials.read_text())
        spiffe = SpiffeId.parse(identity)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        _fail(str(exc), 2)

    async def fetch() -> Any:
        client = CaClient(creds["xdsAddress"], creds["credential"], creds["trustBundle"].encode())
        try:
            return await client.fetch(spiffe, timedelta(seconds=ttl) if ttl else None)
        finally:
            await client.close()

    try:
        cert = asyncio.run(fetch())
    except GrpcError as exc:
        _fail(str(exc), 3 if exc.code is StatusCode.UNAVAILABLE else 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path = out_dir / "key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.key_pem)
    (out_dir / "cert-chain.pem").write_text("".join(cert.cert_chain_pem))
    (out_dir / "root-cert.pem").write_text("".join(cert.trust_bundle_pem))
    out.print(f"certificate for {spiffe.uri} written to {out_dir}/{{key,cert-chain,root-cert}}.pem")


# -- waypoints ---------------------------------------------------------------------------------

WAYPOINT_FOR = ("service", "workload", "all", "none")
NamespaceOpt = Annotated[str, typer.Option("-n", "--namespace", help="Namespace.")]
WaypointNameOpt = Annotated[str, typer.Option("--name", help="Waypoint (Gateway) name.")]
ForOpt = Annotated[
    str | None,
    typer.Option(
        "--for",
        help="Traffic the waypoint handles: service, workload, all or none (default: service).",
        show_default=False,
    ),
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        help="Waypoint processes to run, on different nodes where possible (annotation "
        "meshway.io/replicas; default: 1, or what the Gateway has).",
        show_default=False,
    ),
]


def _waypoint_gateway(
    namespace: str,
    name: str,
    traffic: str | None,
    existing: dict[str, Any] | None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The Gateway `istioctl waypoint generate` writes; labels and annotations of an existing
    Gateway of that name are kept, and `--for` and `--replicas` only change them when given."""
    from meshway.config.labels import (
        ANNOTATION_REPLICAS,
        LABEL_WAYPOINT_FOR,
        replicas_error,
    )
    from meshway.config.model import dns_label_error

    if name == "none":
        _fail("'none' is reserved (istio.io/use-waypoint: none opts out): choose another name", 2)
    if error := dns_label_error(name):
        _fail(f"invalid waypoint name {name!r}: {error}", 2)
    if traffic is not None and traffic not in WAYPOINT_FOR:
        _fail(f"invalid --for {traffic!r}: use one of {', '.join(WAYPOINT_FOR)}", 2)
    if replicas is not None and (error := replicas_error(str(replicas))):
        _fail(f"invalid --replicas: {error}", 2)
    old_meta = (existing or {}).get("metadata", {})
    labels = dict(old_meta.get("labels") or {})
    if traffic is not None:
        labels[LABEL_WAYPOINT_FOR] = traffic
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    annotations = dict(old_meta.get("annotations") or {})
    if replicas is not None:
        annotations[ANNOTATION_REPLICAS] = str(replicas)
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def _namespace_or_fail(client: ControlPlaneClient, namespace: str) -> dict[str, Any]:
    found = _call(client.get, "Namespace", None, namespace)
    if not found:
        _fail(f"namespace '{namespace}' not found", 1)
    return found


def _relabel_namespace(
    client: ControlPlaneClient, namespace: dict[str, Any], key: str, value: str | None
) -> None:
    """Set (or with None remove) one label of a Namespace, keeping the rest of it."""
    meta = namespace["metadata"]
    labels = dict(meta.get("labels") or {})
    if value is None:
        labels.pop(key, None)
    else:
        labels[key] = value
    updated = {**namespace, "metadata": {**meta, "labels": labels}}
    updated.pop("status", None)
    _call(client.apply, [(f"<namespace {meta['name']}>", yaml.safe_dump(updated))])


@waypoint_app.command("generate")
def waypoint_generate(
    namespace: NamespaceOpt = "default",
    name: WaypointNameOpt = "waypoint",
    traffic: ForOpt = None,
    replicas: ReplicasOpt = None,
) -> None:
    """Print the Gateway that `waypoint apply` would apply, as YAML."""
    gateway = _waypoint_gateway(namespace, name, traffic, None, replicas)
    out.print(yaml.safe_dump(gateway, sort_keys=False).rstrip(), markup=False)


@waypoint_app.command("apply")
def waypoint_apply(
    namespace: NamespaceOpt = "default",
    name: WaypointNameOpt = "waypoint",
    traffic: ForOpt = None,
    replicas: ReplicasOpt = None,
    enroll_namespace: Annotated[
        bool,
        typer.Option(
            "--enroll-namespace", help="Also label the namespace istio.io/use-waypoint=NAME."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Let --enroll-namespace replace another waypoint."),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait until the waypoint is Programmed.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 90.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Deploy a waypoint for a namespace: a Gateway of class istio-waypoint, from which the
    control plane runs the waypoint's Workloads (one per replica) and Service."""
    from meshway.config.labels import LABEL_DATAPLANE_MODE, LABEL_USE_WAYPOINT

    client = ControlPlaneClient(server, token)
    ns_obj = _namespace_or_fail(client, namespace)
    if enroll_namespace:
        ns_labels = ns_obj["metadata"].get("labels") or {}
        current = ns_labels.get(LABEL_USE_WAYPOINT)
        if current and current != name and not overwrite:
            _fail(
                f"namespace '{namespace}' already uses waypoint '{current}'; add --overwrite "
                f"to switch it to '{name}'"
            )
        if ns_labels.get(LABEL_DATAPLANE_MODE) != "ambient":
            err.print(
                f"warning: namespace '{namespace}' is not in the mesh; consider `meshway apply` "
                f"with the label {LABEL_DATAPLANE_MODE}: ambient",
                markup=False,
            )
    existing = _call(client.get, "Gateway", namespace, name)
    gateway = _waypoint_gateway(namespace, name, traffic, existing, replicas)
    result = _call(client.apply, [("<waypoint apply>", yaml.safe_dump(gateway))])
    outcome = result["results"][0]["outcome"]
    out.print(f"waypoint {namespace}/{name} {'applied' if outcome != 'unchanged' else outcome}")
    if wait:
        _wait_programmed(client, namespace, name, timeout)
        out.print(f"waypoint {namespace}/{name} is ready")
    if enroll_namespace:
        _relabel_namespace(client, _namespace_or_fail(client, namespace), LABEL_USE_WAYPOINT, name)
        out.print(f'namespace {namespace} labeled with "{LABEL_USE_WAYPOINT}: {name}"')


def _wait_programmed(client: ControlPlaneClient, namespace: str, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        gateway = _call(client.get, "Gateway", namespace, name)
        condition = _condition(gateway or {}, "Programmed")
        if condition.get("status") == "True":
            return
        if time.monotonic() > deadline:
            detail = condition.get("message") or "no status yet"
            _fail(f"waypoint {namespace}/{name} not ready after {timeout:.0f}s: {detail}")
        time.sleep(0.2)


def _waypoint_rows(client: ControlPlaneClient, namespace: str | None) -> list[dict[str, str]]:
    from meshway.config.labels import (
        ANNOTATION_MANAGED_BY,
        ANNOTATION_REPLICAS,
        LABEL_WAYPOINT_FOR,
        WAYPOINT_GATEWAY_CLASSES,
    )

    gateways = [
        g
        for g in _call(client.list, "Gateway", namespace)["items"]
        if g["spec"].get("gatewayClassName") in WAYPOINT_GATEWAY_CLASSES
    ]
    # The replicas of each Gateway, by name (replica 0 is named like the Gateway, so first).
    replicas: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for w in sorted(
        _call(client.list, "Workload", namespace)["items"],
        key=lambda w: (len(w["metadata"]["name"]), w["metadata"]["name"]),
    ):
        owner = (w["metadata"].get("annotations") or {}).get(ANNOTATION_MANAGED_BY, "")
        kind, _, gateway_name = owner.partition("/")
        if kind == "Gateway" and gateway_name:
            replicas.setdefault((w["metadata"]["namespace"], gateway_name), []).append(w)
    rows = []
    for g in gateways:
        meta = g["metadata"]
        ours = replicas.get((meta["namespace"], meta["name"]), [])
        wanted = int((meta.get("annotations") or {}).get(ANNOTATION_REPLICAS, "1"))
        running = sum((w.get("status") or {}).get("phase") == "Running" for w in ours[:wanted])
        programmed = _condition(g, "Programmed")
        state = programmed.get("status", "Unknown")
        if state == "False" and programmed.get("reason"):
            state = f"False ({programmed['reason']})"
        rows.append(
            {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "for": (meta.get("labels") or {}).get(LABEL_WAYPOINT_FOR, "service"),
                "address": ",".join(
                    a["value"] for a in (g.get("status") or {}).get("addresses", [])
                )
                or "<pending>",
                "node": ",".join(w["spec"]["nodeName"] for w in ours[:wanted]) or "<none>",
                "ready": f"{running}/{wanted}",
                "programmed": state,
                "message": programmed.get("message", ""),
            }
        )
    return rows


@waypoint_app.command("list")
def waypoint_list(
    namespace: NamespaceOpt = "default",
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces")] = False,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """The waypoints of a namespace (or of all, with -A): traffic, address, replicas running,
    nodes, status."""
    if output not in ("table", "json"):
        _fail(f"unknown output format '{output}' (table, json)", 2)
    rows = _waypoint_rows(ControlPlaneClient(server, token), None if all_namespaces else namespace)
    if output == "json":
        out.print_json(json.dumps({"items": rows}))
        return
    if not rows:
        err.print("No waypoints found.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    columns = ("namespace", "name", "for", "address", "ready", "node", "programmed")
    for column in columns:
        table.add_column(column.upper(), no_wrap=True)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    out.print(table)


@waypoint_app.command("delete")
def waypoint_delete(
    names: Annotated[list[str] | None, typer.Argument(help="Waypoint names.")] = None,
    namespace: NamespaceOpt = "default",
    name: Annotated[
        str | None, typer.Option("--name", help="Waypoint name (default: waypoint).")
    ] = None,
    delete_all: Annotated[
        bool, typer.Option("--all", help="Every waypoint of the namespace.")
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete waypoints (their Workload and Service go with them), and the namespace's
    istio.io/use-waypoint label when it names one of them."""
    from meshway.config.labels import LABEL_USE_WAYPOINT

    client = ControlPlaneClient(server, token)
    wanted = [*(names or []), *([name] if name else [])]
    if delete_all and wanted:
        _fail("give waypoint names or --all, not both", 2)
    if delete_all:
        wanted = [r["name"] for r in _waypoint_rows(client, namespace)]
        if not wanted:
            err.print(f"No waypoints found in namespace '{namespace}'.")
            return
    wanted = list(dict.fromkeys(wanted or ["waypoint"]))
    known = {r["name"] for r in _waypoint_rows(client, namespace)}
    missing = [n for n in wanted if n not in known]
    if missing:
        shown = ", ".join(missing)
        _fail(f"no waypoint {shown} in namespace '{namespace}' (see `meshway waypoint list`)")
    keys = [{"kind": "Gateway", "namespace": namespace, "name": n} for n in wanted]
    _call(client.delete_keys, keys)
    for n in wanted:
        out.print(f"waypoint {namespace}/{n} deleted")
    ns_obj = _namespace_or_fail(client, namespace)
    current = (ns_obj["metadata"].get("labels") or {}).get(LABEL_USE_WAYPOINT)
    if current in wanted:
        _relabel_namespace(client, ns_obj, LABEL_USE_WAYPOINT, None)
        out.print(f'namespace {namespace}: label "{LABEL_USE_WAYPOINT}" removed')
    for kind in ("Service", "Workload"):
        for obj in _call(client.list, kind, namespace)["items"]:
            used = (obj["metadata"].get("labels") or {}).get(LABEL_USE_WAYPOINT)
            if used in wanted:
                err.print(
                    f"warning: {kind.lower()}/{namespace}/{obj['metadata']['name']} still has "
                    f"{LABEL_USE_WAYPOINT}: {used}, a waypoint that no longer exists",
                    markup=False,
                )


@app.command()
def validate(filename: FilesOpt = []) -> None:  # noqa: B006
    """Check YAML offline against the schema (references are checked by the control plane)."""
    from meshway.config.errors import ConfigError
    from meshway.config.loader import parse_sources_with_origins

    sources = _read_sources(filename)
    try:
        objects, _ = parse_sources_with_origins(sources)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {len(exc.issues)} problem(s):")
        for issue in exc.issues:
            err.print(f"  {issue}", markup=False)
        raise typer.Exit(1) from exc
    out.print(f"{len(objects)} object(s) valid")


@app.command()
def controlplane(
    state_dir: Annotated[Path | None, typer.Option(envvar="MESHWAY_STATE_DIR")] = None,
    grpc_address: Annotated[str, typer.Option("--grpc-address")] = "127.0.0.1:15012",
    admin_address: Annotated[str, typer.Option("--admin-address")] = "127.0.0.1:15014",
    trust_domain: Annotated[str, typer.Option()] = "cluster.local",
    root_namespace: Annotated[str, typer.Option()] = "istio-system",
    pod_cidr: Annotated[str, typer.Option()] = "10.244.0.0/16",
    service_cidr: Annotated[str, typer.Option()] = "10.96.0.0/16",
    node_prefix: Annotated[int, typer.Option(help="Prefix length of each node's pod CIDR.")] = 24,
    cacerts: Annotated[
        Path | None, typer.Option(help="Istio cacerts directory (ca-cert.pem, ca-key.pem, ...).")
    ] = None,
    extra_root: Annotated[
        list[Path], typer.Option(help="More trusted roots (root rotation).")
    ] = [],  # noqa: B006
    cert_ttl_hours: Annotated[float, typer.Option()] = 24.0,
    debounce_ms: Annotated[int, typer.Option(help="Quiet time before a push.")] = 50,
    log_level: Annotated[str, typer.Option()] = "info",
    apply_file: Annotated[
        list[Path], typer.Option("--apply", help="Apply these files at start.")
    ] = [],  # noqa: B006
) -> None:
    """Run the control plane: config store, CA, xDS on --grpc-address, admin API."""
    from meshway.config.errors import ConfigError
    from meshway.controlplane.server import ControlPlane, ControlPlaneConfig
    from meshway.identity.ca import CaError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ControlPlaneConfig(
        state_dir=state_dir or default_state_dir(),
        grpc_address=grpc_address,
        admin_address=admin_address,
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        pod_cidr=pod_cidr,
        service_cidr=service_cidr,
        node_prefix=node_prefix,
        cacerts_dir=cacerts,
        extra_roots=tuple(extra_root),
        cert_ttl=timedelta(hours=cert_ttl_hours),
        debounce_after=debounce_ms / 1000,
    )
    try:
        cp = ControlPlane(config)
        if apply_file:
            cp.apply_sources(_read_sources(apply_file))
    except (CaError, ValueError, ConfigError) as exc:
        _fail(str(exc), 1)
    try:
        import uvloop

        uvloop.run(cp.run())
    except OSError as exc:
        _fail(f"cannot start: {exc}", 1)


ClusterOpt = Annotated[str, typer.Option("--name", help="Cluster name.")]


def _cluster_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from meshway.runtime.cluster import ClusterError
    from meshway.runtime.host import HostCommandError

    try:
        return fn(*args, **kwargs)
    except (ClusterError, HostCommandError) as exc:
        _fail(str(exc), 1)


@cluster_app.command("up")
def cluster_up(
    filename: FilesOpt = [],  # noqa: B006
    name: ClusterOpt = "meshway",
    node_network: Annotated[str, typer.Option(help="Addresses of the nodes.")] = "10.250.0.0/24",
    pod_cidr: Annotated[str, typer.Option()] = "10.244.0.0/16",
    service_cidr: Annotated[str, typer.Option()] = "10.96.0.0/16",
    grpc_port: Annotated[int, typer.Option()] = 15012,
    admin_port: Annotated[int, typer.Option()] = 15014,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every pod.")] = 60.0,
    cert_lifetime_seconds: Annotated[
        int, typer.Option(help="Workload certificate lifetime the node proxies ask for.")
    ] = 0,
) -> None:
    """Create the cluster from manifests (Nodes, Workloads, Services, ...) and wait for it."""
    from meshway.runtime import cluster

    sources = _read_sources(filename)
    args = ["--pod-cidr", pod_cidr, "--service-cidr", service_cidr]
    state = _cluster_call(
        cluster.up,
        name,
        sources,
        node_network=node_network,
        grpc_port=grpc_port,
        admin_port=admin_port,
        controlplane_args=args,
        node_proxy_args=(
            ["--cert-lifetime-seconds", str(cert_lifetime_seconds)] if cert_lifetime_seconds else []
        ),
        timeout=timeout,
        log=lambda msg: out.print(msg, markup=False),
    )
    _print_cluster(state)
    out.print(f"cluster '{name}' is up; `meshway cluster down --name {name}` removes it")


def _print_cluster(state: dict[str, Any]) -> None:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in ("POD", "NODE", "IP", "PHASE", "RESTARTS", "PID"):
        table.add_column(h, no_wrap=True)
    for key, pod in state.get("pods", {}).items():
        table.add_row(
            key, pod["node"], pod["ip"], pod["phase"], str(pod["restarts"]), str(pod["pid"] or "-")
        )
    nodes = ", ".join(
        f"{n} ({v['ip']}, pods {v['podCIDR']})" for n, v in state.get("nodes", {}).items()
    )
    out.print(f"nodes: {nodes or '-'}")
    out.print(table)


@cluster_app.command("down")
def cluster_down(name: ClusterOpt = "meshway") -> None:
    """Stop every process of the cluster and remove every namespace and file it made."""
    from meshway.runtime import cluster

    removed = _cluster_call(cluster.down, name, log=lambda msg: out.print(msg, markup=False))
    out.print(f"cluster '{name}' is down ({len(removed)} things removed)")


@cluster_app.command("status")
def cluster_status(
    name: Annotated[str | None, typer.Option("--name")] = None,
    output: Annotated[str, typer.Option("-o", "--output")] = "table",
) -> None:
    """The control plane, the agent, the nodes and the pods of a cluster."""
    from meshway.runtime import cluster

    name = name or _cluster_call(cluster.current_cluster)
    state = _cluster_call(cluster.status, name)
    if output == "json":
        out.print_json(json.dumps(state))
        return
    cp, agent = state["controlplane"], state["agent"]
    out.print(
        f"cluster {name}: control plane {cp['server']} {'ready' if cp['ready'] else 'NOT READY'}, "
        f"agent {'running' if agent['alive'] else 'NOT RUNNING'}"
    )
    if state.get("error"):
        out.print(f"last error: {state['error']}", markup=False)
    _print_cluster(state)


@cluster_app.command("agent", hidden=True)
def cluster_agent(
    name: ClusterOpt = "meshway", log_level: Annotated[str, typer.Option()] = "info"
) -> None:
    """Run the runtime agent of a cluster (started by `cluster up`)."""
    from meshway.runtime import cluster
    from meshway.runtime.agent import RuntimeAgent

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _cluster_call(cluster.load_settings, name)
    agent = RuntimeAgent(
        name,
        cluster.cluster_dir(name),
        settings.server,
        Path(settings.token_file).read_text().strip(),
        settings.node_network,
        node_proxy_args=settings.node_proxy_args,
        ratelimit_store=settings.ratelimit_store,
    )
    agent.run()


@app.command()
def logs(
    pod: Annotated[str, typer.Argument(help="POD or NAMESPACE/POD")],
    namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
) -> None:
    """A pod's stdout and stderr."""
    from meshway.runtime import cluster

    name, found = _cluster_call(cluster.find_pod, pod, namespace)
    path = cluster.log_path(name, found)
    try:
        with path.open("rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                elif not follow:
                    break
                else:
                    time.sleep(0.2)
    except FileNotFoundError:
        _fail(f"no logs yet for {found['namespace']}/{found['name']}")
    except KeyboardInterrupt:
        pass


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    ctx: typer.Context,
    pod: Annotated[str, typer.Argument(help="POD or NAMESPACE/POD")],
    namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
) -> None:
    """Run a command inside a pod's network namespace: meshway exec POD -- CMD ARGS."""
    from meshway.runtime import cluster

    if not ctx.args:
        _fail("give a command: meshway exec POD -- CMD", 2)
    _, found = _cluster_call(cluster.find_pod, pod, namespace)
    os.execvp("ip", ["ip", "netns", "exec", found["netns"], *ctx.args])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
