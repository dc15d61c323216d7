"""Cross-object checks that the store runs at apply and delete time.

A single document can be valid on its own and still be unusable: a Workload on a Node that
does not exist would never start, and deleting a Namespace under running Workloads would orphan
them. Like Kubernetes admission, these checks see the batch being applied plus the store.
Route references to missing Services are deliberately not errors: the Gateway API reports them
in the route's status, and users apply routes before backends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from meshway.config.errors import ConfigIssue
from meshway.config.model import (
    DEFAULT_NAMESPACE,
    Gateway,
    Namespace,
    Node,
    ObjectKey,
    Resource,
    Service,
    ServiceAccount,
    Workload,
)

KNOWN_GATEWAY_CLASSES = ("istio-waypoint", "meshway-waypoint")
# The account every namespace has implicitly, as in Kubernetes.
IMPLICIT_SERVICE_ACCOUNT = "default"
_SHOWN_DEPENDENTS = 3

Lookup = Callable[[ObjectKey], Resource | None]
Sources = Mapping[ObjectKey, tuple[str, int]]


def _issue(key: ObjectKey, sources: Sources | None, path: str, message: str) -> ConfigIssue:
    source, document = (sources or {}).get(key, ("", None))
    return ConfigIssue(source, document, str(key), path, message)


def check_references(
    batch: Sequence[Resource],
    lookup: Lookup,
    sources: Sources | None = None,
) -> list[ConfigIssue]:
    """Issues for references from `batch` to objects that are neither in the batch nor stored."""
    in_batch = {resource.key: resource for resource in batch}

    def exists(key: ObjectKey) -> bool:
        return key in in_batch or lookup(key) is not None

    issues: list[ConfigIssue] = []
    for resource in batch:
        key = resource.key
        if resource.NAMESPACED and not exists(ObjectKey(Namespace.KIND, "", key.namespace)):
            issues.append(
                _issue(
                    key,
                    sources,
                    "metadata.namespace",
                    f"namespace {key.namespace!r} does not exist: "
                    "create it first or include a Namespace document",
                )
            )
        if isinstance(resource, Workload):
            account = resource.spec.service_account_name
            account_key = ObjectKey(ServiceAccount.KIND, key.namespace, account)
            if account != IMPLICIT_SERVICE_ACCOUNT and not exists(account_key):
                issues.append(
                    _issue(
                        key,
                        sources,
                        "spec.serviceAccountName",
                        f"service account {account!r} does not exist in namespace "
                        f"{key.namespace!r}: create it first or include a ServiceAccount document",
                    )
                )
            node = resource.spec.node_name
            if not exists(ObjectKey(Node.KIND, "", node)):
                issues.append(
                    _issue(
                        key,
                        sources,
                        "spec.nodeName",
                        f"node {node!r} does not exist: register it first or include a Node "
                        "document",
                    )
                )
        elif isinstance(resource, Gateway):
            gateway_class = resource.spec.gateway_class_name
            if gateway_class not in KNOWN_GATEWAY_CLASSES:
                issues.append(
                    _issue(
                        key,
                        sources,
                        "spec.gatewayClassName",
                        f"unknown gateway class {gateway_class!r}; use one of "
                        f"{', '.join(KNOWN_GATEWAY_CLASSES)}",
                    )
                )
    return issues


def check_update(old: Resource, new: Resource, sources: Sources | None = None) -> list[ConfigIssue]:
    """Issues for changes to fields that cannot change on a live object.

    A Workload's process runs on its node, so moving it means recreating it; a Service's
    cluster IP is cached by every client. A new Service without clusterIP keeps the old one
    (the store carries it over), as `kubectl apply` does.
    """
    issues: list[ConfigIssue] = []
    if isinstance(old, Workload) and isinstance(new, Workload):
        if old.spec.node_name != new.spec.node_name:
            issues.append(
                _issue(
                    new.key,
                    sources,
                    "spec.nodeName",
                    f"field is immutable (is {old.spec.node_name!r}, "
                    f"requested {new.spec.node_name!r}): delete and recreate the Workload",
                )
            )
    elif isinstance(old, Service) and isinstance(new, Service):
        before, after = old.spec.cluster_ip, new.spec.cluster_ip
        if before is not None and after is not None and before != after:
            issues.append(
                _issue(
                    new.key,
                    sources,
                    "spec.clusterIP",
                    f"field is immutable (is {before!r}, requested {after!r}): "
                    "delete and recreate the Service",
                )
            )
    return issues


def _describe_dependents(dependents: list[ObjectKey]) -> str:
    shown = ", ".join(str(key) for key in dependents[:_SHOWN_DEPENDENTS])
    more = len(dependents) - _SHOWN_DEPENDENTS
    return f"{shown} and {more} more" if more > 0 else shown


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def check_deletions(
    deleted: Sequence[ObjectKey],
    remaining: Iterable[Resource],
    sources: Sources | None = None,
) -> list[ConfigIssue]:
    """Issues for deletions that would leave objects pointing at nothing.

    `remaining` is what the store will hold afterwards; objects deleted in the same batch are
    ignored even if passed, so that deleting a namespace together with its contents succeeds.
    """
    gone = set(deleted)
    in_namespace: dict[str, list[ObjectKey]] = defaultdict(list)
    by_account: dict[tuple[str, str], list[ObjectKey]] = defaultdict(list)
    by_node: dict[str, list[ObjectKey]] = defaultdict(list)
    for resource in remaining:
        key = resource.key
        if key in gone:
            continue
        if resource.NAMESPACED:
            in_namespace[key.namespace or DEFAULT_NAMESPACE].append(key)
        if isinstance(resource, Workload):
            by_account[(key.namespace, resource.spec.service_account_name)].append(key)
            by_node[resource.spec.node_name].append(key)

    issues: list[ConfigIssue] = []
    for key in deleted:
        if key.kind == Namespace.KIND and in_namespace.get(key.name):
            dependents = sorted(in_namespace[key.name])
            message = (
                f"namespace {key.name!r} still holds {_plural(len(dependents), 'object')}: "
                f"{_describe_dependents(dependents)}; delete them first"
            )
        elif key.kind == ServiceAccount.KIND and by_account.get((key.namespace, key.name)):
            dependents = sorted(by_account[(key.namespace, key.name)])
            message = (
                f"service account {key.name!r} is used by "
                f"{_plural(len(dependents), 'Workload')}: {_describe_dependents(dependents)}; "
                "delete or move them first"
            )
        elif key.kind == Node.KIND and by_node.get(key.name):
            dependents = sorted(by_node[key.name])
            message = (
                f"node {key.name!r} still runs {_plural(len(dependents), 'Workload')}: "
                f"{_describe_dependents(dependents)}; delete them first"
            )
        else:
            continue
        issues.append(_issue(key, sources, "", message))
    return issues
