"""Name resolution inside pods: a hosts file per pod namespace.

`ip netns exec` bind-mounts `/etc/netns/<ns>/hosts` and `resolv.conf` over `/etc/`, so every
process started in a pod resolves `svc` (its own namespace), `svc.ns` and
`svc.ns.svc.<cluster domain>` from the file, with no DNS server to run. A hosts file is not
searched with the resolv.conf search list, so each short form is written out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceName:
    name: str
    namespace: str
    vip: str


def hosts_file(
    pod_name: str,
    pod_namespace: str,
    pod_ip: str,
    services: Iterable[ServiceName],
    cluster_domain: str = "cluster.local",
) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{pod_name}",
    ]
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        names = [f"{svc.name}.{svc.namespace}.svc.{cluster_domain}", f"{svc.name}.{svc.namespace}"]
        if svc.namespace == pod_namespace:
            names.append(svc.name)
        lines.append(f"{svc.vip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(pod_namespace: str, cluster_domain: str = "cluster.local") -> str:
    # No DNS server: lookups that the hosts file cannot answer fail at once (nothing listens
    # on the pod's loopback) instead of timing out.
    search = f"{pod_namespace}.svc.{cluster_domain} svc.{cluster_domain} {cluster_domain}"
    return f"search {search}\nnameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n"
