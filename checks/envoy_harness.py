"""Run a service's exact Envoy resources in cilium-envoy's Envoy, on loopback, against stand-in versions.

The Envoy is the upstream release of cilium-envoy's minor version with every
extension cilium-envoy leaves out disabled (checks/cilium_envoy.py). It gets
the resources of a MeshService's CiliumEnvoyConfig as Cilium hands them over:
names qualified as Cilium qualifies them, the listener, the EDS clusters and
the failover clusters unchanged, the route configuration over RDS and each
version's endpoints over EDS. What differs from the cluster:

* RDS and EDS come from files (Envoy's filesystem subscription, which
  cilium-envoy builds), not from Cilium's gRPC xDS server;
* the listener has a loopback address, not a Cilium proxy port, and lacks the
  filters Cilium injects (listener filter cilium.bpf_metadata, network filter
  cilium.network, HTTP filter cilium.l7policy; those exist only in cilium-envoy);
* each version's pods are one stand-in on its own loopback address and the
  service's pod port, answering every method and path 200 with its version in
  the response header STAND_IN_HEADER (so the harness knows which version
  answered whatever the service's own bodies are; Envoy's DESTINATION_HEADER
  says where the route sent the request);
* the version Services' cluster DNS names resolve through a loopback DNS
  stand-in to the stand-ins' addresses (in the cluster: coredns, to the pods of
  the headless version Services; a version without endpoints has no answer);
* what Cilium's filters and the VPC decide comes from the datapath model
  (checks/datapath.py), per cluster kind and version, and the harness does the
  same: a request Cilium denies is answered 403 "Access denied" (there before
  any connect, here by a stand-in, which retries and outlier detection treat
  alike: not retried, not an error), a dropped one meets an address whose
  SYNs go unanswered (a connect timeout), and one with no address gets no
  endpoint or DNS answer.

check_services_in_envoy runs a list of services this way, each through its
declared pin header, routes and split.

Everything here is bounded: fixed request counts, socket timeouts, and
processes and servers that are always stopped.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import random
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cilium_mesh.traffic import (
    DESTINATION_HEADER,
    HTTP_METHODS,
    MeshService,
    OutlierDetection,
    Retries,
    qualify_like_cilium,
)
from checks.cilium_envoy import envoy_command
from checks.datapath import Deployed, cec_statuses

LOOPBACK = "127.0.0.1"
REQUEST_TIMEOUT_S = 10
START_TIMEOUT_S = 20
# The harness's own response header: the version whose stand-in answered (a real pod's answer has none).
STAND_IN_HEADER = "x-stand-in-version"

DIFFERENCES = (
    "Run in cilium-envoy's extension set, resources as Cilium delivers them; differs from the cluster in: "
    "RDS/EDS from files (not Cilium's gRPC xDS), loopback listener without Cilium's injected filters "
    "(cilium.bpf_metadata, cilium.network, cilium.l7policy: their verdicts come from checks/datapath.py and "
    "are reproduced by stand-ins), version DNS names resolved by a loopback stand-in, each version one "
    "stand-in answering every request 200 with its version in a header."
)
ACCESS_DENIED = b"Access denied\r\n"  # cilium/proxy: the router's local reply when policy denies the upstream


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


class LoopbackServer(ThreadingHTTPServer):
    """An HTTP server on loopback for the harnesses' stand-ins (its handler a LoopbackHandler)."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        """Envoy closing idle upstream connections at shutdown is expected, not an error."""


class LoopbackHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def reply(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self) -> None:
        """A request's body is read, so that the keep-alive connection's next request starts where it should."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, *args):
        pass


def _every_method(handler: type[LoopbackHandler]) -> type[LoopbackHandler]:
    """http.server calls do_<METHOD>: the handler's ``answer`` for every method routes can match but CONNECT."""
    for method in HTTP_METHODS:
        if method != "CONNECT":
            setattr(handler, f"do_{method}", handler.answer)
    return handler


