"""The local runtime's network: a cluster namespace with a bridge, a namespace per node, a
namespace per pod.

```
 cluster ns  mw.<c>          br0 ───────────────┬──────────────────────┐
                                                │ veth                 │ veth
 node ns     mw.<c>.node.<n>             eth0 10.250.0.2        eth0 10.250.0.3
                                   routes: other nodes' pod CIDRs via their eth0 address
                                   nft table meshway_services: Service VIP DNAT
                                    │ veth (169.254.1.1 on the node side)
 pod ns      mw.<c>.pod.<ns>.<name>  eth0 10.244.0.2/32, default via 169.254.1.1
```

Pods are routed point-to-point (as Calico does) rather than bridged, so every packet a pod
sends crosses its node's IP layer: Service DNAT and connection tracking see same-node traffic
too, with no bridge-netfilter tricks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshway.runtime import host

POD_GATEWAY = "169.254.1.1"
SERVICES_TABLE = "meshway_services"


@dataclass(frozen=True)
class ClusterNames:
    """Every name the runtime gives to host objects, from one place, so tear-down finds them."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"mw.{self.cluster}."

    @property
    def cluster_ns(self) -> str:
        return f"mw.{self.cluster}"

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}node.{node}"

    def pod_ns(self, namespace: str, name: str) -> str:
        return f"{self.prefix}pod.{namespace}.{name}"

    def all_namespaces(self) -> list[str]:
        """Every network namespace of this cluster that exists now."""
        found = host.netns_list(self.prefix)
        if host.netns_exists(self.cluster_ns):
            found.append(self.cluster_ns)
        return found


@dataclass(frozen=True)
class NodeAddress:
    name: str
    ip: str
    pod_cidr: str


def node_ip(node_network: str, pod_cidr: str, cluster_pod_cidr: str) -> str:
    """A node's address on the node network, derived from its pod CIDR's index (stable)."""
    net = ipaddress.ip_network(node_network)
    subnet = ipaddress.ip_network(pod_cidr)
    whole = ipaddress.ip_network(cluster_pod_cidr)
    index = (int(subnet.network_address) - int(whole.network_address)) // subnet.num_addresses
    if index + 2 >= net.num_addresses - 1:
        raise ValueError(f"node network {node_network} has no room for node #{index}")
    return str(net.network_address + 2 + index)


