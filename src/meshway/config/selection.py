"""Which objects select which: Service endpoints and policy targets, decided in one place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshway.config.model import Service, ServicePort, Workload


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes equality selection; an empty or missing selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def target_port(port: ServicePort, workload: Workload) -> int | None:
    """The workload port a service port maps to; a named target must exist on the workload."""
    target = port.target_port if port.target_port is not None else port.port
    if isinstance(target, int):
        return target
    for wport in workload.spec.ports:
        if wport.name == target:
            return wport.container_port
    return None


@dataclass(frozen=True)
class Endpoint:
    workload: str
    node: str
    ip: str | None
    # (service port, workload port) pairs; a named target the workload lacks is left out.
    ports: tuple[tuple[int, int], ...]


def service_endpoints(service: Service, workloads: Iterable[Workload]) -> list[Endpoint]:
    """The workloads of the service's namespace that its selector picks, with port mappings."""
    ns = service.metadata.namespace
    out = []
    for wl in workloads:
        if wl.metadata.namespace != ns or not selects(service.spec.selector, wl.metadata.labels):
            continue
        ports = tuple(
            (p.port, t) for p in service.spec.ports if (t := target_port(p, wl)) is not None
        )
        out.append(Endpoint(wl.metadata.name, wl.spec.node_name, wl.status.pod_ip, ports))
    return sorted(out, key=lambda e: e.workload)