class StandIn(LoopbackServer):
    """One version's pods: every request answered 200 (or as its fault says) with a JSON body naming the
    service, version, method and path, and the version in STAND_IN_HEADER. ``asked`` counts the requests
    by method, ``mirrored`` the copies Envoy's mirror policy sends (their host has "-shadow" before the port)."""

    def __init__(self, service: MeshService, version: str, fault: Fault, seed: int, address: tuple[str, int]):
        self.service_key = service.key
        self.version = version
        self.fault = fault
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.asked: Counter = Counter()
        self.mirrored = 0
        super().__init__(address, _StandInHandler)

    def fail(self, fault: Fault) -> None:
        """From now on answer as ``fault`` says; "down" also stops accepting and ends open connections."""
        if fault.kind not in ("ok", "errors", "down"):
            raise ValueError(f"a running version cannot become {fault.describe()!r}")
        with self.lock:
            self.fault = fault
        if fault.kind == "down":
            self.shutdown()
            self.server_close()


@_every_method
class _StandInHandler(LoopbackHandler):
    def answer(self):
        server: StandIn = self.server
        self.read_body()
        with server.lock:
            down = server.fault.kind == "down"
            if not down:
                if self.headers.get("Host", "").rpartition(":")[0].endswith("-shadow"):
                    server.mirrored += 1
                else:
                    server.asked[self.command] += 1
            failing = server.fault.kind == "errors" and server.random.random() < server.fault.error_ratio
        if down:  # a pod that went away: the connection ends without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        named = {STAND_IN_HEADER: server.version}
        if failing:
            self.reply(503, b'{"error":"injected"}', headers=named)
        else:
            body = {"service": server.service_key, "version": server.version, "method": self.command, "path": self.path}
            self.reply(200, json.dumps(body).encode(), headers=named)


class DnsStandIn(socketserver.ThreadingUDPServer):
    """Answers A queries for the version Services' names, as coredns answers for headless Services: their pods."""

    daemon_threads = True

    def __init__(self, records: dict[str, str]):
        self.records = {name.lower().rstrip("."): address for name, address in records.items()}
        super().__init__((LOOPBACK, 0), _DnsHandler)


class _DnsHandler(socketserver.BaseRequestHandler):
    def handle(self):
        query, sock = self.request
        if len(query) < 12:
            return
        ident, _flags, questions = struct.unpack("!HHH", query[:6])
        labels, offset = [], 12
        while offset < len(query) and query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
            offset += 1 + length
        question = query[12 : offset + 5]
        qtype = struct.unpack("!H", query[offset + 1 : offset + 3])[0] if offset + 3 <= len(query) else 0
        address = self.server.records.get(".".join(labels).lower())
        if questions != 1 or address is None:
            sock.sendto(struct.pack("!HHHHHH", ident, 0x8183, 1, 0, 0, 0) + question, self.client_address)
            return
        answers = b""
        if qtype == 1:
            answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(address)
        header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, self.client_address)


@_every_method
class _DeniedHandler(LoopbackHandler):
    """Where Cilium would deny: answers 403 "Access denied", as cilium-envoy's upstream policy check does."""

    def answer(self):
        self.read_body()
        self.reply(403, ACCESS_DENIED, "text/plain")


class Blackhole:
    """Where the VPC would drop: SYNs go unanswered, so connects time out, as for a dropped packet. A
    listener with a backlog of 0 and its accept queue filled by one connection of its own: Linux then
    drops every further SYN (tcp_conn_request, accept queue full)."""

    def __init__(self, address: tuple[str, int]):
        self.socket = socket.socket()
        self.socket.bind(address)
        self.socket.listen(0)
        self.filler = socket.create_connection(address, timeout=REQUEST_TIMEOUT_S)

    def stop(self) -> None:
        self.filler.close()
        self.socket.close()


def _write_discovery(path: Path, type_url: str, resources: list[dict], deferred: list | None = None) -> dict:
    """A file Envoy's filesystem subscription reads: one DiscoveryResponse, moved into place (Envoy
    watches for the move, so a rewrite is a new version of that resource type). With ``deferred``, the
    write (of the resources as they are now) is appended there for later instead."""
    text = json.dumps({"version_info": str(time.monotonic_ns()), "type_url": type_url, "resources": resources})

    def write() -> None:
        staged = path.with_suffix(".staged")
        staged.write_text(text)
        os.replace(staged, path)

    if deferred is None:
        write()
    else:
        deferred.append(write)
    return {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}


def _socket_address(address: str, port: int) -> dict:
    return {"socket_address": {"address": address, "port_value": port}}


