"""HBONE's HTTP/2 flow-control windows (shared by the session and its streams)."""

# ztunnel's windows: big enough for a fast tunnel across a node boundary, and the per-stream
# window bounds what one slow reader can make us buffer.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
