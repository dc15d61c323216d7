"""An open-loop HTTP/1.1 load generator: a fixed request rate over a few keep-alive connections.

Each request has a scheduled send time; its latency is measured from that time, not from when
it was actually sent, so a slow response delays the requests behind it and that delay counts
(no coordinated omission, as wrk2 measures). Bounded by --seconds. Prints one JSON object.

Usage: python openloop.py URL --rps 1000 --connections 4 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


async def connection(
    host: str, port: int, path: str, interval: float, start: float, stop: float, out: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    errors = 0
    scheduled = start
    try:
        while scheduled < stop:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            out.append(time.perf_counter() - scheduled)
            scheduled += interval
    finally:
        writer.close()
    return errors


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    url = urlsplit(args.url)
    interval = args.connections / args.rps
    start = time.perf_counter() + 0.2
    stop = start + args.seconds
    latencies: list[float] = []
    errors = await asyncio.gather(
        *(
            connection(
                url.hostname or "127.0.0.1",
                url.port or 80,
                url.path or "/",
                interval,
                start + i * interval / args.connections,  # spread the connections' phases
                stop,
                latencies,
            )
            for i in range(args.connections)
        )
    )
    ms = [x * 1000 for x in latencies]
    print(
        json.dumps(
            {
                "requests": len(ms),
                "achieved_rps": round(len(ms) / args.seconds, 1),
                "errors": sum(errors),
                "p50_ms": round(percentile(ms, 50), 3),
                "p90_ms": round(percentile(ms, 90), 3),
                "p99_ms": round(percentile(ms, 99), 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