# Envoy's node identity in every bootstrap here (Cilium's Envoy reports a host~IP~... id too).
NODE = {"id": "host~127.0.0.1~harness~cluster.local", "cluster": "cilium-envoy"}


def _as_delivered(service: MeshService, rds_source: Callable[[dict], dict],
                  eds_source: Callable[[dict], dict]) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Listeners and clusters as Cilium hands them to Envoy: names qualified as Cilium qualifies them,
    the route configuration over RDS and endpoints over EDS from the given config sources (each made
    from the qualified route or EDS cluster); only the listener address (loopback) is made up."""
    resources = qualify_like_cilium(service.envoy_resources(), service.namespace, service.cec_name)
    (route,) = [r for r in resources if r["@type"].endswith(".RouteConfiguration")]
    route_source = rds_source(route)
    listeners, clusters = [], []
    for resource in resources:
        kind = resource.pop("@type").rsplit(".", 1)[-1]
        if kind == "Listener":
            resource["address"] = _socket_address(LOOPBACK, 0)
            for chain in resource["filter_chains"]:
                for flt in chain["filters"]:
                    flt["typed_config"]["rds"]["config_source"] = route_source
            listeners.append(resource)
        elif kind == "Cluster":
            if resource.get("type") == "EDS":
                resource["eds_cluster_config"] = {"eds_config": eds_source(resource)}
            clusters.append(resource)
    return listeners, clusters


def stand_in_bootstrap(service: MeshService, addresses: dict[str, str | None], dns_port: int,
                       directory: Path, dynamic_clusters: bool = False, route_later: list | None = None) -> dict:  # fmt: skip
    """The service's resources as Cilium delivers them, with RDS/EDS from files and DNS from a stand-in.

    addresses:        version -> the loopback address its EDS cluster lists (None: no endpoints).
    dynamic_clusters: clusters over CDS from a file too, as Cilium's xDS delivers them, so that a
                      changed CiliumEnvoyConfig (EnvoyProcess.apply_policy) changes them in the running
                      Envoy: a changed cluster is replaced (its outlier state starts afresh), an unchanged one kept.
    route_later:      the route configuration's write is appended here instead of done, so that a change
                      can bring its clusters first and its routes after them (xDS's make-before-break order).
    """
    eds_versions = {service.eds_cluster(v): v for v in service.versions}

    def rds_source(route: dict) -> dict:
        return _write_discovery(directory / "rds.json", route["@type"], [route], route_later)

    def eds_source(cluster: dict) -> dict:
        version = eds_versions[cluster["name"]]
        lb_endpoints = [{"endpoint": {"address": _socket_address(addresses[version], service.pod_port)}}]
        assignment = {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": cluster["name"],
            "endpoints": [{"lb_endpoints": lb_endpoints}] if addresses[version] else [],
        }
        return _write_discovery(directory / f"eds-{version}.json", assignment["@type"], [assignment])

    listeners, clusters = _as_delivered(service, rds_source, eds_source)
    resources = {"static_resources": {"listeners": listeners, "clusters": clusters}}
    if dynamic_clusters:
        cluster_type = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        typed = [{"@type": cluster_type, **cluster} for cluster in clusters]
        resources = {
            "static_resources": {"listeners": listeners},
            "dynamic_resources": {"cds_config": _write_discovery(directory / "cds.json", cluster_type, typed)},
        }
    return {
        "node": NODE,
        "admin": {"address": _socket_address(LOOPBACK, 0)},
        "typed_dns_resolver_config": {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": LOOPBACK, "port_value": dns_port, "protocol": "UDP"}}],
                "dns_resolver_options": {"no_default_search_domain": True},
            },
        },
        **resources,
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


def cilium_xds_bootstrap(service: MeshService) -> dict:
    """The service's resources exactly as Cilium hands them to Envoy: names qualified, RDS and EDS
    from Cilium's xDS server; only the listener address (a Cilium proxy port) is made up."""
    listeners, clusters = _as_delivered(service, lambda _: CILIUM_CONFIG_SOURCE, lambda _: CILIUM_CONFIG_SOURCE)
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
    return {"node": NODE, "static_resources": {"listeners": listeners, "clusters": clusters}}


def validate_bootstrap(bootstrap: dict, tag: str) -> subprocess.CompletedProcess:
    """`envoy --mode validate` in cilium-envoy's extension set: every field parsed strictly, the config loads."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap))
        return subprocess.run(
            [*envoy_command(tag), "--mode", "validate", "-c", str(path), "--log-level", "error"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


@dataclass
class RunResult:
    policy: MeshService
    faults: dict[str, Fault]
    requests: int
    versions: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    retries: int = 0
    ejections: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    # The answered requests by (where the route sent them: DESTINATION_HEADER, the version that answered).
    routed: Counter = field(default_factory=Counter)

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

    def __init__(self, bootstrap: dict, tag: str, directory: Path, render: Callable[..., dict] | None = None):
        self.render = render
        self._expect(bootstrap)
        self.route_subscriptions = len(bootstrap["static_resources"]["listeners"])
        config = directory / "bootstrap.json"
        config.write_text(json.dumps(bootstrap))
        self.admin_file = directory / "admin"
        self.process = subprocess.Popen(
            [
                *envoy_command(tag), "-c", str(config), "--admin-address-path", str(self.admin_file),
                "--concurrency", "1", "--disable-hot-restart", "--log-level", "error",
                "--base-id-path", str(directory / "base-id"), "--use-dynamic-base-id",
                # Cilium parses a CiliumEnvoyConfig's resources strictly (protojson) and skips a
                # CiliumEnvoyConfig with an unknown field; Envoy would only warn about one over xDS.
                "--reject-unknown-dynamic-fields",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            self.admin, self.port = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _expect(self, bootstrap: dict) -> None:
        """The clusters a configuration brings (static, or over CDS from the file)."""
        clusters = bootstrap["static_resources"].get("clusters")
        if clusters is None:
            path = bootstrap["dynamic_resources"]["cds_config"]["path_config_source"]["path"]
            clusters = json.loads(Path(path).read_text())["resources"]
        self.dns_clusters = [c["name"] for c in clusters if c.get("type") == "STRICT_DNS"]
        self.eds_clusters = [c["name"] for c in clusters if c.get("type") == "EDS"]

    def apply_policy(self, service: MeshService) -> None:
        """Hand the running Envoy the service's resources as Cilium does when a CiliumEnvoyConfig changes:
        the clusters first, and once Envoy has them (DNS resolved), the routes that may name them."""
        route_later: list = []
        before = self.counters()
        self._expect(self.render(service, route_later))
        self._wait_for_update(("cluster_manager.cds.update_success",), before, service)
        self.wait_for_config()
        before = self.counters()
        for write in route_later:
            write()
        self._wait_for_update(tuple(k for k in before if ".rds." in k and k.endswith(".update_success")), before, service)

    def _wait_for_update(self, updates: tuple[str, ...], before: dict[str, int], service: MeshService) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            counters = self.counters()
            if any(counters.get(k.replace("update_success", "update_rejected"), 0) > before.get(k.replace("update_success", "update_rejected"), 0) for k in updates):
                raise RuntimeError(f"envoy rejected the configuration of {service.weights}")
            if all(counters.get(k, 0) > before.get(k, 0) for k in updates):
                return
            time.sleep(0.02)
        raise RuntimeError(f"envoy did not load the configuration of {service.weights} in time")

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

    def wait_for_config(self) -> None:
        """Until RDS and every EDS subscription are accepted and every DNS cluster has resolved its hosts.

        A rejected route configuration or endpoint assignment raises: Envoy would
        otherwise serve on without it (404 or 503), hiding the mistake.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            counters = self.counters()
            rejected = sorted(k for k, v in counters.items() if k.endswith(".update_rejected") and v)
            if rejected:
                raise RuntimeError(f"envoy rejected configuration: {', '.join(rejected)}")
            routes = [k for k in counters if ".rds." in k and k.endswith(".update_success") and counters[k]]
            endpoints = [counters.get(f"cluster.{name}.update_success", 0) for name in self.eds_clusters]
            if len(routes) >= self.route_subscriptions and all(endpoints):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("envoy did not load its RDS and EDS configuration in time")
        while time.monotonic() < deadline:
            statuses = json.loads(self.get(self.admin, "/clusters?format=json"))["cluster_statuses"]
            pending = [c["name"] for c in statuses if c["name"].endswith(tuple(self.dns_clusters)) and not c.get("host_statuses")]
            if not pending:
                return
            time.sleep(0.05)
        raise RuntimeError(f"DNS clusters did not resolve in time: {pending}")

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


def _loopback_addresses(names: list[str], rng: random.Random) -> dict[str, str]:
    """A distinct 127/8 address per name: the port is the service's pod port, as on a pod."""
    base = f"127.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}"
    return {name: f"{base}.{index + 1}" for index, name in enumerate(names)}


def deployed_alone(service: MeshService, datapath: str) -> Deployed:
    """The datapath model of a stack that meshes this service alone, as declared (its versions' pods and
    its callers placed from the declaration, no sample app)."""
    return Deployed.of(datapath, (service,), sample_app=False)


def model_statuses(service: MeshService, datapath: str, deployed: Deployed | None = None) -> dict[tuple[str, str], str]:
    """What Cilium and the VPC do to each cluster kind and version of the service, by the datapath model of
    ``deployed`` (default: the service deployed alone)."""
    return cec_statuses(deployed or deployed_alone(service, datapath), service)


def verdicts_line(label: str, service: MeshService, datapath: str, deployed: Deployed | None = None) -> str:
    """The model's verdict per cluster kind and version, as preview and measure print it."""
    statuses = model_statuses(service, datapath, deployed)
    verdicts = ", ".join(f"{kind} {version} {status}" for (kind, version), status in sorted(statuses.items()))
    return f"Cilium's verdicts for {label}, datapath {datapath} (checks/datapath.py): {verdicts}"


@contextmanager
def running(service: MeshService, tag: str, faults: dict[str, Fault] | None = None, seed: int = 7,
            datapath: str = "eni", statuses: dict[tuple[str, str], str] | None = None,
            dynamic_clusters: bool = False):  # fmt: skip
    """Stand-in versions, their DNS names and an Envoy with the service in front; everything stops on exit.
    Yields (envoy, faults per version, the running stand-ins by version).

    statuses:         per (cluster kind "eds"/"dns", version), what Cilium and the VPC do to a request
                      there ("delivered", "denied", "dropped", "no address"); by default the datapath
                      model's for ``datapath`` with the service deployed alone (model_statuses).
    dynamic_clusters: clusters over CDS, so that ``envoy.apply_policy`` can change the weights (and the
                      clusters they bring) of the running Envoy.
    """
    faults = {v: (faults or {}).get(v, Fault()) for v in service.versions}
    statuses = statuses if statuses is not None else model_statuses(service, datapath)
    addresses = _loopback_addresses([*service.versions, "denied", "dropped"], random.Random())
    port = service.pod_port
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stand_ins: dict[str, StandIn] = {}

        def serve(server):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            return server

        for index, version in enumerate(service.versions):
            if faults[version].kind in ("down", "empty"):
                continue
            try:
                stand_ins[version] = serve(StandIn(service, version, faults[version], seed + index, (addresses[version], port)))
            except OSError as error:
                raise RuntimeError(f"cannot listen on {addresses[version]}:{port}: {error}") from None
        serve(LoopbackServer((addresses["denied"], port), _DeniedHandler))
        stack.callback(Blackhole((addresses["dropped"], port)).stop)

        def address(kind: str, version: str) -> str | None:
            """Where a cluster of that kind reaches the version: the pod, or Cilium's verdict's stand-in."""
            status = statuses.get((kind, version), "delivered")
            if status == "no address" or (status == "delivered" and faults[version].kind == "empty"):
                return None  # no endpoints: EDS lists none, and a headless Service's name has no answer
            return addresses[version] if status == "delivered" else addresses[status]

        dns = DnsStandIn({service.version_host(v): a for v in service.versions if (a := address("dns", v))})
        serve(dns)
        eds = {v: address("eds", v) for v in service.versions}

        def render(changed: MeshService, route_later: list | None = None) -> dict:
            return stand_in_bootstrap(changed, eds, dns.server_address[1], directory, dynamic_clusters, route_later)

        envoy = EnvoyProcess(render(service), tag, directory, render if dynamic_clusters else None)
        stack.callback(envoy.stop)
        envoy.wait_for_config()
        yield envoy, faults, stand_ins


@dataclass(frozen=True)
class Answer:
    """One request's outcome: its status (0: no answer), the version whose stand-in answered (None: Envoy
    answered itself, or Cilium's 403), and the version its route sent it to (DESTINATION_HEADER)."""

    status: int
    version: str | None = None
    destination: str | None = None


class ServiceClient:
    """Requests over one keep-alive connection, opened again after a request gets no answer."""

    def __init__(self, address: tuple[str, int], path: str = "/"):
        self.address = address
        self.path = path
        self.connection = http.client.HTTPConnection(*address, timeout=REQUEST_TIMEOUT_S)

    def ask(self, method: str = "GET", path: str | None = None, headers: dict[str, str] | None = None) -> Answer:
        """One request (``path`` by default the client's)."""
        try:
            self.connection.request(method, path or self.path, headers=headers or {})
            response = self.connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection(*self.address, timeout=REQUEST_TIMEOUT_S)
            return Answer(0)
        return Answer(response.status, response.getheader(STAND_IN_HEADER), response.getheader(DESTINATION_HEADER))

    def close(self) -> None:
        self.connection.close()


def send(address: tuple[str, int], requests: int, headers: dict[str, str] | None = None, path: str = "/",
         method: str = "GET") -> tuple[list[Answer], list[float], float]:  # fmt: skip
    """``requests`` sequential requests over one keep-alive connection: their answers, latencies (ms) and
    the seconds they took."""
    answers, latencies = [], []
    client = ServiceClient(address, path)
    started = time.perf_counter()
    try:
        for _ in range(requests):
            begin = time.perf_counter()
            answers.append(client.ask(method, headers=headers))
            latencies.append((time.perf_counter() - begin) * 1000)
    finally:
        client.close()
    return answers, latencies, time.perf_counter() - started


def run(service: MeshService, tag: str, requests: int, faults: dict[str, Fault] | None = None,
        headers: dict[str, str] | None = None, seed: int = 7, datapath: str = "eni",
        statuses: dict[tuple[str, str], str] | None = None) -> RunResult:  # fmt: skip
    """Send ``requests`` GETs of the service's check_path with the given faults and Cilium's verdicts, and
    collect what happened."""
    with running(service, tag, faults, seed, datapath, statuses) as (envoy, faults, _):
        return send_and_collect(envoy, service, faults, requests, headers)


def send_and_collect(envoy: EnvoyProcess, service: MeshService, faults: dict[str, Fault], requests: int,
                     headers: dict[str, str] | None = None) -> RunResult:  # fmt: skip
    """Send ``requests`` GETs of the service's check_path through a running Envoy, then read its retries and
    ejections."""
    answers, latencies, elapsed = send((LOOPBACK, envoy.port), requests, headers, service.check_path)
    counters = envoy.counters()
    retries = sum(v for k, v in counters.items() if k.startswith("cluster.") and k.endswith(".upstream_rq_retry"))
    ejections = sum(v for k, v in counters.items() if k.endswith(".outlier_detection.ejections_enforced_total"))
    answered = [a for a in answers if a.status == 200]
    return RunResult(service, faults, requests, Counter(a.version for a in answered), Counter(a.status for a in answers),
                     retries, ejections, latencies, elapsed, Counter((a.destination, a.version) for a in answered))  # fmt: skip


def walkthrough(service: MeshService) -> MeshService:
    """The walkthrough's hand-written CiliumEnvoyConfig (its step 11) for this service's versions and
    weights, kept to compare against: the version Services' EDS clusters by weight, no failover, pin
    header, routes or mirror; every method retried on 5xx 3 times, 1 s per try, 15 s in all; a host
    ejected after 5 errors or 2 connection failures in a row, checked every 10 s, at most 10% of them."""
    return dataclasses.replace(
        service,
        pin_header=None,
        routes=(),
        mirror=None,
        failover=False,
        timeout_ms=15000,
        retries=Retries(attempts=3, per_try_timeout_ms=1000, conditions=("5xx",), methods=HTTP_METHODS, non_idempotent=True),
        outlier_detection=OutlierDetection(consecutive_5xx=5, consecutive_local_origin_failure=2, failure_percentage_threshold=None,
                                           interval_ms=10000, base_ejection_time_ms=30000, max_ejection_percent=10),
    )  # fmt: skip


# --- Every declared route of a list of services -------------------------------------------------

# |count - expected| within 4.5 standard deviations: a correct split or mirror fails this about once in 150,000.
SIGMAS = 4.5
# What check_services_in_envoy tries, in order, for a request the declaration sends to the split.
_UNROUTED_PATH = "/cilium-mesh-harness-unrouted"
_SPLIT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "TRACE")


