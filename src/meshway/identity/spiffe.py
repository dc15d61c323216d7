"""SPIFFE workload identities in Istio's `spiffe://<td>/ns/<ns>/sa/<sa>` form.

The identity is what authorization policy matches on and what goes into a certificate's
URI SAN, so parsing is strict: anything that is not exactly that shape is refused instead
of being normalised into something that might alias another workload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

SPIFFE_SCHEME = "spiffe://"

_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
# SPIFFE allows [a-z0-9._-] in a trust domain; we also require DNS-like ends and no "..".
_TD_LABEL = r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?"
_TRUST_DOMAIN_RE = re.compile(rf"{_TD_LABEL}(?:\.{_TD_LABEL})*")
# Kubernetes namespaces are DNS-1123 labels, service account names DNS-1123 subdomains.
_NAMESPACE_RE = re.compile(_DNS_LABEL)
_SERVICE_ACCOUNT_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

_MAX_TRUST_DOMAIN = 255
_MAX_NAMESPACE = 63
_MAX_SERVICE_ACCOUNT = 253


def validate_trust_domain(trust_domain: str) -> str:
    """Return the trust domain unchanged, or raise ValueError saying why it is unusable."""
    _check_name("trust domain", trust_domain, _TRUST_DOMAIN_RE, _MAX_TRUST_DOMAIN)
    return trust_domain


def _check_name(kind: str, value: str, pattern: re.Pattern[str], max_len: int) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{kind} is empty")
    if len(value) > max_len:
        raise ValueError(f"{kind} {value!r} is longer than {max_len} characters")
    if not pattern.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is not valid: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )


@dataclass(frozen=True)
class SpiffeId:
    """A workload identity: trust domain, Kubernetes namespace and service account."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        # Validated on construction so no code path can mint a certificate for a bad name.
        _check_name("trust domain", self.trust_domain, _TRUST_DOMAIN_RE, _MAX_TRUST_DOMAIN)
        _check_name("namespace", self.namespace, _NAMESPACE_RE, _MAX_NAMESPACE)
        _check_name(
            "service account", self.service_account, _SERVICE_ACCOUNT_RE, _MAX_SERVICE_ACCOUNT
        )

    # Both forms are computed once per identity: the waypoint reads them for every request.
    @cached_property
    def uri(self) -> str:
        """The SPIFFE ID as it appears in a certificate's URI SAN."""
        return f"{SPIFFE_SCHEME}{self.principal}"

    @cached_property
    def principal(self) -> str:
        """The scheme-less form Istio authorization policies use in `principals`."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse exactly `spiffe://<td>/ns/<ns>/sa/<sa>`; raise ValueError for anything else."""
        if not isinstance(uri, str):
            raise ValueError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
        shape = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
        if not uri.startswith(SPIFFE_SCHEME):
            raise ValueError(f"invalid SPIFFE ID {uri!r}: must start with {SPIFFE_SCHEME!r}")
        if "?" in uri or "#" in uri:
            raise ValueError(f"invalid SPIFFE ID {uri!r}: query and fragment are not allowed")
        trust_domain, slash, path = uri[len(SPIFFE_SCHEME) :].partition("/")
        segments = path.split("/")
        if not slash or len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise ValueError(f"invalid SPIFFE ID {uri!r}: expected exactly {shape}")
        try:
            return cls(trust_domain, segments[1], segments[3])
        except ValueError as exc:
            raise ValueError(f"invalid SPIFFE ID {uri!r}: {exc}") from None
