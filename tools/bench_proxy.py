"""Benchmark: latency and throughput the traffic policy's Envoy adds, on loopback.

Sends the same sequential requests over one keep-alive connection straight to a
stand-in catalogdetail and through a real Envoy running the deployed policy
(failover on), and prints p50/p99 latency and requests per second. The client
and stand-ins are Python, so absolute numbers are the harness's; the
difference is Envoy's.

    python -m tools.bench_proxy [--requests 5000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from tools.envoy_harness import running, send

from cilium_mesh import TrafficPolicy


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    if not 100 <= args.requests <= 100000:
        print("bench_proxy: --requests must be 100-100000", file=sys.stderr)
        return 2
    policy = TrafficPolicy(weights={"v1": 50, "v2": 50})
    rows = []
    with running(policy) as (envoy, _, stand_ins):
        targets = {"direct to v1": stand_ins["1"].server_address[1], "through the policy": envoy.port}
        for name, port in targets.items():
            send(port, 200)  # warm-up: connections, caches
            _, statuses, latencies, elapsed = send(port, args.requests)
            rows.append((name, latencies, elapsed, statuses.get(200, 0)))
    print(f"{args.requests} sequential GETs over one keep-alive connection, loopback, {os.cpu_count()} cores")
    print(f"| {'path':<20} | {'p50 ms':>7} | {'p99 ms':>7} | {'req/s':>7} | {'200s':>6} |")
    print(f"|{'-' * 22}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for name, latencies, elapsed, ok in rows:
        print(
            f"| {name:<20} | {statistics.median(latencies):>7.3f} | {percentile(latencies, 0.99):>7.3f} "
            f"| {len(latencies) / elapsed:>7.0f} | {ok:>6} |"
        )
    added = statistics.median(rows[1][1]) - statistics.median(rows[0][1])
    print(f"Envoy adds {added:.3f} ms at p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