def declared_destination(service: MeshService, method: str, path: str, headers: dict[str, str]) -> str:
    """Where the declaration sends a request (traffic.py's module docstring): the version its pin header
    names, else the first route that matches, else the split ("split")."""
    if service.pin_header and headers.get(service.pin_header) in service.versions:
        return headers[service.pin_header]
    for route in service.routes:
        if (route.path is None or path == route.path) and path.startswith(route.path_prefix or "/") and all(
            headers.get(name) == value for name, value in route.headers.items()
        ) and (not route.methods or method in route.methods):  # fmt: skip
            return route.to
    return "split"


@dataclass
class Delivery:
    """What one kind of request met in Envoy: ``label`` names it (``pin v2 GET / [x-version: v2]``,
    ``routes[1] GET /api``, ``split GET /``, ``failover v1 down GET / (48 routed to v1)``), ``expected`` is
    where the declaration sends it (a version, or "split")."""

    label: str
    expected: str
    answers: list[Answer]
    problem: str | None = None

    @property
    def versions(self) -> Counter:
        """The answered requests by the version that answered."""
        return Counter(a.version for a in self.answers if a.status == 200)

    def line(self) -> str:
        """``label -> expected: what answered; what failed; the problem``."""
        answered = ", ".join(f"{v} {n}" for v, n in sorted(self.versions.items()))
        failed = Counter(a.status for a in self.answers if a.status != 200)
        parts = [answered, *(f"{n} x {status or 'no answer'}" for status, n in sorted(failed.items())), self.problem]
        said = "; ".join(p for p in parts if p)
        return f"{self.label} -> {self.expected}" + (f": {said}" if said else "")


