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
# Pods of a waypoint the control plane deploys from a Gateway: the runtime hands them their
# node's credential (MESHWAY_CREDENTIALS), as it does to sidecars. Only the control plane may
# set it (admission refuses it from users).
PROXY_MODE_WAYPOINT = "waypoint"
# Gateway API's label on the pods and Service of a deployed Gateway; the Service selects on it.
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
# On objects the control plane creates for a Gateway: "Gateway/<name>" in the same namespace.
# Such objects are changed and deleted only with their Gateway.
ANNOTATION_MANAGED_BY = "meshway.io/managed-by"
WAYPOINT_GATEWAY_CLASSES = ("istio-waypoint", "meshway-waypoint")
# On a waypoint Gateway: how many waypoint processes (Workloads) to run, "1" to
# MAX_WAYPOINT_REPLICAS. Gateway API has no replicas field; Istio scales the Deployment.
ANNOTATION_REPLICAS = "meshway.io/replicas"
MAX_WAYPOINT_REPLICAS = 16


def replicas_error(value: str) -> str | None:
    """Why `value` is not a valid `meshway.io/replicas` annotation, or None."""
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        return f"must be a whole number from 1 to {MAX_WAYPOINT_REPLICAS}, got {value!r}"
    if int(value) > MAX_WAYPOINT_REPLICAS:
        return f"at most {MAX_WAYPOINT_REPLICAS} waypoint replicas, got {value}"
    return None
