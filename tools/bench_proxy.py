"""Benchmark: the latency the traffic policy's Envoy adds, next to the walkthrough's policy, on loopback.

For each policy: stand-in versions and cilium-envoy's Envoy (tools/envoy_harness.py),
then the same sequential requests over one keep-alive connection straight to a
stand-in and through Envoy. Rounds alternate the two policies; the table gives
the median and the range over rounds. The client and stand-ins are Python, so
absolute numbers are the harness's; the difference is Envoy's.

    python -m tools.bench_proxy [--requests 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from tools.cilium_envoy import build_for
from tools.envoy_harness import LOOPBACK, running, send

from cilium_mesh import TrafficPolicy
from stacks import cdk_json_context
from stacks.config import load_config


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(policy: TrafficPolicy, tag: str, requests: int) -> tuple[float, float]:
    """(p50 added, p99 added) in ms: through Envoy minus straight to the stand-in of v1."""
    with running(policy, tag) as (envoy, _, stand_ins):
        targets = {"direct": stand_ins["1"].server_address, "envoy": (LOOPBACK, envoy.port)}
        latencies = {}
        for name, address in targets.items():
            send(address, 200)  # warm-up: connections, caches
            _, statuses, latencies[name], _ = send(address, requests)
            if statuses.get(200, 0) != requests:
                raise RuntimeError(f"{name}: not every request answered: {dict(statuses)}")
    return tuple(
        percentile(latencies["envoy"], share) - percentile(latencies["direct"], share) for share in (0.5, 0.99)
    )


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 100 <= args.requests <= 100000 or not 1 <= args.rounds <= 20:
        print("bench_proxy: --requests must be 100-100000 and --rounds 1-20", file=sys.stderr)
        return 2
    config = load_config(cdk_json_context())
    build = build_for(config.cilium_version)
    policies = {"this policy": config.traffic_policy, "walkthrough": TrafficPolicy.walkthrough()}
    added = {name: ([], []) for name in policies}
    for _ in range(args.rounds):
        for name, policy in policies.items():
            p50, p99 = measure(policy, build.tag, args.requests)
            added[name][0].append(p50)
            added[name][1].append(p99)
    print(f"{args.requests} sequential GETs over one keep-alive connection, {args.rounds} rounds, loopback, "
          f"{os.cpu_count()} cores, Envoy {build.upstream_version} limited to cilium-envoy {build.tag}")  # fmt: skip
    print("| policy | p50 added ms, median (range) | p99 added ms, median (range) |")
    print("|---|---|---|")
    for name, (p50s, p99s) in added.items():
        print(f"| {name} | {spread(p50s)} | {spread(p99s)} |")
    ratio = statistics.median(added["this policy"][1]) / max(statistics.median(added["walkthrough"][1]), 1e-9)
    print(f"p99 added, this policy / walkthrough: {ratio:.2f} (goal: at most 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