def _judge(service: MeshService, delivery: Delivery, by_weight: bool) -> Delivery:
    """Every answer 200 from the version it was routed to, and that the declared one (for the split: a
    weighted version; ``by_weight``: in the weights' proportions within SIGMAS)."""
    declared = service.weighted_versions if delivery.expected == "split" else (delivery.expected,)
    wrong = sum(a.status != 200 or a.version != a.destination or a.destination not in declared for a in delivery.answers)
    if wrong:
        delivery.problem = f"{wrong} of {len(delivery.answers)} not answered by the version declared"
    elif by_weight:
        n, total = len(delivery.answers), sum(service.weights.values())
        off = [v for v in service.weighted_versions if abs(delivery.versions[v] - n * service.weights[v] / total)
               > SIGMAS * math.sqrt(n * service.weights[v] / total * (1 - service.weights[v] / total))]  # fmt: skip
        if off:
            delivery.problem = f"{', '.join(off)} off the weights {dict(service.weights)}"
    return delivery


def _judge_failover(delivery: Delivery, down: str) -> Delivery:
    """With ``down``'s pods gone: what was routed to it answered by the next priority (``expected``), the rest
    by their own versions; at most one in 20 unanswered (the tries before Envoy ejects the host)."""
    wrong = sum(a.status == 200 and a.version != (delivery.expected if a.destination == down else a.destination)
                for a in delivery.answers)  # fmt: skip
    failed = sum(a.status != 200 for a in delivery.answers)
    if wrong:
        delivery.problem = f"{wrong} of {len(delivery.answers)} answered by a version other than the declared failover"
    elif failed * 20 > len(delivery.answers):
        delivery.problem = f"{failed} of {len(delivery.answers)} unanswered"
    return delivery


