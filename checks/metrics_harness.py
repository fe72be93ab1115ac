"""The rules AMP evaluates, in a real Prometheus scraping the real Envoy: what they record and which alerts fire.

Each scenario is the traffic harness (checks/envoy_harness.py: cilium-envoy's
Envoy with one declared service's resources as Cilium delivers them, stand-in
versions, the datapath model's verdicts) with its own Prometheus
(checks/prometheus.py) scraping Envoy's ``/stats/prometheus`` (what cilium-envoy
serves as ``/metrics`` on 9964) and evaluating the rule file the stack loads into
AMP, rendered for that service (constructs/cilium_mesh/metrics_files.py
``rule_file``; the command runs the sample's catalogdetail). A paced client sends
requests from the start; faults hold from the start too. What differs from AMP: scrape
and evaluation every second here, every 30 s (collector) and 60 s (AMP's
default rule-group interval) there; so an alert's ``for: 30s`` is the same, while
the time to notice a change is shorter here.

Everything is bounded: a fixed duration and request rate, and every process stops.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from stacks import cdk_json_context
from stacks.config import load_config

from cilium_mesh.declaration import sample_service
from cilium_mesh.metrics_files import DASHBOARD_FILE, rule_file
from cilium_mesh.traffic import MeshService
from checks import prometheus
from checks.cilium_envoy import build_for
from checks.envoy_harness import LOOPBACK, REQUEST_TIMEOUT_S, Fault, RunResult, ServiceClient, running, send_and_collect

SCRAPE_INTERVAL_S = 1.0
POLL_INTERVAL_S = 0.5
# Long enough for an alert's `for: 30s` plus a few scrapes; 40 requests/s gives the outlier
# detection's failure percentage its 20 requests per second and host.
DURATION_S = 42.0
RATE_PER_S = 40.0
# Fault to firing: `for: 30s`, two scrapes before rate() has a value, an evaluation, and the poll.
ALERT_BOUND_S = 40.0

# What each fault must set off, and nothing beyond it (MeshNamespacePolicyDrops needs Hubble, absent here).
SCENARIOS: dict[str, tuple[dict[str, Fault], frozenset[str]]] = {
    "healthy": ({}, frozenset()),
    "v2 answers 503 on 30%": ({"v2": Fault("errors", 0.3)}, frozenset({"MeshServiceErrorBudgetExceeded"})),
    "v2 pods down": (
        {"v2": Fault("down")},
        frozenset({"MeshServiceErrorBudgetExceeded", "MeshServiceFailoverActive", "MeshServiceWeightedVersionWithoutTraffic"}),
    ),
    "v2 without endpoints": (
        {"v2": Fault("empty")},
        frozenset({"MeshServiceFailoverActive", "MeshServiceWeightedVersionWithoutTraffic"}),
    ),
}
# Alerts that a fault may also set off: a version answering 30% errors is ejected, so its share fails over.
ALSO_ALLOWED = {"v2 answers 503 on 30%": frozenset({"MeshServiceFailoverActive"})}


class PacedClient(threading.Thread):
    """GETs of the service's check_path at a fixed rate over one keep-alive connection, counting what came
    back, until stopped."""

    def __init__(self, address: tuple[str, int], rate_per_s: float, service: MeshService, faults: dict[str, Fault]):
        super().__init__(daemon=True)
        self.address, self.period, self.stopping = address, 1.0 / rate_per_s, threading.Event()
        self.result = RunResult(service, faults, 0)
        # Every request as it came back: (time.monotonic() when answered, status, the version that answered a 200).
        self.samples: list[tuple[float, int, str | None]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        client = ServiceClient(self.address, self.result.policy.check_path)
        next_at = time.monotonic()
        try:
            while not self.stopping.is_set():
                answer = client.ask()
                version = answer.version if answer.status == 200 else None
                with self.lock:
                    self.samples.append((time.monotonic(), answer.status, version))
                    self.result.requests += 1
                    self.result.statuses[answer.status] += 1
                    if version:
                        self.result.versions[version] += 1
                next_at += self.period
                self.stopping.wait(max(0.0, next_at - time.monotonic()))
        finally:
            client.close()

    def stop(self) -> RunResult:
        self.stopping.set()
        self.join(timeout=REQUEST_TIMEOUT_S * 2)
        return self.result


@dataclass
class Observation:
    """One scenario's run: when each alert first fired, and what the rules recorded at the end."""

    name: str
    faults: dict[str, Fault]
    expected: frozenset[str]
    first_fired_s: dict[str, float] = field(default_factory=dict)
    measured: RunResult | None = None
    recorded: dict[str, list[dict]] = field(default_factory=dict)
    rule_errors: list[str] = field(default_factory=list)

    @property
    def unexpected(self) -> set[str]:
        return set(self.first_fired_s) - self.expected - ALSO_ALLOWED.get(self.name, frozenset())


