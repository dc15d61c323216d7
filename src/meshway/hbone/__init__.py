"""HBONE, the mesh's tunnel: HTTP/2 CONNECT over mutual TLS 1.3 on port 15008.

Layers, each in its own module: `tls` (contexts and SPIFFE identities), `session` (the h2
state machine on an asyncio transport), `stream` (one tunnel as a flow-controlled byte
stream), `relay` (copying between a socket and a tunnel inside event-loop callbacks),
`client` (one outgoing connection), `pool` (shared outgoing connections) and `server`
(accepting connections and dispatching CONNECT requests to a handler).
"""

from meshway.hbone.client import HboneConnection
from meshway.hbone.errors import (
    HboneConnectionError,
    HboneError,
    HboneRefused,
    HboneStreamReset,
    StreamCapacityExhausted,
)
from meshway.hbone.pool import HboneConnectionPool
from meshway.hbone.relay import relay, splice
from meshway.hbone.server import HboneRequest, HboneServer, parse_authority
from meshway.hbone.stream import HboneStream
from meshway.hbone.tls import (
    IdentityError,
    IdentityMismatch,
    TlsContextCache,
    WorkloadCredentials,
    client_context,
    peer_identity,
    server_context,
)

__all__ = [
    "HboneConnection",
    "HboneConnectionError",
    "HboneConnectionPool",
    "HboneError",
    "HboneRefused",
    "HboneRequest",
    "HboneServer",
    "HboneStream",
    "HboneStreamReset",
    "IdentityError",
    "IdentityMismatch",
    "StreamCapacityExhausted",
    "TlsContextCache",
    "WorkloadCredentials",
    "client_context",
    "parse_authority",
    "peer_identity",
    "relay",
    "server_context",
    "splice",
]