def _unrouted_request(service: MeshService) -> tuple[str, str] | None:
    """A (method, path) the declaration sends to the split, the check path's GET if it does."""
    for path in (service.check_path, "/", _UNROUTED_PATH):
        for method in _SPLIT_METHODS:
            if declared_destination(service, method, path, {}) == "split":
                return method, path
    return None


def wait_for_mirror(envoy: EnvoyProcess, service: MeshService) -> None:
    """Until the mirror's EDS cluster has no request in flight: mirrored copies are sent beside the requests
    and may still be on their way when the answer is back."""
    name = f"cluster.{service.eds_cluster(service.mirror.version)}.upstream_rq_active"
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while envoy.counters().get(name, 0) and time.monotonic() < deadline:
        time.sleep(0.02)


def check_service_in_envoy(service: MeshService, tag: str, statuses: dict[tuple[str, str], str],
                           requests: int = 20, split_requests: int = 200) -> list[Delivery]:  # fmt: skip
    """The service's CiliumEnvoyConfig in Envoy: ``requests`` pinned to each version (with a pin header), the
    same for each declared route (its path, headers and first method), and ``split_requests`` that no route
    matches. Each Delivery says what answered and, if it is not what the declaration says, its problem; the
    mirror (if any) is one more, its copies counted by the mirrored version's stand-in; and with failover,
    for each weighted version in an Envoy of its own with that version's pods down, ``5 * requests`` of the
    split's requests (what was routed to it must be answered by its next priority). ``statuses``: Cilium's
    verdicts, as for ``running``."""
    deliveries = []
    with running(service, tag, statuses=statuses) as (envoy, _, stand_ins):
        address = (LOOPBACK, envoy.port)
        mirrored_requests = 0

        def deliver(label: str, count: int, method: str, path: str, headers: dict[str, str], by_weight: bool = False) -> None:
            nonlocal mirrored_requests
            answers, _, _ = send(address, count, headers, path, method)
            expected = declared_destination(service, method, path, headers)
            shown = "".join(f" [{name}: {value}]" for name, value in headers.items())
            deliveries.append(_judge(service, Delivery(f"{label} {method} {path}{shown}", expected, answers), by_weight))
            mirrored_requests += 0 if service.pin_header in headers else count

        for version in service.versions if service.pin_header else ():
            deliver(f"pin {version}", requests, "GET", service.check_path, {service.pin_header: version})
        for i, route in enumerate(service.routes):
            methods = [m for m in route.methods or ("GET",) if m != "CONNECT"]
            if not methods:
                deliveries.append(Delivery(f"routes[{i}] not checked (CONNECT only)", route.to, []))
                continue
            deliver(f"routes[{i}]", requests, methods[0], route.path or route.path_prefix or "/", dict(route.headers))
        unrouted = _unrouted_request(service)
        if unrouted is None:
            deliveries.append(Delivery("split not checked (every request matches a route)", "split", []))
        else:
            deliver("split", split_requests, *unrouted, {}, by_weight=True)
        if service.mirror is not None:
            wait_for_mirror(envoy, service)
            copies = stand_ins[service.mirror.version].mirrored
            p, n = service.mirror.percent / 100, mirrored_requests
            mirror = Delivery(f"mirror {service.mirror.percent:g}% of {n} requests ({copies} copies)", service.mirror.version, [])
            if abs(copies - n * p) > SIGMAS * math.sqrt(n * p * (1 - p)):
                mirror.problem = f"{copies} copies reached {service.mirror.version}, expected about {n * p:.0f}"
            deliveries.append(mirror)
    for down in service.weighted_versions if service.failover is not False and unrouted else ():
        order = service.failover_order(down)
        if len(order) < 2:
            continue
        method, path = unrouted
        with running(service, tag, {down: Fault("down")}, statuses=statuses) as (envoy, _, _):
            answers, _, _ = send((LOOPBACK, envoy.port), 5 * requests, None, path, method)
        routed = sum(a.destination == down for a in answers)
        label = f"failover {down} down {method} {path} ({routed} routed to {down})"
        deliveries.append(_judge_failover(Delivery(label, order[1], answers), down))
    return deliveries


def check_services_in_envoy(services: Iterable[MeshService], tag: str, datapath: str = "eni", sample_app: bool = False,
                            requests: int = 20, split_requests: int = 200) -> dict[str, list[Delivery]]:  # fmt: skip
    """check_service_in_envoy for each service, one after another (one Envoy at a time), with Cilium's verdicts
    from the datapath model of these services deployed together (and the sample app with ``sample_app``);
    raises AssertionError naming every delivery with a problem, else returns them by ``namespace/name``."""
    services = tuple(services)
    deployed = Deployed.of(datapath, services, sample_app)
    results = {s.key: check_service_in_envoy(s, tag, model_statuses(s, datapath, deployed), requests, split_requests)
               for s in services}  # fmt: skip
    problems = [f"{key} {d.line()}" for key, deliveries in results.items() for d in deliveries if d.problem]
    if problems:
        raise AssertionError("\n".join(problems))
    return results