@contextmanager
def scraped(service: MeshService, tag: str, faults: dict[str, Fault], datapath: str = "eni", seed: int = 7,
            statuses: dict[tuple[str, str], str] | None = None):  # fmt: skip
    """The traffic harness with a Prometheus scraping its Envoy and evaluating the rule file the stack
    renders for this service."""
    with running(service, tag, faults, seed, datapath, statuses) as (envoy, faults, stand_ins):
        job = prometheus.scrape_job("cilium-envoy", [envoy.admin], "/stats/prometheus", SCRAPE_INTERVAL_S)
        with prometheus.running([job], rule_file((service,)), SCRAPE_INTERVAL_S) as server:
            server.wait_for_scrape()  # counters seen at 0 first, as a long-running Prometheus sees them
            yield envoy, server, faults, stand_ins


@contextmanager
def scraped_services(services: tuple[MeshService, ...], tag: str, faults: dict[str, dict[str, Fault]],
                     datapath: str = "eni"):  # fmt: skip
    """One traffic harness per service, all scraped by one Prometheus evaluating the one rule file the stack
    renders for all of them, as AMP evaluates it. ``faults``: service key -> its versions' faults.
    Yields (the Envoys by service key, the Prometheus)."""
    with ExitStack() as stack:
        envoys = {s.key: stack.enter_context(running(s, tag, faults.get(s.key), datapath=datapath))[0] for s in services}
        job = prometheus.scrape_job("cilium-envoy", [e.admin for e in envoys.values()], "/stats/prometheus", SCRAPE_INTERVAL_S)
        server = stack.enter_context(prometheus.running([job], rule_file(services), SCRAPE_INTERVAL_S))
        server.wait_for_scrape()
        yield envoys, server


# What preview prints from Prometheus after a run (one service per Prometheus): label, recorded series, format.
RECORDED = (
    ("share", "mesh_service:share:ratio2m", "{:.1%}"),
    ("failed attempts", "mesh_service:errors:ratio2m", "{:.1%}"),
    ("answered", "mesh_service:answered:ratio2m", "{:.2%}"),
    ("failover req/s", "mesh_service:failover:rate2m", "{:.1f}"),
    ("ejected hosts", "mesh_service:ejections_active", "{:.0f}"),
)


def _series_label(metric: dict) -> str:
    if "destination" in metric and "version" in metric:
        return f"{metric['destination']}->{metric['version']}"
    return metric.get("version") or metric.get("destination") or ""


def recorded_line(server: prometheus.PrometheusServer) -> str:
    """The recorded rules now, one field each, and the alerts firing or pending."""
    fields = []
    for label, record, fmt in RECORDED:
        results = sorted(server.query(record), key=lambda r: _series_label(r["metric"]))
        values = " ".join(f"{_series_label(r['metric'])} {fmt.format(r['value'])}".strip() for r in results)
        fields.append(f"{label} {values or 'none'}")
    alerts = sorted({f"{a['alertname']} ({a['alertstate']})" for a in (r["metric"] for r in server.query("ALERTS"))})
    return "; ".join(fields) + f"; alerts: {', '.join(alerts) or 'none'}"


