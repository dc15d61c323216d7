"""What can go wrong with an HBONE tunnel, as exceptions callers can tell apart.

The proxies map these onto telemetry (`response_flags`) and onto what they do with the
application's TCP connection, so a refusal, a reset and a dead connection are distinct types.
"""

from __future__ import annotations


class HboneError(Exception):
    """Base class for every HBONE failure."""


class HboneConnectionError(HboneError):
    """The TLS/HTTP/2 connection could not be set up, or it died under an open stream."""


class HboneRefused(HboneError):
    """The peer answered the CONNECT with a status other than 200."""

    def __init__(self, status: int, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        super().__init__(
            f"CONNECT refused with status {status}" + (f": {reason}" if reason else "")
        )


class HboneStreamReset(HboneError):
    """The tunnel was reset (RST_STREAM) by the peer or by us; the data in flight is lost."""

    def __init__(self, error_code: int, *, by_peer: bool) -> None:
        self.error_code = error_code
        self.by_peer = by_peer
        side = "peer" if by_peer else "local side"
        super().__init__(f"stream reset by the {side} with HTTP/2 error code {error_code}")


class StreamCapacityExhausted(HboneError):
    """The connection already carries as many streams as it may; use another connection."""
