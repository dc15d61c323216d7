"""Typed configuration: Kubernetes-shaped resources that accept Istio and Gateway API YAML as is.

Users bring manifests they already run on Istio ambient, so the field names, `apiVersion`s and
validation rules follow the upstream APIs. Every model is strict (a string where an integer is
expected is an error, as with a CRD schema) and forbids unknown fields, so that a typo is an
error and not a policy that silently matches nothing. Cross-field rules raise `FieldError` with
the path below the failing model, which the loader turns into a full field path.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal, NamedTuple
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticUndefined

from meshway.config.errors import FieldError
from meshway.config.labels import (
    ANNOTATION_REPLICAS,
    DATAPLANE_MODES,
    LABEL_DATAPLANE_MODE,
    LABEL_WAYPOINT_FOR,
    WAYPOINT_FOR_VALUES,
    replicas_error,
)

DEFAULT_NAMESPACE = "default"

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
CORE_GROUPS = ("", "core")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_GATEWAY_HOSTNAME = re.compile(
    r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_GO_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


# --------------------------------------------------------------------------- value checks


def dns_subdomain_error(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain (the rule for most object names), or None."""
    if not value:
        return "must not be empty"
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.match(value):
        return (
            f"{value!r} is not a valid name: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def dns_label_error(value: str) -> str | None:
    """Why `value` is not a DNS-1123 label (namespace names, subset names), or None."""
    if not value:
        return "must not be empty"
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.match(value):
        return (
            f"{value!r} is not a valid DNS label: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return None


def label_key_error(key: str) -> str | None:
    """Why `key` is not a Kubernetes label/annotation key (`[prefix/]name`), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return f"key {key!r}: the prefix before '/' must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            f"key {key!r}: the name must be 1-63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a Kubernetes label value (empty is allowed), or None."""
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (
            f"value {value!r} must be at most 63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def duration_seconds(value: str) -> float:
    """Seconds in a Go/protobuf ("1.5s", "1h30m") or Gateway API ("500ms") duration string.

    The xDS translation needs numbers; validation has already accepted the string.
    """
    if value == "0":
        return 0.0
    pos = 0
    total = 0.0
    for match in _GO_DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise ValueError(f"invalid duration {value!r}: use e.g. '10s', '500ms' or '1h30m'")
    return total


def _gateway_duration(value: str) -> str:
    if not _GATEWAY_DURATION.match(value):
        raise ValueError(
            f"invalid duration {value!r}: Gateway API durations are 1-4 groups of up to 5 digits "
            "with a unit h, m, s or ms, e.g. '10s', '500ms', '1m30s'"
        )
    return value


def _go_duration(value: str) -> str:
    duration_seconds(value)
    return value


def _ip_or_cidr_error(value: str) -> str | None:
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError as exc:
        return f"invalid IP address or CIDR {value!r}: {exc}"
    return None


def _ip_error(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"invalid IP address {value!r}"
    return None


def _regex_error(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"invalid regular expression {value!r}: {exc}"
    return None


def _header_name_error(value: str) -> str | None:
    if not _HEADER_NAME.match(value):
        return f"invalid HTTP header name {value!r}"
    return None


def _iana_svc_name_error(value: str) -> str | None:
    if (
        len(value) > 15
        or not _IANA_SVC_NAME.match(value)
        or "--" in value
        or not any(c.isalpha() for c in value)
    ):
        return (
            f"invalid port name {value!r}: use at most 15 lowercase letters, digits and '-', "
            "with at least one letter"
        )
    return None


def _port_error(value: int) -> str | None:
    if not 1 <= value <= 65535:
        return f"port must be between 1 and 65535, got {value}"
    return None


def _raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise FieldError(problems[0][0], problems[0][1], *problems[1:])


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    """Label maps (metadata, selectors, subsets) all follow the Kubernetes label syntax."""
    problems: list[tuple[str, str]] = []
    for key, label in value.items():
        error = label_key_error(key) or label_value_error(label)
        if error:
            problems.append((f"[{key}]", error))
    _raise_problems(problems)
    return value


def _check_each(
    problems: list[tuple[str, str]],
    field: str,
    values: Iterable[str],
    check: Callable[[str], str | None],
) -> None:
    for i, value in enumerate(values):
        error = check(value)
        if error:
            problems.append((f"{field}[{i}]", error))


def _not_empty(value: str) -> str | None:
    return "must not be an empty string" if not value else None


def describe_value(value: object) -> str:
    """A short, YAML-flavoured description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _int_or_string(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected integer or string, got {describe_value(value)}")
    return value


def _target_port(value: object) -> int | str:
    checked = _int_or_string(value)
    error = _port_error(checked) if isinstance(checked, int) else _iana_svc_name_error(checked)
    if error:
        raise ValueError(error)
    return checked


Port = Annotated[int, Field(ge=1, le=65535)]
IntOrString = Annotated[int | str, PlainValidator(_int_or_string)]
TargetPort = Annotated[int | str, PlainValidator(_target_port)]
GatewayDuration = Annotated[str, AfterValidator(_gateway_duration)]
IstioDuration = Annotated[str, AfterValidator(_go_duration)]
HTTPMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
Protocol = Literal["TCP", "UDP", "SCTP"]


# --------------------------------------------------------------------------- base models


_EMPTY_DEFAULTS: dict[type[BaseModel], list[tuple[str, str, Any]]] = {}


def _empty_default_fields(cls: type[BaseModel]) -> list[tuple[str, str, Any]]:
    """(name, alias, default) of fields that may be left out of the output when unchanged."""
    cached = _EMPTY_DEFAULTS.get(cls)
    if cached is None:
        cached = []
        for name, info in cls.model_fields.items():
            if info.default_factory is not None:
                default = info.default_factory()  # type: ignore[call-arg]
            elif info.default is PydanticUndefined:
                continue
            else:
                default = info.default
            cached.append((name, info.alias or name, default))
        _EMPTY_DEFAULTS[cls] = cached
    return cached


def _is_empty(value: object) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


class MeshModel(BaseModel):
    """Strict, camelCase, closed-world base for every configuration model."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )

    @model_serializer(mode="wrap")
    def _omit_empty_defaults(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """Leave out unset optional fields so that `to_dict()` reads like the user's manifest."""
        data: dict[str, Any] = handler(self)
        for name, alias, default in _empty_default_fields(type(self)):
            key = alias if info.by_alias else name
            if key in data and _is_empty(data[key]) and getattr(self, name) == default:
                del data[key]
        return data


class ObjectKey(NamedTuple):
    """Identity of an object in the store; namespace is "" for cluster-scoped kinds."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"


class ObjectMeta(MeshModel):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Set by the control plane's store; accepted on input so that `get -o yaml` output re-applies.
    resource_version: str | None = None
    uid: str | None = None
    creation_timestamp: str | None = None
    generation: int | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        error = dns_subdomain_error(value)
        if error:
            raise ValueError(error)
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        if value == "":
            return None
        if value is not None:
            error = dns_label_error(value)
            if error:
                raise ValueError(error)
        return value

    _labels = field_validator("labels")(_check_labels)

    @field_validator("annotations")
    @classmethod
    def _check_annotations(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [(f"[{key}]", err) for key in value if (err := label_key_error(key))]
        _raise_problems(problems)
        return value


class Resource(MeshModel):
    """A configuration object: `apiVersion`, `kind`, `metadata`, then the kind's spec/status."""

    KIND: ClassVar[str] = ""
    API_VERSIONS: ClassVar[tuple[str, ...]] = ()
    NAMESPACED: ClassVar[bool] = True
    # Label values that the data plane interprets, checked so that a typo is not an opt-out.
    KNOWN_LABEL_VALUES: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    api_version: str = Field(default="", validate_default=True)
    kind: str = Field(default="", validate_default=True)
    metadata: ObjectMeta

    @field_validator("api_version")
    @classmethod
    def _check_api_version(cls, value: str) -> str:
        if not cls.API_VERSIONS:
            raise ValueError("Resource is abstract: use one of the kinds in KINDS")
        if not value:
            return cls.API_VERSIONS[0]
        if value not in cls.API_VERSIONS:
            accepted = ", ".join(repr(v) for v in cls.API_VERSIONS)
            raise ValueError(f"apiVersion {value!r} is not accepted for {cls.KIND}; use {accepted}")
        return value

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if value and value != cls.KIND:
            raise ValueError(f"kind {value!r} does not match {cls.KIND}")
        return cls.KIND

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, meta: ObjectMeta) -> ObjectMeta:
        problems: list[tuple[str, str]] = []
        if cls.NAMESPACED:
            if meta.namespace is None:
                meta = meta.model_copy(update={"namespace": DEFAULT_NAMESPACE})
        elif meta.namespace is not None:
            problems.append(("namespace", f"{cls.KIND} is cluster-scoped: remove the namespace"))
        name_error = cls._name_error(meta.name)
        if name_error:
            problems.append(("name", name_error))
        for key, allowed in cls.KNOWN_LABEL_VALUES.items():
            value = meta.labels.get(key)
            if value is not None and value not in allowed:
                choices = ", ".join(repr(v) for v in allowed)
                problems.append((f"labels[{key}]", f"must be one of {choices}, got {value!r}"))
        _raise_problems(problems)
        return meta

    @classmethod
    def _name_error(cls, name: str) -> str | None:
        """Kinds with stricter naming rules than a DNS subdomain override this."""
        return None

    @property
    def key(self) -> ObjectKey:
        namespace = (self.metadata.namespace or DEFAULT_NAMESPACE) if self.NAMESPACED else ""
        return ObjectKey(self.KIND, namespace, self.metadata.name)

    @property
    def display_name(self) -> str:
        """'namespace/name' for namespaced objects, 'name' for cluster-scoped ones."""
        key = self.key
        return f"{key.namespace}/{key.name}" if key.namespace else key.name

    @property
    def object_ref(self) -> str:
        """'Kind namespace/name', the form used in messages."""
        return str(self.key)

    def to_dict(self) -> dict[str, Any]:
        """The object as Kubernetes-shaped plain data (camelCase, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def spec_dict(self) -> dict[str, Any]:
        spec = getattr(self, "spec", None)
        if not isinstance(spec, BaseModel):
            return {}
        return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


class LabelSelectorRequirement(MeshModel):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> LabelSelectorRequirement:
        error = label_key_error(self.key)
        if error:
            raise FieldError("key", error)
        if self.operator in ("In", "NotIn") and not self.values:
            raise FieldError("values", f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise FieldError("values", f"operator {self.operator} takes no values")
        return self


class LabelSelector(MeshModel):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    _match_labels = field_validator("match_labels")(_check_labels)


class WorkloadSelector(MeshModel):
    """Istio's selector: labels only, and no wildcards (Istio rejects them)."""

    match_labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("match_labels")
    @classmethod
    def _check_match_labels(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [
            (f"[{key}]", "wildcards are not supported in selectors")
            for key, label in value.items()
            if "*" in key or "*" in label
        ]
        _raise_problems(problems)
        return _check_labels(value)


# --------------------------------------------------------------------------- core kinds


class Namespace(Resource):
    """Labelling a namespace `istio.io/dataplane-mode: ambient` enrolls all of its workloads."""

    KIND: ClassVar[str] = "Namespace"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = False
    KNOWN_LABEL_VALUES: ClassVar[Mapping[str, tuple[str, ...]]] = {
        LABEL_DATAPLANE_MODE: DATAPLANE_MODES
    }

    @classmethod
    def _name_error(cls, name: str) -> str | None:
        return dns_label_error(name)


class NodeSpec(MeshModel):
    unschedulable: bool = False


class NodeStatus(MeshModel):
    pod_cidr: str | None = Field(default=None, alias="podCIDR")

    @field_validator("pod_cidr")
    @classmethod
    def _check_cidr(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(f"invalid CIDR {value!r}: {exc}") from None
        return value


class Node(Resource):
    """A node of the local runtime; it runs one node proxy."""

    KIND: ClassVar[str] = "Node"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("meshway.io/v1alpha1",)
    NAMESPACED: ClassVar[bool] = False

    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)


class ServiceAccount(Resource):
    """The identity unit: a workload's SPIFFE ID is derived from its namespace and account."""

    KIND: ClassVar[str] = "ServiceAccount"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)


class ServicePort(MeshModel):
    name: str | None = None
    port: Port
    target_port: TargetPort | None = None
    protocol: Protocol = "TCP"
    app_protocol: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None:
            error = dns_label_error(value)
            if error:
                raise ValueError(error)
        return value

    @property
    def effective_target_port(self) -> int | str:
        """Kubernetes defaults targetPort to port."""
        return self.port if self.target_port is None else self.target_port


class ServiceSpec(MeshModel):
    selector: dict[str, str] = Field(default_factory=dict)
    ports: list[ServicePort] = Field(default_factory=list)
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    type: Literal["ClusterIP"] = "ClusterIP"

    _selector = field_validator("selector")(_check_labels)

    @field_validator("cluster_ip")
    @classmethod
    def _check_cluster_ip(cls, value: str | None) -> str | None:
        if value is not None and value != "None" and _ip_error(value):
            raise ValueError(f"invalid clusterIP {value!r}: use an IP address or 'None'")
        return value

    @model_validator(mode="after")
    def _check_ports(self) -> ServiceSpec:
        problems: list[tuple[str, str]] = []
        if not self.ports and self.cluster_ip != "None":
            problems.append(("ports", "a ClusterIP Service needs at least one port"))
        seen_names: dict[str, int] = {}
        seen_ports: dict[tuple[int, str], int] = {}
        for i, port in enumerate(self.ports):
            if len(self.ports) > 1 and not port.name:
                problems.append((f"ports[{i}].name", "required when a Service has several ports"))
            if port.name:
                if port.name in seen_names:
                    problems.append((f"ports[{i}].name", f"duplicate port name {port.name!r}"))
                seen_names.setdefault(port.name, i)
            number = (port.port, port.protocol)
            if number in seen_ports:
                problems.append(
                    (
                        f"ports[{i}].port",
                        f"duplicate port {port.port}/{port.protocol} "
                        f"(also ports[{seen_ports[number]}])",
                    )
                )
            seen_ports.setdefault(number, i)
        _raise_problems(problems)
        return self

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


class Service(Resource):
    """A stable virtual IP and name in front of the workloads that its selector matches."""

    KIND: ClassVar[str] = "Service"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    spec: ServiceSpec

    @classmethod
    def _name_error(cls, name: str) -> str | None:
        # Service names become DNS names and env var prefixes: Kubernetes requires DNS-1035.
        if len(name) > 63 or not _DNS1035_LABEL.match(name):
            return (
                f"invalid Service name {name!r}: use at most 63 lowercase letters, digits and "
                "'-', starting with a letter"
            )
        return None


class WorkloadPort(MeshModel):
    name: str | None = None
    container_port: Port
    protocol: Protocol = "TCP"

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None:
            error = _iana_svc_name_error(value)
            if error:
                raise ValueError(error)
        return value


class WorkloadSpec(MeshModel):
    service_account_name: str = "default"
    node_name: str
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[WorkloadPort] = Field(default_factory=list)
    working_dir: str | None = None

    @field_validator("service_account_name", "node_name")
    @classmethod
    def _check_reference(cls, value: str) -> str:
        error = dns_subdomain_error(value)
        if error:
            raise ValueError(error)
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [
            (f"[{key}]", f"invalid environment variable name {key!r}")
            for key in value
            if not key or "=" in key or "\0" in key
        ]
        _raise_problems(problems)
        return value

    @model_validator(mode="after")
    def _check_ports(self) -> WorkloadSpec:
        problems: list[tuple[str, str]] = []
        names: dict[str, int] = {}
        numbers: dict[tuple[int, str], int] = {}
        for i, port in enumerate(self.ports):
            if port.name is not None:
                if port.name in names:
                    problems.append(
                        (
                            f"ports[{i}].name",
                            f"duplicate port name {port.name!r} (also ports[{names[port.name]}])",
                        )
                    )
                names.setdefault(port.name, i)
            number = (port.container_port, port.protocol)
            if number in numbers:
                problems.append(
                    (
                        f"ports[{i}].containerPort",
                        f"duplicate port {port.container_port}/{port.protocol}",
                    )
                )
            numbers.setdefault(number, i)
        _raise_problems(problems)
        return self


class WorkloadStatus(MeshModel):
    pod_ip: str | None = Field(default=None, alias="podIP")
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"] | None = None

    @field_validator("pod_ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        if value is not None:
            error = _ip_error(value)
            if error:
                raise ValueError(error)
        return value


class Workload(Resource):
    """The pod of the local runtime: a process in its own network namespace on a node."""

    KIND: ClassVar[str] = "Workload"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("meshway.io/v1alpha1",)
    KNOWN_LABEL_VALUES: ClassVar[Mapping[str, tuple[str, ...]]] = {
        LABEL_DATAPLANE_MODE: DATAPLANE_MODES
    }

    spec: WorkloadSpec
    status: WorkloadStatus = Field(default_factory=WorkloadStatus)


# --------------------------------------------------------------------------- Istio security


ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
_TARGET_REF_KINDS = {
    "Service": CORE_GROUPS,
    "ServiceEntry": ("networking.istio.io",),
    "Gateway": (GATEWAY_API_GROUP,),
    "GatewayClass": (GATEWAY_API_GROUP,),
}
_CONDITION_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
_CONDITION_KEY_PREFIXES = (
    "request.headers[",
    "request.auth.claims[",
    "experimental.envoy.filters.",
)


class PolicyTargetReference(MeshModel):
    """Attaches a policy to a Service or Gateway; such policies are enforced by the waypoint."""

    group: str = ""
    kind: str
    name: str
    namespace: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PolicyTargetReference:
        problems: list[tuple[str, str]] = []
        if not self.name:
            problems.append(("name", "must not be empty"))
        if self.namespace:
            problems.append(
                ("namespace", "cross-namespace targetRefs are not supported: remove namespace")
            )
        groups = _TARGET_REF_KINDS.get(self.kind)
        if groups is None:
            kinds = ", ".join(sorted(_TARGET_REF_KINDS))
            problems.append(("kind", f"unsupported kind {self.kind!r}; use one of {kinds}"))
        elif self.group not in groups:
            problems.append(("group", f"kind {self.kind} needs group {groups[0]!r}"))
        _raise_problems(problems)
        return self


def _check_selection(
    selector: WorkloadSelector | None,
    target_ref: PolicyTargetReference | None,
    target_refs: list[PolicyTargetReference],
) -> list[tuple[str, str]]:
    """Istio: a policy binds by selector (node proxy) or by targetRef(s) (waypoint), not both."""
    if target_ref is not None and target_refs:
        return [("targetRef", "targetRef and targetRefs cannot both be set: use targetRefs")]
    if selector is not None and (target_ref is not None or target_refs):
        field = "targetRefs" if target_refs else "targetRef"
        return [(field, f"selector and {field} cannot both be set: choose one")]
    return []


class Source(MeshModel):
    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    not_service_accounts: list[str] = Field(default_factory=list)
    ip_blocks: list[str] = Field(default_factory=list)
    not_ip_blocks: list[str] = Field(default_factory=list)
    remote_ip_blocks: list[str] = Field(default_factory=list)
    not_remote_ip_blocks: list[str] = Field(default_factory=list)
    # A Meshway extension (named in our brief; Istio matches trust domains through principals):
    # the peer's SPIFFE trust domain must (not) be one of these.
    trust_domains: list[str] = Field(default_factory=list)
    not_trust_domains: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Source:
        problems: list[tuple[str, str]] = []
        fields = type(self).model_fields
        if not any(getattr(self, name) for name in fields):
            problems.append(("", "source must set at least one field"))
        for name, info in fields.items():
            alias = info.alias or name
            values: list[str] = getattr(self, name)
            if name.endswith("ip_blocks"):
                _check_each(problems, alias, values, _ip_or_cidr_error)
            elif name.endswith("service_accounts"):
                _check_each(problems, alias, values, _service_account_error)
            elif name.endswith("trust_domains"):
                _check_each(problems, alias, values, dns_subdomain_error)
            else:
                _check_each(problems, alias, values, _not_empty)
        identities = self.principals or self.not_principals or self.namespaces
        if (identities or self.not_namespaces) and (
            self.service_accounts or self.not_service_accounts
        ):
            field = "serviceAccounts" if self.service_accounts else "notServiceAccounts"
            problems.append((field, "cannot be combined with principals or namespaces"))
        _raise_problems(problems)
        return self


def _service_account_error(value: str) -> str | None:
    """Istio accepts 'sa' (the policy's namespace) or 'ns/sa'."""
    parts = value.split("/")
    if len(parts) > 2 or any(dns_subdomain_error(p) for p in parts):
        return f"invalid service account {value!r}: use 'name' or 'namespace/name'"
    return None


def _port_string_error(value: str) -> str | None:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        return f"invalid port {value!r}: use a number between 1 and 65535 as a string"
    return None


class Operation(MeshModel):
    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Operation:
        problems: list[tuple[str, str]] = []
        fields = type(self).model_fields
        if not any(getattr(self, name) for name in fields):
            problems.append(("", "operation must set at least one field"))
        for name, info in fields.items():
            check = _port_string_error if name.endswith("ports") else _not_empty
            _check_each(problems, info.alias or name, getattr(self, name), check)
        _raise_problems(problems)
        return self


class RuleFrom(MeshModel):
    source: Source


class RuleTo(MeshModel):
    operation: Operation


class RuleCondition(MeshModel):
    key: str
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> RuleCondition:
        problems: list[tuple[str, str]] = []
        if not self.key:
            problems.append(("key", "must not be empty"))
        elif self.key not in _CONDITION_KEYS and not (
            self.key.startswith(_CONDITION_KEY_PREFIXES)
            and (self.key.endswith("]") or self.key.startswith("experimental."))
        ):
            problems.append(("key", f"unknown condition key {self.key!r}"))
        if not self.values and not self.not_values:
            problems.append(("values", "set values or notValues"))
        check: Callable[[str], str | None] = _not_empty
        if self.key == "destination.port":
            check = _port_string_error
        elif self.key in ("source.ip", "remote.ip", "destination.ip"):
            check = _ip_or_cidr_error
        _check_each(problems, "values", self.values, check)
        _check_each(problems, "notValues", self.not_values, check)
        _raise_problems(problems)
        return self


class Rule(MeshModel):
    from_: list[RuleFrom] = Field(default_factory=list, alias="from")
    to: list[RuleTo] = Field(default_factory=list)
    when: list[RuleCondition] = Field(default_factory=list)


class ExtensionProvider(MeshModel):
    name: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value


# Identity attributes that Istio's CUSTOM (external authorization) action cannot match on.
_CUSTOM_UNSUPPORTED_SOURCE_FIELDS = (
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "request_principals",
    "not_request_principals",
)
_CUSTOM_UNSUPPORTED_CONDITIONS = ("source.namespace", "source.serviceAccount", "source.principal")


def _custom_action_problems(rules: list[Rule]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for i, rule in enumerate(rules):
        for j, rule_from in enumerate(rule.from_):
            for name in _CUSTOM_UNSUPPORTED_SOURCE_FIELDS:
                if getattr(rule_from.source, name):
                    path = f"rules[{i}].from[{j}].source.{to_camel(name)}"
                    problems.append((path, "not supported with action CUSTOM"))
        for j, condition in enumerate(rule.when):
            key = condition.key
            if key in _CUSTOM_UNSUPPORTED_CONDITIONS or key.startswith("request.auth."):
                problems.append((f"rules[{i}].when[{j}].key", "not supported with action CUSTOM"))
    return problems


class AuthorizationPolicySpec(MeshModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: ExtensionProvider | None = None
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> AuthorizationPolicySpec:
        problems = _check_selection(self.selector, self.target_ref, self.target_refs)
        if self.action == "CUSTOM":
            if self.provider is None:
                problems.append(("provider", "action CUSTOM requires provider.name"))
            problems += _custom_action_problems(self.rules)
        elif self.provider is not None:
            problems.append(("provider", "provider is only allowed with action CUSTOM"))
        if self.action in ("DENY", "CUSTOM") and not self.rules:
            problems.append(
                (
                    "rules",
                    f"a {self.action} policy without rules never matches: "
                    "add an empty rule {} to match every request",
                )
            )
        _raise_problems(problems)
        return self

    @property
    def targets_waypoint(self) -> bool:
        """targetRef(s) policies are enforced by the waypoint, the others by the node proxy."""
        return self.target_ref is not None or bool(self.target_refs)

    @property
    def all_target_refs(self) -> list[PolicyTargetReference]:
        return [self.target_ref] if self.target_ref is not None else list(self.target_refs)


class AuthorizationPolicy(Resource):
    """Istio's access control; see the brief §3 for the evaluation order users rely on."""

    KIND: ClassVar[str] = "AuthorizationPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_SECURITY_VERSIONS

    spec: AuthorizationPolicySpec = Field(default_factory=AuthorizationPolicySpec)


class PeerMtls(MeshModel):
    mode: Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"] = "UNSET"


class PeerAuthenticationSpec(MeshModel):
    selector: WorkloadSelector | None = None
    mtls: PeerMtls | None = None
    port_level_mtls: dict[int, PeerMtls] = Field(default_factory=dict)

    @field_validator("port_level_mtls", mode="before")
    @classmethod
    def _port_keys(cls, value: object) -> object:
        """YAML gives integer keys, JSON gives strings: accept both, as Istio does."""
        if not isinstance(value, dict):
            return value
        converted: dict[object, object] = {}
        problems: list[tuple[str, str]] = []
        for key, mode in value.items():
            number = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(number, bool) or not isinstance(number, int):
                problems.append((f"[{key}]", f"port must be a number, got {describe_value(key)}"))
            elif error := _port_error(number):
                problems.append((f"[{key}]", error))
            converted[number] = mode
        _raise_problems(problems)
        return converted

    @model_validator(mode="after")
    def _check(self) -> PeerAuthenticationSpec:
        if self.port_level_mtls and (self.selector is None or not self.selector.match_labels):
            raise FieldError(
                "portLevelMtls",
                "needs a selector with matchLabels: namespace-wide policies cannot set port modes",
            )
        return self


class PeerAuthentication(Resource):
    KIND: ClassVar[str] = "PeerAuthentication"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_SECURITY_VERSIONS

    spec: PeerAuthenticationSpec = Field(default_factory=PeerAuthenticationSpec)


class JwtHeader(MeshModel):
    name: str
    prefix: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        error = _header_name_error(value)
        if error:
            raise ValueError(error)
        return value


class ClaimToHeader(MeshModel):
    header: str
    claim: str

    @model_validator(mode="after")
    def _check(self) -> ClaimToHeader:
        problems: list[tuple[str, str]] = []
        if error := _header_name_error(self.header):
            problems.append(("header", error))
        if not self.claim:
            problems.append(("claim", "must not be empty"))
        _raise_problems(problems)
        return self


class JwtRule(MeshModel):
    issuer: str | None = None
    audiences: list[str] = Field(default_factory=list)
    jwks_uri: str | None = None
    jwks: str | None = None
    from_headers: list[JwtHeader] = Field(default_factory=list)
    from_params: list[str] = Field(default_factory=list)
    from_cookies: list[str] = Field(default_factory=list)
    output_payload_to_header: str | None = None
    output_claim_to_headers: list[ClaimToHeader] = Field(default_factory=list)
    forward_original_token: bool = False
    timeout: IstioDuration | None = None

    @model_validator(mode="after")
    def _check(self) -> JwtRule:
        problems: list[tuple[str, str]] = []
        if not self.issuer and not self.jwks_uri:
            problems.append(("issuer", "set issuer or jwksUri"))
        if self.jwks_uri:
            url = urlparse(self.jwks_uri)
            if url.scheme == "file":
                # A Meshway extension: a JWK set in a file on the waypoint's host.
                if url.netloc or not url.path.startswith("/"):
                    problems.append(
                        (
                            "jwksUri",
                            f"invalid file URL {self.jwks_uri!r}: use file:///absolute/path",
                        )
                    )
            elif url.scheme not in ("http", "https") or not url.netloc:
                problems.append(
                    (
                        "jwksUri",
                        f"invalid URL {self.jwks_uri!r}: use http(s)://host/ or file:///path",
                    )
                )
        if self.jwks is not None:
            try:
                keys = json.loads(self.jwks)
            except ValueError as exc:
                problems.append(("jwks", f"not valid JSON: {exc}"))
            else:
                if not isinstance(keys, dict) or not isinstance(keys.get("keys"), list):
                    problems.append(("jwks", "must be a JWK set: a JSON object with 'keys'"))
        if self.output_payload_to_header is not None and (
            error := _header_name_error(self.output_payload_to_header)
        ):
            problems.append(("outputPayloadToHeader", error))
        _check_each(problems, "audiences", self.audiences, _not_empty)
        _check_each(problems, "fromParams", self.from_params, _not_empty)
        _check_each(problems, "fromCookies", self.from_cookies, _not_empty)
        _raise_problems(problems)
        return self


class RequestAuthenticationSpec(MeshModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    jwt_rules: list[JwtRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> RequestAuthenticationSpec:
        _raise_problems(_check_selection(self.selector, self.target_ref, self.target_refs))
        return self


class RequestAuthentication(Resource):
    KIND: ClassVar[str] = "RequestAuthentication"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_SECURITY_VERSIONS

    spec: RequestAuthenticationSpec = Field(default_factory=RequestAuthenticationSpec)


# --------------------------------------------------------------------------- Gateway API


GATEWAY_API_VERSIONS = (f"{GATEWAY_API_GROUP}/v1", f"{GATEWAY_API_GROUP}/v1beta1")


class StatusCondition(MeshModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ParentReference(MeshModel):
    """A Gateway, or a Service for GAMMA (mesh) routes, that a route attaches to."""

    group: str = GATEWAY_API_GROUP
    kind: str = "Gateway"
    namespace: str | None = None
    name: str
    section_name: str | None = None
    port: Port | None = None

    @model_validator(mode="after")
    def _check(self) -> ParentReference:
        problems: list[tuple[str, str]] = []
        if not self.name:
            problems.append(("name", "must not be empty"))
        if self.kind == "Service" and self.group not in CORE_GROUPS:
            problems.append(("group", 'a Service parent needs group "" (the core group)'))
        if self.kind == "Gateway" and self.group != GATEWAY_API_GROUP:
            problems.append(("group", f"a Gateway parent needs group {GATEWAY_API_GROUP!r}"))
        _raise_problems(problems)
        return self

    @property
    def is_service(self) -> bool:
        return self.kind == "Service" and self.group in CORE_GROUPS


class BackendObjectReference(MeshModel):
    group: str = ""
    kind: str = "Service"
    name: str
    namespace: str | None = None
    port: Port | None = None

    @model_validator(mode="after")
    def _check_backend(self) -> BackendObjectReference:
        if self.kind == "Service" and self.group in CORE_GROUPS and self.port is None:
            raise FieldError("port", "required when referencing a Service")
        return self


class LocalObjectReference(MeshModel):
    group: str
    kind: str
    name: str


class HTTPHeader(MeshModel):
    name: str
    value: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        error = _header_name_error(value)
        if error:
            raise ValueError(error)
        return value


class HTTPHeaderModifier(MeshModel):
    set: list[HTTPHeader] = Field(default_factory=list)
    add: list[HTTPHeader] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> HTTPHeaderModifier:
        problems: list[tuple[str, str]] = []
        for field in ("set", "add"):
            seen: set[str] = set()
            for i, header in enumerate(getattr(self, field)):
                if header.name.lower() in seen:
                    problems.append((f"{field}[{i}].name", f"duplicate header {header.name!r}"))
                seen.add(header.name.lower())
        _check_each(problems, "remove", self.remove, _header_name_error)
        _raise_problems(problems)
        return self


class Fraction(MeshModel):
    numerator: int = Field(ge=0)
    denominator: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Fraction:
        if self.numerator > self.denominator:
            raise FieldError("numerator", "must not be greater than denominator")
        return self


class HTTPRequestMirrorFilter(MeshModel):
    backend_ref: BackendObjectReference
    percent: int | None = Field(default=None, ge=0, le=100)
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRequestMirrorFilter:
        if self.percent is not None and self.fraction is not None:
            raise FieldError("fraction", "percent and fraction cannot both be set")
        return self


class HTTPPathModifier(MeshModel):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPPathModifier:
        full = ("replaceFullPath", self.replace_full_path)
        prefix = ("replacePrefixMatch", self.replace_prefix_match)
        wanted, other = (full, prefix) if self.type == "ReplaceFullPath" else (prefix, full)
        problems: list[tuple[str, str]] = []
        if wanted[1] is None:
            problems.append((wanted[0], f"required when type is {self.type}"))
        if other[1] is not None:
            problems.append((other[0], f"not allowed when type is {self.type}"))
        _raise_problems(problems)
        return self


class HTTPRequestRedirectFilter(MeshModel):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = None
    path: HTTPPathModifier | None = None
    port: Port | None = None
    status_code: Literal[301, 302, 303, 307, 308] = 302


class HTTPURLRewriteFilter(MeshModel):
    hostname: str | None = None
    path: HTTPPathModifier | None = None


_FILTER_FIELDS = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "RequestMirror": "request_mirror",
    "RequestRedirect": "request_redirect",
    "URLRewrite": "url_rewrite",
    "ExtensionRef": "extension_ref",
}
_REPEATABLE_FILTERS = ("RequestMirror", "ExtensionRef")


def _check_filter_fields(model: BaseModel, filter_type: str) -> list[tuple[str, str]]:
    """Gateway API: the field named by `type` must be set, and no other filter field."""
    problems: list[tuple[str, str]] = []
    fields = type(model).model_fields
    for kind, name in _FILTER_FIELDS.items():
        if name not in fields:
            continue
        alias = fields[name].alias or name
        value = getattr(model, name)
        if kind == filter_type and value is None:
            problems.append((alias, f"required when type is {filter_type}"))
        elif kind != filter_type and value is not None:
            problems.append((alias, f"not allowed when type is {filter_type}"))
    return problems


def _check_filter_list(
    filters: Iterable[HTTPRouteFilter | GRPCRouteFilter],
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, filt in enumerate(filters):
        if filt.type in seen and filt.type not in _REPEATABLE_FILTERS:
            problems.append((f"filters[{i}]", f"{filt.type} may appear only once"))
        seen.add(filt.type)
    if {"RequestRedirect", "URLRewrite"} <= seen:
        problems.append(("filters", "RequestRedirect and URLRewrite cannot be used together"))
    return problems


class HTTPRouteFilter(MeshModel):
    type: Literal[
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestMirror",
        "RequestRedirect",
        "URLRewrite",
        "ExtensionRef",
    ]
    request_header_modifier: HTTPHeaderModifier | None = None
    response_header_modifier: HTTPHeaderModifier | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = None
    extension_ref: LocalObjectReference | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteFilter:
        _raise_problems(_check_filter_fields(self, self.type))
        return self

    @property
    def path_modifier(self) -> HTTPPathModifier | None:
        target = self.request_redirect or self.url_rewrite
        return target.path if target is not None else None


class HTTPBackendRef(BackendObjectReference):
    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: list[HTTPRouteFilter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_filters(self) -> HTTPBackendRef:
        _raise_problems(_check_filter_list(self.filters))
        return self


class HTTPPathMatch(MeshModel):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field(default="/", max_length=1024)

    @model_validator(mode="after")
    def _check(self) -> HTTPPathMatch:
        if self.type == "RegularExpression":
            error = _regex_error(self.value)
        elif not self.value.startswith("/"):
            error = f"an {self.type} path must start with '/', got {self.value!r}"
        else:
            error = None
        if error:
            raise FieldError("value", error)
        return self


class HTTPHeaderMatch(MeshModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str
    value: str

    @model_validator(mode="after")
    def _check(self) -> HTTPHeaderMatch:
        problems: list[tuple[str, str]] = []
        if error := _header_name_error(self.name):
            problems.append(("name", error))
        if self.type == "RegularExpression" and (error := _regex_error(self.value)):
            problems.append(("value", error))
        _raise_problems(problems)
        return self


class HTTPQueryParamMatch(MeshModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1)
    value: str

    @model_validator(mode="after")
    def _check(self) -> HTTPQueryParamMatch:
        if self.type == "RegularExpression" and (error := _regex_error(self.value)):
            raise FieldError("value", error)
        return self


class HTTPRouteMatch(MeshModel):
    path: HTTPPathMatch = Field(default_factory=HTTPPathMatch)
    headers: list[HTTPHeaderMatch] = Field(default_factory=list)
    query_params: list[HTTPQueryParamMatch] = Field(default_factory=list)
    method: HTTPMethod | None = None


class HTTPRouteTimeouts(MeshModel):
    request: GatewayDuration | None = None
    backend_request: GatewayDuration | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteTimeouts:
        if self.request is None or self.backend_request is None:
            return self
        request = duration_seconds(self.request)
        # A zero request timeout means "no timeout" in the Gateway API.
        if request and duration_seconds(self.backend_request) > request:
            raise FieldError("backendRequest", f"must not be longer than request ({self.request})")
        return self


class HTTPRouteRetry(MeshModel):
    codes: list[Annotated[int, Field(ge=400, le=599)]] = Field(default_factory=list)
    attempts: int | None = Field(default=None, ge=0)
    backoff: GatewayDuration | None = None


def _default_matches() -> list[HTTPRouteMatch]:
    return [HTTPRouteMatch()]


class HTTPRouteRule(MeshModel):
    name: str | None = None
    matches: list[HTTPRouteMatch] = Field(default_factory=_default_matches)
    filters: list[HTTPRouteFilter] = Field(default_factory=list)
    backend_refs: list[HTTPBackendRef] = Field(default_factory=list)
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteRule:
        problems = _check_filter_list(self.filters)
        for i, filt in enumerate(self.filters):
            modifier = filt.path_modifier
            if modifier is None or modifier.type != "ReplacePrefixMatch":
                continue
            if len(self.matches) != 1 or self.matches[0].path.type != "PathPrefix":
                problems.append(
                    (
                        f"filters[{i}]",
                        "ReplacePrefixMatch needs exactly one match with a PathPrefix path",
                    )
                )
        _raise_problems(problems)
        return self


def _check_hostnames(values: list[str]) -> list[str]:
    problems: list[tuple[str, str]] = []
    for i, host in enumerate(values):
        if len(host) > 253 or not _GATEWAY_HOSTNAME.match(host):
            problems.append((f"[{i}]", f"invalid hostname {host!r}"))
    _raise_problems(problems)
    return values


class RouteParentStatus(MeshModel):
    parent_ref: ParentReference
    controller_name: str
    conditions: list[StatusCondition] = Field(default_factory=list)


class RouteStatus(MeshModel):
    """Gateway API reports unresolved backends and rejected parents here, not as errors."""

    parents: list[RouteParentStatus] = Field(default_factory=list)


class HTTPRouteSpec(MeshModel):
    parent_refs: list[ParentReference] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: list[HTTPRouteRule] = Field(default_factory=list)

    _hostnames = field_validator("hostnames")(_check_hostnames)


class HTTPRoute(Resource):
    KIND: ClassVar[str] = "HTTPRoute"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API_VERSIONS

    spec: HTTPRouteSpec
    status: RouteStatus = Field(default_factory=RouteStatus)


class GRPCMethodMatch(MeshModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: str | None = None
    method: str | None = None

    @model_validator(mode="after")
    def _check(self) -> GRPCMethodMatch:
        problems: list[tuple[str, str]] = []
        if not self.service and not self.method:
            problems.append(("", "set service, method or both"))
        for field, value, pattern in (
            ("service", self.service, _GRPC_SERVICE),
            ("method", self.method, _GRPC_METHOD),
        ):
            if value is None:
                continue
            if self.type == "RegularExpression":
                if error := _regex_error(value):
                    problems.append((field, error))
            elif not pattern.match(value):
                problems.append((field, f"invalid gRPC {field} name {value!r}"))
        _raise_problems(problems)
        return self


class GRPCRouteMatch(MeshModel):
    method: GRPCMethodMatch | None = None
    headers: list[HTTPHeaderMatch] = Field(default_factory=list)


class GRPCRouteFilter(MeshModel):
    type: Literal[
        "RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef"
    ]
    request_header_modifier: HTTPHeaderModifier | None = None
    response_header_modifier: HTTPHeaderModifier | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    extension_ref: LocalObjectReference | None = None

    @model_validator(mode="after")
    def _check(self) -> GRPCRouteFilter:
        _raise_problems(_check_filter_fields(self, self.type))
        return self


class GRPCBackendRef(BackendObjectReference):
    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: list[GRPCRouteFilter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_filters(self) -> GRPCBackendRef:
        _raise_problems(_check_filter_list(self.filters))
        return self


class GRPCRouteRule(MeshModel):
    name: str | None = None
    matches: list[GRPCRouteMatch] = Field(default_factory=list)
    filters: list[GRPCRouteFilter] = Field(default_factory=list)
    backend_refs: list[GRPCBackendRef] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> GRPCRouteRule:
        _raise_problems(_check_filter_list(self.filters))
        return self


class GRPCRouteSpec(MeshModel):
    parent_refs: list[ParentReference] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: list[GRPCRouteRule] = Field(default_factory=list)

    _hostnames = field_validator("hostnames")(_check_hostnames)


class GRPCRoute(Resource):
    KIND: ClassVar[str] = "GRPCRoute"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (f"{GATEWAY_API_GROUP}/v1",)

    spec: GRPCRouteSpec
    status: RouteStatus = Field(default_factory=RouteStatus)


class RouteNamespaces(MeshModel):
    from_: Literal["All", "Same", "Selector"] = Field(default="Same", alias="from")
    selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _check(self) -> RouteNamespaces:
        if self.from_ == "Selector" and self.selector is None:
            raise FieldError("selector", "required when from is Selector")
        if self.from_ != "Selector" and self.selector is not None:
            raise FieldError("selector", "only allowed when from is Selector")
        return self


class RouteGroupKind(MeshModel):
    group: str = GATEWAY_API_GROUP
    kind: str


class AllowedRoutes(MeshModel):
    namespaces: RouteNamespaces = Field(default_factory=RouteNamespaces)
    kinds: list[RouteGroupKind] = Field(default_factory=list)


class SecretObjectReference(MeshModel):
    group: str = ""
    kind: str = "Secret"
    name: str
    namespace: str | None = None


class GatewayTLSConfig(MeshModel):
    mode: Literal["Terminate", "Passthrough"] = "Terminate"
    certificate_refs: list[SecretObjectReference] = Field(default_factory=list)
    options: dict[str, str] = Field(default_factory=dict)


class Listener(MeshModel):
    name: str
    hostname: str | None = None
    port: Port
    protocol: Literal["HTTP", "HTTPS", "TLS", "TCP", "UDP", "HBONE", "GRPC"]
    tls: GatewayTLSConfig | None = None
    allowed_routes: AllowedRoutes | None = None

    @model_validator(mode="after")
    def _check(self) -> Listener:
        problems: list[tuple[str, str]] = []
        if error := dns_label_error(self.name):
            problems.append(("name", error))
        if self.hostname is not None:
            if self.protocol in ("TCP", "UDP"):
                problems.append(("hostname", f"not allowed with protocol {self.protocol}"))
            elif not _GATEWAY_HOSTNAME.match(self.hostname):
                problems.append(("hostname", f"invalid hostname {self.hostname!r}"))
        if self.protocol in ("HTTPS", "TLS") and self.tls is None:
            problems.append(("tls", f"required with protocol {self.protocol}"))
        if self.protocol in ("HTTP", "TCP", "UDP", "HBONE") and self.tls is not None:
            problems.append(("tls", f"not allowed with protocol {self.protocol}"))
        _raise_problems(problems)
        return self


class GatewayAddress(MeshModel):
    type: Literal["IPAddress", "Hostname", "NamedAddress"] = "IPAddress"
    value: str = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> GatewayAddress:
        if self.type == "IPAddress" and (error := _ip_error(self.value)):
            raise FieldError("value", error)
        return self


class ListenerStatus(MeshModel):
    name: str
    supported_kinds: list[RouteGroupKind] = Field(default_factory=list)
    attached_routes: int = 0
    conditions: list[StatusCondition] = Field(default_factory=list)


class GatewayStatus(MeshModel):
    addresses: list[GatewayAddress] = Field(default_factory=list)
    conditions: list[StatusCondition] = Field(default_factory=list)
    listeners: list[ListenerStatus] = Field(default_factory=list)


class GatewaySpec(MeshModel):
    gateway_class_name: str
    listeners: list[Listener] = Field(min_length=1)
    addresses: list[GatewayAddress] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> GatewaySpec:
        problems: list[tuple[str, str]] = []
        names: dict[str, int] = {}
        for i, listener in enumerate(self.listeners):
            if listener.name in names:
                problems.append(
                    (
                        f"listeners[{i}].name",
                        f"duplicate listener name {listener.name!r} "
                        f"(also listeners[{names[listener.name]}])",
                    )
                )
            names.setdefault(listener.name, i)
        _raise_problems(problems)
        return self


class Gateway(Resource):
    """With gatewayClassName istio-waypoint, a waypoint: the L7 proxy for its namespace."""

    KIND: ClassVar[str] = "Gateway"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API_VERSIONS
    KNOWN_LABEL_VALUES: ClassVar[Mapping[str, tuple[str, ...]]] = {
        LABEL_WAYPOINT_FOR: WAYPOINT_FOR_VALUES
    }

    spec: GatewaySpec
    status: GatewayStatus = Field(default_factory=GatewayStatus)

    @property
    def waypoint_for(self) -> str:
        """Which traffic a waypoint handles; Istio's default is 'service'."""
        return self.metadata.labels.get(LABEL_WAYPOINT_FOR, "service")

    @field_validator("metadata")
    @classmethod
    def _check_replicas(cls, meta: ObjectMeta) -> ObjectMeta:
        value = meta.annotations.get(ANNOTATION_REPLICAS)
        if value is not None and (error := replicas_error(value)):
            raise FieldError(f"annotations[{ANNOTATION_REPLICAS}]", error)
        return meta

    @property
    def replicas(self) -> int:
        """How many waypoint processes to run (the `meshway.io/replicas` annotation)."""
        return int(self.metadata.annotations.get(ANNOTATION_REPLICAS, "1"))


# --------------------------------------------------------------------------- Istio networking


ISTIO_NETWORKING_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)


class PortSelector(MeshModel):
    number: Port


class HTTPCookie(MeshModel):
    name: str = Field(min_length=1)
    path: str | None = None
    ttl: IstioDuration | None = None


class RingHash(MeshModel):
    minimum_ring_size: int | None = Field(default=None, ge=0)


def _is_prime(value: int) -> bool:
    if value < 2:
        return False
    return all(value % f for f in range(2, math.isqrt(value) + 1))


class Maglev(MeshModel):
    table_size: int | None = Field(default=None, ge=1)

    @field_validator("table_size")
    @classmethod
    def _check_prime(cls, value: int | None) -> int | None:
        if value is not None and not _is_prime(value):
            raise ValueError(f"table size must be a prime number, got {value}")
        return value


class ConsistentHashLB(MeshModel):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: Maglev | None = None
    minimum_ring_size: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ConsistentHashLB:
        keys = [
            alias
            for alias, value in (
                ("httpHeaderName", self.http_header_name),
                ("httpCookie", self.http_cookie),
                ("useSourceIp", self.use_source_ip),
                ("httpQueryParameterName", self.http_query_parameter_name),
            )
            if value not in (None, False)
        ]
        if len(keys) != 1:
            found = ", ".join(keys) if keys else "none"
            raise FieldError(
                "",
                "set exactly one of httpHeaderName, httpCookie, useSourceIp, "
                f"httpQueryParameterName (found: {found})",
            )
        if self.ring_hash is not None and self.maglev is not None:
            raise FieldError("maglev", "ringHash and maglev cannot both be set")
        return self


class LoadBalancerSettings(MeshModel):
    simple: (
        Literal["UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"] | None
    ) = None
    consistent_hash: ConsistentHashLB | None = None

    @model_validator(mode="after")
    def _check(self) -> LoadBalancerSettings:
        if self.simple is not None and self.consistent_hash is not None:
            raise FieldError("consistentHash", "simple and consistentHash cannot both be set")
        return self


class TcpKeepalive(MeshModel):
    probes: int | None = Field(default=None, ge=0)
    time: IstioDuration | None = None
    interval: IstioDuration | None = None


class TCPSettings(MeshModel):
    max_connections: int | None = Field(default=None, ge=0)
    connect_timeout: IstioDuration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: IstioDuration | None = None
    idle_timeout: IstioDuration | None = None


class HTTPSettings(MeshModel):
    http1_max_pending_requests: int | None = Field(default=None, ge=0)
    http2_max_requests: int | None = Field(default=None, ge=0)
    max_requests_per_connection: int | None = Field(default=None, ge=0)
    max_retries: int | None = Field(default=None, ge=0)
    idle_timeout: IstioDuration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = Field(default=None, ge=0)


class ConnectionPoolSettings(MeshModel):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(MeshModel):
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = Field(default=None, ge=0)
    consecutive_gateway_errors: int | None = Field(default=None, ge=0)
    consecutive_5xx_errors: int | None = Field(default=None, ge=0, alias="consecutive5xxErrors")
    interval: IstioDuration | None = None
    base_ejection_time: IstioDuration | None = None
    max_ejection_percent: int | None = Field(default=None, ge=0, le=100)
    min_health_percent: int | None = Field(default=None, ge=0, le=100)


class ClientTLSSettings(MeshModel):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: list[str] = Field(default_factory=list)
    sni: str | None = None
    insecure_skip_verify: bool | None = None


class PortTrafficPolicy(MeshModel):
    port: PortSelector
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(MeshModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)


class Subset(MeshModel):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        error = dns_label_error(value)
        if error:
            raise ValueError(error)
        return value

    _labels = field_validator("labels")(_check_labels)


def _check_export_to(values: list[str]) -> list[str]:
    problems = [
        (f"[{i}]", f"invalid exportTo {v!r}: use '.', '*' or a namespace name")
        for i, v in enumerate(values)
        if v not in (".", "*") and dns_label_error(v)
    ]
    _raise_problems(problems)
    return values


class DestinationRuleSpec(MeshModel):
    host: str = Field(min_length=1)
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None

    _export_to = field_validator("export_to")(_check_export_to)

    @model_validator(mode="after")
    def _check(self) -> DestinationRuleSpec:
        problems: list[tuple[str, str]] = []
        names: dict[str, int] = {}
        for i, subset in enumerate(self.subsets):
            if subset.name in names:
                problems.append((f"subsets[{i}].name", f"duplicate subset {subset.name!r}"))
            names.setdefault(subset.name, i)
        _raise_problems(problems)
        return self

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


class DestinationRule(Resource):
    KIND: ClassVar[str] = "DestinationRule"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_NETWORKING_VERSIONS

    spec: DestinationRuleSpec


class StringMatch(MeshModel):
    """Istio's oneof: at most one of exact, prefix, regex (none = presence, for headers)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _check(self) -> StringMatch:
        set_fields = [
            name
            for name, value in (
                ("exact", self.exact),
                ("prefix", self.prefix),
                ("regex", self.regex),
            )
            if value is not None
        ]
        if len(set_fields) > 1:
            raise FieldError(set_fields[1], f"only one of {', '.join(set_fields)} may be set")
        if self.regex is not None and (error := _regex_error(self.regex)):
            raise FieldError("regex", error)
        return self


class HTTPMatchRequest(MeshModel):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: Port | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    source_namespace: str | None = None
    ignore_uri_case: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPMatchRequest:
        problems: list[tuple[str, str]] = []
        for field in ("headers", "withoutHeaders"):
            values = self.headers if field == "headers" else self.without_headers
            for name in values:
                if (error := _header_name_error(name)) or name != name.lower():
                    problems.append((f"{field}[{name}]", error or "header names must be lowercase"))
        _raise_problems(problems)
        return self


class Destination(MeshModel):
    host: str = Field(min_length=1)
    subset: str | None = None
    port: PortSelector | None = None


class HeaderOperations(MeshModel):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(MeshModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(MeshModel):
    destination: Destination
    weight: int | None = Field(default=None, ge=0, le=100)
    headers: Headers | None = None


class HTTPRewrite(MeshModel):
    uri: str | None = None
    authority: str | None = None


class HTTPRetry(MeshModel):
    attempts: int | None = Field(default=None, ge=0)
    per_try_timeout: IstioDuration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None


class Percent(MeshModel):
    value: float = Field(ge=0, le=100)


# gRPC status codes by name (grpc/doc/statuscodes.md), for a fault's `grpcStatus`.
GRPC_STATUS_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def grpc_status_code(value: str) -> int:
    """The number of a gRPC status given by name ("UNAVAILABLE") or number ("14")."""
    code = GRPC_STATUS_CODES.get(value.upper())
    if code is None and value.isdigit() and int(value) <= 16:
        code = int(value)
    if code is None:
        names = ", ".join(GRPC_STATUS_CODES)
        raise ValueError(f"unknown gRPC status {value!r}: use one of {names} or 0-16")
    return code


class FaultDelay(MeshModel):
    """A delay before the request goes on. Without `percentage` (or the deprecated integer
    `percent`) no request is delayed: what Istio does (its translation leaves Envoy's
    percentage at 0), whatever its older comments say."""

    percentage: Percent | None = None
    percent: int | None = Field(default=None, ge=0, le=100)
    fixed_delay: IstioDuration

    @model_validator(mode="after")
    def _check(self) -> FaultDelay:
        if duration_seconds(self.fixed_delay) < 0.001:
            raise FieldError("fixedDelay", "must be at least 1ms")
        return self

    @property
    def fraction(self) -> float:
        """The share of requests to delay, 0..1."""
        if self.percentage is not None:
            return self.percentage.value / 100
        return (self.percent or 0) / 100


class FaultAbort(MeshModel):
    """An answer instead of the upstream's: an HTTP status or a gRPC status. Without
    `percentage` no request is aborted (as in Istio, see FaultDelay)."""

    percentage: Percent | None = None
    http_status: int | None = Field(default=None, ge=200, le=599)
    grpc_status: str | None = None

    @model_validator(mode="after")
    def _check(self) -> FaultAbort:
        if (self.http_status is None) == (self.grpc_status is None):
            raise FieldError("httpStatus", "set exactly one of httpStatus and grpcStatus")
        if self.grpc_status is not None:
            try:
                grpc_status_code(self.grpc_status)
            except ValueError as exc:
                raise FieldError("grpcStatus", str(exc)) from None
        return self

    @property
    def fraction(self) -> float:
        """The share of requests to abort, 0..1."""
        return self.percentage.value / 100 if self.percentage is not None else 0.0


class HTTPFaultInjection(MeshModel):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPFaultInjection:
        if self.delay is None and self.abort is None:
            raise FieldError("", "set delay, abort or both")
        return self


class FaultInjection(Resource):
    """Meshway's fault injection for HTTPRoute and GRPCRoute rules (and their backendRefs):
    named by an `ExtensionRef` filter `{group: meshway.io, kind: FaultInjection, name}` in the
    route's namespace. The spec is Istio's `HTTPFaultInjection`, so that a VirtualService's
    `fault` can be copied as it is."""

    KIND: ClassVar[str] = "FaultInjection"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("meshway.io/v1alpha1",)

    spec: HTTPFaultInjection


class VirtualServiceHTTPRoute(MeshModel):
    name: str | None = None
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(min_length=1)
    rewrite: HTTPRewrite | None = None
    timeout: IstioDuration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percentage: Percent | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _check(self) -> VirtualServiceHTTPRoute:
        weights = [d.weight for d in self.route]
        if len(weights) > 1 or any(w is not None for w in weights):
            total = sum(w or 0 for w in weights)
            if total != 100:
                raise FieldError("route", f"total destination weight {total} != 100")
        return self


class VirtualServiceSpec(MeshModel):
    hosts: list[str] = Field(min_length=1)
    gateways: list[str] = Field(default_factory=list)
    http: list[VirtualServiceHTTPRoute] = Field(min_length=1)
    export_to: list[str] = Field(default_factory=list)

    _export_to = field_validator("export_to")(_check_export_to)

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, values: list[str]) -> list[str]:
        problems = [(f"[{i}]", "must not be empty") for i, host in enumerate(values) if not host]
        problems += [
            (f"[{i}]", "wildcard host '*' is not allowed for mesh routes")
            for i, host in enumerate(values)
            if host == "*"
        ]
        _raise_problems(problems)
        return values


class VirtualService(Resource):
    KIND: ClassVar[str] = "VirtualService"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_NETWORKING_VERSIONS

    spec: VirtualServiceSpec


# --------------------------------------------------------------------------- RateLimitPolicy
# (issue 6; semantics in docs/decisions/0008 and examples/ratelimit.yaml, enforced by
# waypoint/ratelimit.py)

MESHWAY_VERSIONS = ("meshway.io/v1alpha1",)
_RATE_LIMIT_TARGET_KINDS = {
    "Service": CORE_GROUPS,
    "HTTPRoute": (GATEWAY_API_GROUP,),
    "GRPCRoute": (GATEWAY_API_GROUP,),
}
# The longest `per`: a bucket refills at `requests` per `per`, and its Redis key lives that long.
MAX_RATE_LIMIT_PERIOD = 24 * 3600.0


class RateLimitTargetRef(MeshModel):
    """A Service (every request to it) or an HTTPRoute/GRPCRoute (the requests it matched),
    in the policy's own namespace."""

    group: str = ""
    kind: str
    name: str
    namespace: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RateLimitTargetRef:
        problems: list[tuple[str, str]] = []
        if error := dns_subdomain_error(self.name):
            problems.append(("name", error))
        if self.namespace:
            problems.append(
                ("namespace", "cross-namespace targetRefs are not supported: remove namespace")
            )
        groups = _RATE_LIMIT_TARGET_KINDS.get(self.kind)
        if groups is None:
            kinds = ", ".join(_RATE_LIMIT_TARGET_KINDS)
            problems.append(("kind", f"unsupported kind {self.kind!r}; use one of {kinds}"))
        elif self.group not in groups:
            problems.append(("group", f"kind {self.kind} needs group {groups[0]!r}"))
        _raise_problems(problems)
        return self


class RateLimitKey(MeshModel):
    """What separates buckets: the client's identity, a header's value, or nothing (one
    bucket for the whole target)."""

    type: Literal["Target", "SourceIdentity", "Header"] = "Target"
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RateLimitKey:
        if self.type == "Header":
            if not self.name:
                raise FieldError("name", "a Header key needs the header's name")
            if error := _header_name_error(self.name):
                raise FieldError("name", error)
        elif self.name is not None:
            raise FieldError("name", f"only a Header key has a name, not a {self.type} key")
        return self


class RateLimit(MeshModel):
    """A token bucket: `burst` tokens at most, `requests` more every `per`."""

    name: str
    requests: int
    per: str = "1s"
    burst: int | None = None
    key: RateLimitKey = Field(default_factory=RateLimitKey)
    scope: Literal["Local", "Global"] = "Local"

    @model_validator(mode="after")
    def _check(self) -> RateLimit:
        problems: list[tuple[str, str]] = []
        if error := dns_label_error(self.name):
            problems.append(("name", error))
        if self.requests < 1:
            problems.append(("requests", f"must be at least 1, got {self.requests}"))
        try:
            period = duration_seconds(self.per)
        except ValueError as exc:
            problems.append(("per", str(exc)))
        else:
            if not 0.001 <= period <= MAX_RATE_LIMIT_PERIOD:
                problems.append(("per", f"must be between 1ms and 24h, got {self.per!r}"))
        if self.burst is not None and self.burst < 1:
            problems.append(("burst", f"must be at least 1, got {self.burst}"))
        _raise_problems(problems)
        return self

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.requests / duration_seconds(self.per)

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else self.requests


class RateLimitPolicySpec(MeshModel):
    target_refs: list[RateLimitTargetRef] = Field(min_length=1)
    limits: list[RateLimit] = Field(min_length=1)
    failure_mode: Literal["Open", "Closed"] = "Open"

    @model_validator(mode="after")
    def _check(self) -> RateLimitPolicySpec:
        problems: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, limit in enumerate(self.limits):
            if limit.name in seen:
                problems.append((f"limits[{i}].name", f"duplicate limit {limit.name!r}"))
            seen.add(limit.name)
        targets: set[tuple[str, str]] = set()
        for i, ref in enumerate(self.target_refs):
            if (ref.kind, ref.name) in targets:
                problems.append((f"targetRefs[{i}]", f"duplicate target {ref.kind} {ref.name}"))
            targets.add((ref.kind, ref.name))
        _raise_problems(problems)
        return self


class RateLimitPolicy(Resource):
    """Meshway's own rate limit API, enforced by the waypoints of the targets."""

    KIND: ClassVar[str] = "RateLimitPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = MESHWAY_VERSIONS

    spec: RateLimitPolicySpec


# --------------------------------------------------------------------------- telemetry (tracing)
# Istio's Telemetry API for tracing, and the mesh-wide settings it names its providers in
# (Istio keeps those in meshConfig; Meshway has a cluster-scoped MeshConfig, decision 0011).


TELEMETRY_VERSIONS = ("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1")
_TELEMETRY_TARGET_KINDS = ("Service", "Gateway")


class ProviderRef(MeshModel):
    name: str = Field(min_length=1)


class TracingSelector(MeshModel):
    mode: Literal["CLIENT_AND_SERVER", "CLIENT", "SERVER"] = "CLIENT_AND_SERVER"


class CustomTagLiteral(MeshModel):
    value: str


class CustomTagEnvironment(MeshModel):
    name: str = Field(min_length=1)
    default_value: str | None = None


class CustomTagHeader(MeshModel):
    name: str = Field(min_length=1)
    default_value: str | None = None


class CustomTag(MeshModel):
    literal: CustomTagLiteral | None = None
    environment: CustomTagEnvironment | None = None
    header: CustomTagHeader | None = None

    @model_validator(mode="after")
    def _check(self) -> CustomTag:
        if sum(x is not None for x in (self.literal, self.environment, self.header)) != 1:
            raise FieldError("", "set exactly one of literal, environment, header")
        return self


class TelemetryTracing(MeshModel):
    match: TracingSelector | None = None
    providers: list[ProviderRef] = Field(default_factory=list, max_length=1)
    random_sampling_percentage: float | None = Field(default=None, ge=0, le=100)
    disable_span_reporting: bool | None = None
    custom_tags: dict[str, CustomTag] = Field(default_factory=dict)


class TelemetrySpec(MeshModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    tracing: list[TelemetryTracing] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> TelemetrySpec:
        problems = _check_selection(self.selector, self.target_ref, self.target_refs)
        refs = [("targetRef", self.target_ref)] if self.target_ref is not None else []
        refs += [(f"targetRefs[{i}]", ref) for i, ref in enumerate(self.target_refs)]
        problems += [
            (
                f"{path}.kind",
                f"Telemetry can target a Service or a waypoint Gateway, not {ref.kind}",
            )
            for path, ref in refs
            if ref.kind not in _TELEMETRY_TARGET_KINDS
        ]
        _raise_problems(problems)
        return self

    @property
    def all_target_refs(self) -> list[PolicyTargetReference]:
        return [self.target_ref] if self.target_ref is not None else list(self.target_refs)


class Telemetry(Resource):
    """Istio's Telemetry: tracing for the mesh (root namespace), a namespace, or a Service
    or waypoint Gateway (targetRefs)."""

    KIND: ClassVar[str] = "Telemetry"
    API_VERSIONS: ClassVar[tuple[str, ...]] = TELEMETRY_VERSIONS

    spec: TelemetrySpec = Field(default_factory=TelemetrySpec)


class OtlpHeader(MeshModel):
    name: str = Field(min_length=1)
    value: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        error = _header_name_error(value)
        if error:
            raise ValueError(error)
        return value


class OtlpHttpService(MeshModel):
    path: str = "/v1/traces"
    timeout: IstioDuration | None = None
    headers: list[OtlpHeader] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value


class OpenTelemetryTracingProvider(MeshModel):
    service: str = Field(min_length=1)
    port: Port
    http: OtlpHttpService | None = None
    max_tag_length: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> OpenTelemetryTracingProvider:
        if self.http is None:
            raise FieldError(
                "http",
                "OTLP/gRPC export is not supported (proxies load no gRPC stack): set "
                "http: {path: /v1/traces} and the collector's OTLP/HTTP port (4318)",
            )
        return self


class MeshExtensionProvider(MeshModel):
    name: str = Field(min_length=1)
    opentelemetry: OpenTelemetryTracingProvider


class DefaultProviders(MeshModel):
    tracing: list[str] = Field(default_factory=list, max_length=1)


class MeshConfigSpec(MeshModel):
    extension_providers: list[MeshExtensionProvider] = Field(default_factory=list)
    default_providers: DefaultProviders | None = None

    @model_validator(mode="after")
    def _check(self) -> MeshConfigSpec:
        problems: list[tuple[str, str]] = []
        names: dict[str, int] = {}
        for i, provider in enumerate(self.extension_providers):
            if provider.name in names:
                problems.append((f"extensionProviders[{i}].name", f"duplicate {provider.name!r}"))
            names.setdefault(provider.name, i)
        if self.default_providers is not None:
            problems += [
                (f"defaultProviders.tracing[{i}]", f"no extensionProvider named {name!r}")
                for i, name in enumerate(self.default_providers.tracing)
                if name not in names
            ]
        _raise_problems(problems)
        return self

    def provider(self, name: str) -> MeshExtensionProvider | None:
        return next((p for p in self.extension_providers if p.name == name), None)


MESH_CONFIG_NAME = "mesh"


class MeshConfig(Resource):
    """Mesh-wide settings that Istio keeps in its meshConfig; one object, named `mesh`."""

    KIND: ClassVar[str] = "MeshConfig"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("meshway.io/v1alpha1",)
    NAMESPACED: ClassVar[bool] = False

    spec: MeshConfigSpec = Field(default_factory=MeshConfigSpec)

    @classmethod
    def _name_error(cls, name: str) -> str | None:
        if name != MESH_CONFIG_NAME:
            return f"MeshConfig is a singleton: name it {MESH_CONFIG_NAME!r}"
        return None


# --------------------------------------------------------------------------- registry


KINDS: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (
        Namespace,
        Node,
        ServiceAccount,
        Service,
        Workload,
        AuthorizationPolicy,
        PeerAuthentication,
        RequestAuthentication,
        Gateway,
        HTTPRoute,
        GRPCRoute,
        DestinationRule,
        VirtualService,
        FaultInjection,
        RateLimitPolicy,
        Telemetry,
        MeshConfig,
    )
}

_SHORT_NAMES = {
    "ns": "Namespace",
    "no": "Node",
    "sa": "ServiceAccount",
    "svc": "Service",
    "wl": "Workload",
    "ap": "AuthorizationPolicy",
    "pa": "PeerAuthentication",
    "ra": "RequestAuthentication",
    "gw": "Gateway",
    "gtw": "Gateway",
    "dr": "DestinationRule",
    "vs": "VirtualService",
    "fi": "FaultInjection",
    "rlp": "RateLimitPolicy",
    "telemetry": "Telemetry",
    "mc": "MeshConfig",
}


def _plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + "s"


_KIND_NAMES: dict[str, str] = {
    **{kind.lower(): kind for kind in KINDS},
    **{_plural(kind): kind for kind in KINDS},
    **_SHORT_NAMES,
}


def kind_for(name: str) -> type[Resource]:
    """The resource class for a kind as the CLI accepts it: `Workload`, `workloads`, `wl`…"""
    kind = KINDS.get(name) or KINDS.get(_KIND_NAMES.get(name.lower(), ""))
    if kind is None:
        raise KeyError(f"unknown kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return kind
