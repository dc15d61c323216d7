"""Well-known labels, in a module of their own so the proxies can use them without loading the
configuration model (pydantic): the node proxy's memory counts.

Labels whose values change data-plane behaviour are checked by the model: a typo must not
silently opt out.
"""

LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
DATAPLANE_MODES = ("ambient", "none")
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
# Meshway's own: a pod labelled `meshway.io/proxy: sidecar` gets a proxy of its own (sidecar
# mode, for hybrid deployments) and the node proxy leaves it alone.
LABEL_PROXY_MODE = "meshway.io/proxy"
PROXY_MODE_SIDECAR = "sidecar"