def run_recorded(service: MeshService, tag: str, requests: int, faults: dict[str, Fault] | None = None,
                 headers: dict[str, str] | None = None, datapath: str = "eni") -> tuple[RunResult, str]:  # fmt: skip
    """Like envoy_harness.run, scraped by Prometheus; also returns what the rules recorded at the end."""
    with scraped(service, tag, faults or {}, datapath) as (envoy, server, faults, _):
        result = send_and_collect(envoy, service, faults, requests, headers)
        server.wait_for_evaluation_after(time.time())
        return result, recorded_line(server)


@dataclass
class Timeline:
    """A run whose faults start part-way: what each request got (``samples``, seconds from the start),
    the rules' recorded series over time (``series``, epoch times from ``start``), and when each alert
    first fired."""

    start: float
    fault_at_s: float
    series: dict[str, list[dict]]
    first_fired_s: dict[str, float]
    measured: RunResult
    samples: list[tuple[float, int, str | None]] = field(default_factory=list)

    def seen(self, bin_s: float) -> tuple[list[float], dict[str, list[float]], list[float]]:
        """What the requests saw in each ``bin_s`` window: (window middles, each version's share of the
        answered requests, the answered share of all); a window without answers has no share (NaN)."""
        end = max((t for t, _, _ in self.samples), default=0.0)
        windows = max(1, math.ceil(end / bin_s))
        answered, total = [0] * windows, [0] * windows
        by_version = {v: [0] * windows for v in self.measured.policy.versions}
        for t, status, version in self.samples:
            index = min(int(t // bin_s), windows - 1)
            total[index] += 1
            if status == 200:
                answered[index] += 1
                if version in by_version:
                    by_version[version][index] += 1
        middles = [(index + 0.5) * bin_s for index in range(windows)]
        shares = {v: [n / a if a else math.nan for n, a in zip(counts, answered)] for v, counts in by_version.items()}
        return middles, shares, [a / t if t else math.nan for a, t in zip(answered, total)]


# The rules' series the plot draws beside what the requests saw (the weights come from the declaration itself).
PLOTTED = ("mesh_service:share:ratio2m", "mesh_service:answered:ratio2m", "mesh_service:ejections_active")


def timeline(service: MeshService, tag: str, faults: dict[str, Fault], fault_after_s: float, duration_s: float,
             rate_per_s: float, datapath: str = "eni") -> Timeline:  # fmt: skip
    """Healthy for ``fault_after_s``, then ``faults`` (5xx or down) until ``duration_s``."""
    with scraped(service, tag, {}, datapath) as (envoy, server, healthy, stand_ins):
        client = PacedClient((LOOPBACK, envoy.port), rate_per_s, service, healthy)
        started, wall_started, first_fired, faulted = time.monotonic(), time.time(), {}, False
        client.start()
        try:
            while (elapsed := time.monotonic() - started) < duration_s:
                if not faulted and elapsed >= fault_after_s:
                    for version, fault in faults.items():
                        stand_ins[version].fail(fault)
                    faulted = True
                for alert in server.firing():
                    first_fired.setdefault(alert, round(elapsed - fault_after_s, 1))
                time.sleep(POLL_INTERVAL_S)
        finally:
            measured = client.stop()
        series = {q: server.query_range(q, wall_started, time.time(), SCRAPE_INTERVAL_S) for q in PLOTTED}
        samples = [(t - started, status, version) for t, status, version in client.samples]
        return Timeline(wall_started, fault_after_s, series, first_fired, measured, samples)


def observe(service: MeshService, tag: str, scenarios: dict[str, tuple[dict[str, Fault], frozenset[str]]],
            duration_s: float, rate_per_s: float, datapath: str = "eni",
            queries: tuple[str, ...] = ()) -> dict[str, Observation]:  # fmt: skip
    """Run every scenario at once for ``duration_s``; ``queries`` are evaluated at the end."""
    observations = {name: Observation(name, faults, expected) for name, (faults, expected) in scenarios.items()}
    with ExitStack() as stack:
        servers, clients = {}, {}
        for name, observation in observations.items():
            envoy, server, faults, _ = stack.enter_context(scraped(service, tag, observation.faults, datapath))
            servers[name] = server
            clients[name] = PacedClient((LOOPBACK, envoy.port), rate_per_s, service, faults)
        started = time.monotonic()
        for client in clients.values():
            client.start()
            stack.callback(client.stop)
        while (elapsed := time.monotonic() - started) < duration_s:
            for name, server in servers.items():
                for alert in server.firing():
                    observations[name].first_fired_s.setdefault(alert, round(elapsed, 1))
            time.sleep(POLL_INTERVAL_S)
        for name, observation in observations.items():
            observation.measured = clients[name].stop()
            server = servers[name]
            observation.rule_errors = server.rule_health()
            for expr in queries:
                observation.recorded[expr] = server.query(expr)
    return observations


def dashboard_variables(service: MeshService) -> dict[str, str]:
    """The dashboard's template variables (manifests/metrics/dashboards/) as Grafana sets them to show ``service``."""
    return {"namespace": service.namespace, "service": service.name}


def _with_variables(expr: str, service: MeshService) -> str:
    """A query as Grafana sends it: each ``$variable`` replaced by its value (an unknown one is a mistake)."""
    values = dashboard_variables(service)
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def dashboard_queries(service: MeshService) -> list[str]:
    """Every panel query of the dashboard, as Grafana sends it to show ``service``."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    return [_with_variables(target["expr"], service) for panel in dashboard["panels"] for target in panel["targets"]]


def variable_queries(service: MeshService) -> dict[str, tuple[str, str]]:
    """Each template variable's ``label_values(selector, label)`` as Grafana sends it while showing
    ``service``: variable -> (selector, label); the selector's series carry the choices."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    queries = {}
    for variable in dashboard["templating"]["list"]:
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]).groups()
        queries[variable["name"]] = (_with_variables(selector, service), label)
    return queries


