"""The traffic figures of docs/traffic-policy.md in one run: a declared service's policy and the walkthrough's, side by side.

Every figure comes from cilium-envoy's extension set for the configured Cilium
(checks/cilium_envoy.py) and the resources as Cilium delivers them
(checks/envoy_harness.py), repeated so each cell shows the median and the range.
The subject is the service's last weighted version (v2 for the sample's catalogdetail):

* failover: answered share and the subject's share with it healthy, pinned by header
  (with a pin header), answering 503 to 30%, down, and without endpoints;
* proxy overhead: p50 and p99 added over a direct request. Both policies' Envoys
  and stand-ins run at once and each round interleaves, request by request and
  in shuffled order, direct and proxied requests to both, so machine noise lands
  on all four alike;
* alerts: each fault held from the start, with a real Prometheus evaluating the
  rules the stack loads into AMP (checks/metrics_harness.py): when each alert
  fired, and v2's share as Prometheus recorded it next to the share measured
  (the scenarios of checks/metrics_harness.py).

    python -m tools.measure [--service workshop/catalogdetail] [--requests 1000] [--repeats 3]
                            [--latency-requests 5000] [--rounds 5] [--alert-seconds 42]

Everything runs on loopback, with fixed request counts, and stops by itself.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import os
import random
import statistics
import sys
import time
from contextlib import ExitStack

from checks.cilium_envoy import build_for
from checks.datapath import cec_statuses
from checks.envoy_harness import (
    DIFFERENCES,
    LOOPBACK,
    REQUEST_TIMEOUT_S,
    Fault,
    RunResult,
    deployed_alone,
    run,
    running,
    verdicts_line,
    walkthrough,
)
from checks import metrics_harness

from cilium_mesh import MeshService
from stacks import cdk_json_context
from stacks.config import ConfigError, load_config
from tools.preview import chosen_service

# The series of each version's share of the answered requests (what preview prints as "share").
SHARE_RECORD = next(record for label, record, _ in metrics_harness.RECORDED if label == "share")
LIMITS = {"requests": (100, 20000), "repeats": (1, 10), "latency_requests": (100, 100000), "rounds": (1, 20),
          "alert_seconds": (35, 600)}  # fmt: skip


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """Median, and the range when the repeats differ."""
    median, low, high = (format(v, fmt) + unit for v in (statistics.median(values), min(values), max(values)))
    return median if low == high else f"{median} ({low} to {high})"


def scenarios(service: MeshService) -> dict[str, tuple[dict[str, Fault], bool, bool]]:
    """scenario: (faults, pinned to the subject, version Services with ClusterIPs as on main before headless Services)."""
    subject = service.weighted_versions[-1]
    pinned = {f"pinned to {subject} by header": ({}, True, False)} if service.pin_header else {}
    return {
        "healthy": ({}, False, False),
        **pinned,
        f"{subject} answers 503 on 30%": ({subject: Fault("errors", 0.3)}, False, False),
        f"{subject} pods down": ({subject: Fault("down")}, False, False),
        f"{subject} without endpoints": ({subject: Fault("empty")}, False, False),
        "healthy, version Services with ClusterIPs (before)": ({}, False, True),
    }


def failover_rows(policies: dict[str, MeshService], tag: str, requests: int, repeats: int, datapath: str) -> list[str]:
    """One row per scenario of the first policy; the walkthrough gets the same requests (its routes ignore the pin header)."""
    first = next(iter(policies.values()))
    subject, header = first.weighted_versions[-1], first.pin_header
    rows = []
    for scenario, (faults, pinned, cluster_ips) in scenarios(first).items():
        cells = []
        for policy in policies.values():
            deployed = deployed_alone(policy, datapath)
            statuses = cec_statuses(deployed.with_cluster_ip_version_services() if cluster_ips else deployed, policy)
            results: list[RunResult] = [
                run(policy, tag, requests, faults, {header: subject} if pinned else None, seed=7 + repeat, statuses=statuses)
                for repeat in range(repeats)
            ]
            cells.append(spread([100 * r.answered_share for r in results], ".2f", "%"))
            cells.append(spread([100 * r.share(subject) for r in results], ".1f", "%"))
            cells.append(spread([r.retries for r in results], "d") + " / " + spread([r.ejections for r in results], "d"))
        rows.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return rows


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _interleaved(targets: dict[str, tuple[str, int]], path: str, requests: int, rng: random.Random) -> dict[str, list[float]]:
    """``requests`` GETs of ``path`` per target over one keep-alive connection each, interleaved in shuffled order."""
    connections = {name: http.client.HTTPConnection(*address, timeout=REQUEST_TIMEOUT_S) for name, address in targets.items()}
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    order = list(targets)
    try:
        for _ in range(requests):
            rng.shuffle(order)
            for name in order:
                begin = time.perf_counter()
                connections[name].request("GET", path)
                response = connections[name].getresponse()
                response.read()
                latencies[name].append((time.perf_counter() - begin) * 1000)
                if response.status != 200:
                    raise RuntimeError(f"{name}: answered {response.status}")
    finally:
        for connection in connections.values():
            connection.close()
    return latencies


def overhead_rows(policies: dict[str, MeshService], tag: str, requests: int, rounds: int,
                  datapath: str) -> tuple[list[str], list[float]]:  # fmt: skip
    """Rows of p50/p99 added per policy, and the per-round ratio of p99 added (this policy / walkthrough)."""
    added = {name: {0.5: [], 0.99: []} for name in policies}
    rng = random.Random(11)
    path = next(iter(policies.values())).check_path
    with ExitStack() as stack:
        targets = {}
        for name, policy in policies.items():
            envoy, _, stand_ins = stack.enter_context(running(policy, tag, datapath=datapath))
            targets[f"{name} direct"] = stand_ins[policy.weighted_versions[0]].server_address
            targets[f"{name} envoy"] = (LOOPBACK, envoy.port)
        _interleaved(targets, path, 200, rng)  # warm-up: connections, caches
        gc.disable()
        try:
            for _ in range(rounds):
                latencies = _interleaved(targets, path, requests, rng)
                for name in policies:
                    for share in added[name]:
                        through = _percentile(latencies[f"{name} envoy"], share)
                        added[name][share].append(through - _percentile(latencies[f"{name} direct"], share))
        finally:
            gc.enable()
    rows = [f"| {name} | {spread(values[0.5], '.3f')} | {spread(values[0.99], '.3f')} |" for name, values in added.items()]
    mine, theirs = (added[name][0.99] for name in policies)
    return rows, [m / t if t > 0 else float("inf") for m, t in zip(mine, theirs)]


def alert_rows(policy: MeshService, tag: str, seconds: float, datapath: str) -> list[str]:
    """Per scenario: the alerts that fired and when, and v2's share recorded next to the one measured."""
    observations = metrics_harness.observe(policy, tag, metrics_harness.SCENARIOS, seconds, metrics_harness.RATE_PER_S,
                                           datapath, (SHARE_RECORD,))  # fmt: skip
    rows = []
    for name, observation in observations.items():
        fired = ", ".join(f"{a} {t:.1f} s" for a, t in sorted(observation.first_fired_s.items(), key=lambda i: i[1]))
        recorded = {r["metric"]["version"]: r["value"] for r in observation.recorded[SHARE_RECORD]}
        measured = observation.measured
        low, high = measured.interval("v2")
        rows.append(f"| {name} | {fired or 'none'} | {100 * recorded.get('v2', 0):.2f}% | "
                    f"{100 * measured.share('v2'):.2f}% [{100 * low:.2f}, {100 * high:.2f}] |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", metavar="NAMESPACE/NAME", help="the declared service (default the sample's workshop/catalogdetail)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per failover run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per failover cell")
    parser.add_argument("--latency-requests", type=int, default=5000, help="requests per target per latency round")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--alert-seconds", type=int, default=42, help="seconds each alert scenario runs")
    args = parser.parse_args(argv)
    for name, (low, high) in LIMITS.items():
        if not low <= getattr(args, name) <= high:
            print(f"measure: --{name.replace('_', '-')} must be {low}-{high}", file=sys.stderr)
            return 2
    try:
        config = load_config(cdk_json_context())
        policy = chosen_service(config, args.service)
    except (ValueError, ConfigError) as error:
        print(f"measure: {error}", file=sys.stderr)
        return 2
    policies = {"this policy": policy, "walkthrough": walkthrough(policy)}
    build = build_for(config.cilium_version)
    started = time.perf_counter()
    print(f"{policy.key}: Envoy {build.upstream_version} limited to cilium-envoy {build.tag} (Cilium {config.cilium_version}), "
          f"weights {dict(policy.weights)}, {os.cpu_count()} cores. {DIFFERENCES}")  # fmt: skip
    for name, candidate in policies.items():
        print(verdicts_line(name, candidate, config.datapath))
    print()
    print(f"Failover: {args.requests} requests per run, {args.repeats} runs per cell: median (range)\n")
    subject = policy.weighted_versions[-1]
    print(f"| {subject} | this policy: answered | {subject} share | retries / ejections "
          f"| walkthrough: answered | {subject} share | retries / ejections |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in failover_rows(policies, build.tag, args.requests, args.repeats, config.datapath):
        print(row, flush=True)
    print(f"\nProxy overhead: {args.latency_requests} GETs per target per round, {args.rounds} rounds, both policies "
          "interleaved on one keep-alive connection per target; ms added over direct, median (range) over rounds\n")  # fmt: skip
    rows, ratios = overhead_rows(policies, build.tag, args.latency_requests, args.rounds, config.datapath)
    print("| policy | p50 added ms | p99 added ms |")
    print("|---|---|---|")
    print("\n".join(rows))
    verdict = "met" if statistics.median(ratios) <= 1.2 else "NOT met"
    print(f"\np99 added, this policy / walkthrough, per round: {spread(ratios, '.2f')}; "
          f"goal at most 1.2: {verdict}")  # fmt: skip
    print(f"\nAlerts: every scenario at once for {args.alert_seconds} s at {metrics_harness.RATE_PER_S:g} requests/s, the fault from the "
          "start; Prometheus scrapes and evaluates every second\n")  # fmt: skip
    print("| scenario | alerts fired (s after the fault) | v2 share recorded | v2 share measured [95%] |")
    print("|---|---|---|---|")
    print("\n".join(alert_rows(policy, build.tag, args.alert_seconds, config.datapath)))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