class ClusterNetwork:
    def __init__(self, names: ClusterNames, node_network: str) -> None:
        self.names = names
        self.node_network = ipaddress.ip_network(node_network)

    # -- cluster and nodes ---------------------------------------------------------------------

    def ensure_cluster(self) -> None:
        ns = self.names.cluster_ns
        host.netns_add(ns)
        if "br0" not in host.ip("-o", "link", "show", netns=ns):
            host.ip("link", "add", "br0", "type", "bridge", netns=ns)
        host.ip("link", "set", "br0", "up", netns=ns)

    def ensure_node(self, node: NodeAddress) -> None:
        ns = self.names.node_ns(node.name)
        fresh = not host.netns_exists(ns)
        host.netns_add(ns)
        if fresh or "eth0" not in host.ip("-o", "link", "show", netns=ns):
            peer = host.link_name("mwn", node.name)
            host.ip(
                "link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", peer, "netns", self.names.cluster_ns,
            )  # fmt: skip
            host.ip("link", "set", peer, "master", "br0", "up", netns=self.names.cluster_ns)
            prefix = self.node_network.prefixlen
            host.ip("addr", "add", f"{node.ip}/{prefix}", "dev", "eth0", netns=ns)
            host.ip("link", "set", "eth0", "up", netns=ns)
            host.sysctl(ns, "net.ipv4.ip_forward", "1")
            host.sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")
            host.sysctl(ns, "net.ipv4.conf.default.rp_filter", "0")

    def route_nodes(self, nodes: Iterable[NodeAddress]) -> None:
        """Each node reaches the other nodes' pod CIDRs through their node address."""
        nodes = list(nodes)
        for node in nodes:
            ns = self.names.node_ns(node.name)
            for other in nodes:
                if other.name != node.name:
                    host.ip("route", "replace", other.pod_cidr, "via", other.ip, netns=ns)

    def delete_node(self, node: str) -> None:
        host.netns_delete(self.names.node_ns(node))

    # -- pods ----------------------------------------------------------------------------------

    def ensure_pod(self, node: str, namespace: str, name: str, pod_ip: str) -> str:
        """Create the pod's namespace and its routed link to the node; returns the netns name."""
        pod_ns = self.names.pod_ns(namespace, name)
        node_ns = self.names.node_ns(node)
        host.netns_add(pod_ns)
        if "eth0" in host.ip("-o", "link", "show", netns=pod_ns):
            return pod_ns
        peer = host.link_name("mwp", f"{namespace}/{name}")
        host.ip(
            "link", "add", "eth0", "netns", pod_ns, "type", "veth",
            "peer", "name", peer, "netns", node_ns,
        )  # fmt: skip
        host.ip("addr", "add", f"{pod_ip}/32", "dev", "eth0", netns=pod_ns)
        host.ip("link", "set", "eth0", "up", netns=pod_ns)
        host.ip("route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link", netns=pod_ns)
        host.ip("route", "add", "default", "via", POD_GATEWAY, "dev", "eth0", netns=pod_ns)
        host.ip("addr", "add", f"{POD_GATEWAY}/32", "dev", peer, netns=node_ns)
        host.ip("link", "set", peer, "up", netns=node_ns)
        host.ip("route", "replace", f"{pod_ip}/32", "dev", peer, netns=node_ns)
        return pod_ns

    def delete_pod(self, namespace: str, name: str) -> None:
        # The veth pair (and the node's route over it) goes with the pod's namespace.
        host.netns_delete(self.names.pod_ns(namespace, name))

    # -- services ------------------------------------------------------------------------------

    def program_services(
        self, node: str, services: Mapping[tuple[str, int], list[tuple[str, int]]]
    ) -> None:
        """Replace the node's Service DNAT table in one nftables transaction.

        `services` maps (VIP, port) to its endpoints [(pod IP, target port)]; connections are
        spread round robin, and a VIP with no endpoint is refused with a TCP reset.
        """
        nat: list[str] = []
        reject: list[str] = []
        for (vip, port), endpoints in sorted(services.items()):
            match = f"ip daddr {vip} tcp dport {port}"
            if endpoints:
                elements = ", ".join(f"{i} : {ip} . {tp}" for i, (ip, tp) in enumerate(endpoints))
                nat.append(
                    f"{match} dnat ip to numgen inc mod {len(endpoints)} map {{ {elements} }}"
                )
            else:
                reject.append(f"{match} reject with tcp reset")
        body = "\n".join(
            [
                f"table ip {SERVICES_TABLE} {{",
                "  chain prerouting {",
                "    type nat hook prerouting priority dstnat; policy accept;",
                *(f"    {rule}" for rule in nat),
                "  }",
                "  chain output {",
                "    type nat hook output priority -100; policy accept;",
                *(f"    {rule}" for rule in nat),
                "  }",
                "  chain no_endpoints {",
                "    type filter hook prerouting priority filter; policy accept;",
                *(f"    {rule}" for rule in reject),
                "  }",
                "}",
            ]
        )
        # Declare, delete and re-create in one transaction: never a moment without rules.
        script = f"table ip {SERVICES_TABLE}\ndelete table ip {SERVICES_TABLE}\n{body}\n"
        host.nft(script, netns=self.names.node_ns(node))

    # -- tear-down -----------------------------------------------------------------------------

    def delete_everything(self) -> list[str]:
        """Remove every namespace of this cluster (pods first); returns what was removed."""
        removed = []
        for ns in sorted(self.names.all_namespaces(), key=lambda n: (".pod." not in n, n)):
            host.netns_delete(ns)
            removed.append(ns)
        return removed
