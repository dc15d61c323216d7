#!/usr/bin/env bash
# Installs the Debian packages Meshway needs, only those that are missing.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v curl >/dev/null || need+=(curl)
# The data-path benchmark's peers and load generators (its smoke run is part of make test).
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v nginx >/dev/null || need+=(nginx-light)
# The shared store of Global rate limits (the local runtime starts one per cluster).
command -v redis-server >/dev/null || need+=(redis-server)
# Debian's python3 has no ensurepip (so no `python3 -m venv`) without python3-venv.
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${need[*]} (run as root, or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
