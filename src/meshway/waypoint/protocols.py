"""Telling protocols apart from a connection's first bytes."""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def sniff(first: bytes) -> str:
    """ "http2", "http1", or "tcp" (or "" when more bytes are needed to tell)."""
    if first.startswith(H2_PREFACE):
        return "http2"
    if H2_PREFACE.startswith(first):
        return ""
    space = first.find(b" ")
    token = first[:space] if space >= 0 else first
    if not token or len(token) > 16 or not set(token) <= _METHOD_CHARS:
        return "tcp"
    if space < 0:
        return ""
    line_end = first.find(b"\r\n")
    if line_end < 0:
        return "" if len(first) < 8192 else "tcp"
    return "http1" if first[:line_end].endswith((b" HTTP/1.1", b" HTTP/1.0")) else "tcp"
