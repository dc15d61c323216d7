"""The waypoint: Meshway's on-demand L7 proxy (HTTP/1.1, HTTP/2, gRPC) for the services that
need routing, L7 authorization or request telemetry. Everything else stays on the node
proxies' L4 path."""