def as_json(observations: dict[str, Observation]) -> dict:
    return {
        name: {
            "expected": sorted(o.expected),
            "unexpected": sorted(o.unexpected),
            "first_fired_s": o.first_fired_s,
            "requests": o.measured.requests,
            "versions": dict(o.measured.versions),
            "statuses": {str(k): v for k, v in o.measured.statuses.items()},
            "intervals": {v: o.measured.interval(v) for v in o.measured.policy.versions},
            "recorded": o.recorded,
            "rule_errors": o.rule_errors,
        }
        for name, o in observations.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Every scenario at once; the observations as JSON (tests/conftest.py starts this at the suite's start)."""
    parser = argparse.ArgumentParser(prog="python -m checks.metrics_harness", description=main.__doc__)
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=RATE_PER_S, help="requests per second per scenario")
    parser.add_argument("--json", type=Path, required=True, help="where to write the observations")
    args = parser.parse_args(argv)
    if not (10 <= args.duration <= 600 and 1 <= args.rate <= 500):
        print("metrics_harness: --duration must be 10-600 and --rate 1-500", file=sys.stderr)
        return 2
    config, service = load_config(cdk_json_context()), sample_service()
    selectors = [selector for selector, _ in variable_queries(service).values()]
    queries = ("mesh_service:share:ratio2m", *dashboard_queries(service), *selectors)
    observations = observe(service, build_for(config.cilium_version).tag, SCENARIOS,
                           args.duration, args.rate, config.datapath, tuple(dict.fromkeys(queries)))  # fmt: skip
    args.json.write_text(json.dumps(as_json(observations), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
