"""Run a traffic policy's exact Envoy resources in cilium-envoy's Envoy, on loopback, against stand-in versions.

The Envoy is the upstream release of cilium-envoy's minor version with every
extension cilium-envoy leaves out disabled (checks/cilium_envoy.py). It gets
the resources as Cilium hands them over: names qualified as Cilium qualifies
them, the listener, the EDS clusters and the failover clusters unchanged, the
route configuration over RDS and each version's endpoints over EDS. What
differs from the cluster:

* RDS and EDS come from files (Envoy's filesystem subscription, which
  cilium-envoy builds), not from Cilium's gRPC xDS server;
* the listener has a loopback address, not a Cilium proxy port, and lacks the
  filters Cilium injects (listener filter cilium.bpf_metadata, network filter
  cilium.network, HTTP filter cilium.l7policy; those exist only in cilium-envoy);
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

Everything here is bounded: fixed request counts, socket timeouts, and
processes and servers that are always stopped.
"""

from __future__ import annotations

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
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cilium_mesh.traffic import MeshService, qualify_like_cilium
from checks.cilium_envoy import envoy_command
from checks.datapath import Deployed, cec_statuses

LOOPBACK = "127.0.0.1"
REQUEST_TIMEOUT_S = 10
START_TIMEOUT_S = 20
VENDORS = ["ABC.com"]

DIFFERENCES = (
    "Run in cilium-envoy's extension set, resources as Cilium delivers them; differs from the cluster in: "
    "RDS/EDS from files (not Cilium's gRPC xDS), loopback listener without Cilium's injected filters "
    "(cilium.bpf_metadata, cilium.network, cilium.l7policy: their verdicts come from checks/datapath.py and "
    "are reproduced by stand-ins), version DNS names resolved by a loopback stand-in."
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

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class StandIn(LoopbackServer):
    """A catalogdetail version that answers like the real one: {"version":"1","vendors":["ABC.com"]}."""

    def __init__(self, version: str, fault: Fault, seed: int, address: tuple[str, int]):
        self.version_number = version.lstrip("v")
        self.fault = fault
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.served = 0
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


class _StandInHandler(LoopbackHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        server: StandIn = self.server
        with server.lock:
            down = server.fault.kind == "down"
            server.served += not down
            failing = server.fault.kind == "errors" and server.random.random() < server.fault.error_ratio
        if down:  # a pod that went away: the connection ends without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif failing:
            self.reply(503, b'{"error":"injected"}')
        elif self.path.startswith("/catalogDetail") or self.path == "/ping":
            self.reply(200, json.dumps({"version": server.version_number, "vendors": VENDORS}).encode())
        else:
            self.reply(404, b"{}")


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


class DeniedStandIn(LoopbackServer):
    """Where Cilium would deny: answers 403 "Access denied", as cilium-envoy's upstream policy check does."""

    def __init__(self, address: tuple[str, int]):
        self.served = 0
        super().__init__(address, _DeniedHandler)


class _DeniedHandler(LoopbackHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        self.server.served += 1
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


def _as_delivered(policy: MeshService, rds_source: Callable[[dict], dict],
                  eds_source: Callable[[dict], dict]) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Listeners and clusters as Cilium hands them to Envoy: names qualified as Cilium qualifies them,
    the route configuration over RDS and endpoints over EDS from the given config sources (each made
    from the qualified route or EDS cluster); only the listener address (loopback) is made up."""
    resources = qualify_like_cilium(policy.envoy_resources(), policy.namespace, policy.cec_name)
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


def stand_in_bootstrap(policy: MeshService, addresses: dict[str, str | None], dns_port: int,
                       directory: Path, dynamic_clusters: bool = False, route_later: list | None = None) -> dict:  # fmt: skip
    """The policy's resources as Cilium delivers them, with RDS/EDS from files and DNS from a stand-in.

    addresses:        version -> the loopback address its EDS cluster lists (None: no endpoints).
    dynamic_clusters: clusters over CDS from a file too, as Cilium's xDS delivers them, so that a
                      changed CiliumEnvoyConfig (EnvoyProcess.apply_policy) changes them in the running
                      Envoy: a changed cluster is replaced (its outlier state starts afresh), an unchanged one kept.
    route_later:      the route configuration's write is appended here instead of done, so that a change
                      can bring its clusters first and its routes after them (xDS's make-before-break order).
    """
    eds_versions = {policy.eds_cluster(v): v for v in policy.versions}

    def rds_source(route: dict) -> dict:
        return _write_discovery(directory / "rds.json", route["@type"], [route], route_later)

    def eds_source(cluster: dict) -> dict:
        version = eds_versions[cluster["name"]]
        lb_endpoints = [{"endpoint": {"address": _socket_address(addresses[version], policy.port)}}]
        assignment = {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": cluster["name"],
            "endpoints": [{"lb_endpoints": lb_endpoints}] if addresses[version] else [],
        }
        return _write_discovery(directory / f"eds-{version}.json", assignment["@type"], [assignment])

    listeners, clusters = _as_delivered(policy, rds_source, eds_source)
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


def cilium_xds_bootstrap(policy: MeshService) -> dict:
    """The policy's resources exactly as Cilium hands them to Envoy: names qualified, RDS and EDS
    from Cilium's xDS server; only the listener address (a Cilium proxy port) is made up."""
    listeners, clusters = _as_delivered(policy, lambda _: CILIUM_CONFIG_SOURCE, lambda _: CILIUM_CONFIG_SOURCE)
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

    def apply_policy(self, policy: MeshService) -> None:
        """Hand the running Envoy the policy's resources as Cilium does when a CiliumEnvoyConfig changes:
        the clusters first, and once Envoy has them (DNS resolved), the routes that may name them."""
        route_later: list = []
        before = self.counters()
        self._expect(self.render(policy, route_later))
        self._wait_for_update(("cluster_manager.cds.update_success",), before, policy)
        self.wait_for_config()
        before = self.counters()
        for write in route_later:
            write()
        self._wait_for_update(tuple(k for k in before if ".rds." in k and k.endswith(".update_success")), before, policy)

    def _wait_for_update(self, updates: tuple[str, ...], before: dict[str, int], policy: MeshService) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            counters = self.counters()
            if any(counters.get(k.replace("update_success", "update_rejected"), 0) > before.get(k.replace("update_success", "update_rejected"), 0) for k in updates):
                raise RuntimeError(f"envoy rejected the configuration of {policy.weights}")
            if all(counters.get(k, 0) > before.get(k, 0) for k in updates):
                return
            time.sleep(0.02)
        raise RuntimeError(f"envoy did not load the configuration of {policy.weights} in time")

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
    """A distinct 127/8 address per name: the port is the policy's, as on a pod."""
    base = f"127.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}"
    return {name: f"{base}.{index + 1}" for index, name in enumerate(names)}


def model_statuses(policy: MeshService, datapath: str) -> dict[tuple[str, str], str]:
    """What Cilium and the VPC do to each cluster kind and version, by the datapath model."""
    return cec_statuses(Deployed.of(datapath, policy))


def verdicts_line(label: str, policy: MeshService, datapath: str) -> str:
    """The model's verdict per cluster kind and version, as preview and measure print it."""
    statuses = model_statuses(policy, datapath)
    verdicts = ", ".join(f"{kind} {version} {status}" for (kind, version), status in sorted(statuses.items()))
    return f"Cilium's verdicts for {label}, datapath {datapath} (checks/datapath.py): {verdicts}"


@contextmanager
def running(policy: MeshService, tag: str, faults: dict[str, Fault] | None = None, seed: int = 7,
            datapath: str = "eni", statuses: dict[tuple[str, str], str] | None = None,
            dynamic_clusters: bool = False):  # fmt: skip
    """Stand-in versions, their DNS names and an Envoy with the policy in front; everything stops on exit.

    statuses:         per (cluster kind "eds"/"dns", version), what Cilium and the VPC do to a request
                      there ("delivered", "denied", "dropped", "no address"); by default the datapath
                      model's for ``datapath``.
    dynamic_clusters: clusters over CDS, so that ``envoy.apply_policy`` can change the weights (and the
                      clusters they bring) of the running Envoy.
    """
    faults = {v: (faults or {}).get(v, Fault()) for v in policy.versions}
    statuses = statuses if statuses is not None else model_statuses(policy, datapath)
    addresses = _loopback_addresses([*policy.versions, "denied", "dropped"], random.Random())
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stand_ins = {}

        def serve(server):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            return server

        for index, version in enumerate(policy.versions):
            if faults[version].kind in ("down", "empty"):
                continue
            try:
                server = StandIn(version, faults[version], seed + index, (addresses[version], policy.port))
            except OSError as error:
                raise RuntimeError(f"cannot listen on {addresses[version]}:{policy.port}: {error}") from None
            stand_ins[server.version_number] = serve(server)
        serve(DeniedStandIn((addresses["denied"], policy.port)))
        stack.callback(Blackhole((addresses["dropped"], policy.port)).stop)

        def address(kind: str, version: str) -> str | None:
            """Where a cluster of that kind reaches the version: the pod, or Cilium's verdict's stand-in."""
            status = statuses.get((kind, version), "delivered")
            if status == "no address" or (status == "delivered" and faults[version].kind == "empty"):
                return None  # no endpoints: EDS lists none, and a headless Service's name has no answer
            return addresses[version] if status == "delivered" else addresses[status]

        dns = DnsStandIn({policy.version_host(v): a for v in policy.versions if (a := address("dns", v))})
        serve(dns)
        eds = {v: address("eds", v) for v in policy.versions}
        def render(changed: MeshService, route_later: list | None = None) -> dict:
            return stand_in_bootstrap(changed, eds, dns.server_address[1], directory, dynamic_clusters, route_later)

        envoy = EnvoyProcess(render(policy), tag, directory, render if dynamic_clusters else None)
        stack.callback(envoy.stop)
        envoy.wait_for_config()
        yield envoy, faults, stand_ins


class CatalogClient:
    """GETs of /catalogDetail over one keep-alive connection, opened again after a request gets no answer."""

    def __init__(self, address: tuple[str, int]):
        self.address = address
        self.connection = http.client.HTTPConnection(*address, timeout=REQUEST_TIMEOUT_S)

    def get(self, headers: dict[str, str] | None = None) -> tuple[int, str | None]:
        """(status, 0 for no answer; the version "v<N>" that answered a 200, else None)."""
        try:
            self.connection.request("GET", "/catalogDetail", headers=headers or {})
            response = self.connection.getresponse()
            body, status = response.read(), response.status
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection(*self.address, timeout=REQUEST_TIMEOUT_S)
            return 0, None
        return status, "v" + json.loads(body)["version"] if status == 200 else None

    def close(self) -> None:
        self.connection.close()


def send(address: tuple[str, int], requests: int,
         headers: dict[str, str] | None = None) -> tuple[Counter, Counter, list[float], float]:  # fmt: skip
    """`requests` sequential GETs of /catalogDetail over one keep-alive connection."""
    versions, statuses, latencies = Counter(), Counter(), []
    client = CatalogClient(address)
    started = time.perf_counter()
    try:
        for _ in range(requests):
            begin = time.perf_counter()
            status, version = client.get(headers)
            latencies.append((time.perf_counter() - begin) * 1000)
            statuses[status] += 1
            if version:
                versions[version] += 1
    finally:
        client.close()
    return versions, statuses, latencies, time.perf_counter() - started


def run(policy: MeshService, tag: str, requests: int, faults: dict[str, Fault] | None = None,
        headers: dict[str, str] | None = None, seed: int = 7, datapath: str = "eni",
        statuses: dict[tuple[str, str], str] | None = None) -> RunResult:  # fmt: skip
    """Send ``requests`` through the policy with the given faults and Cilium's verdicts, and collect what happened."""
    with running(policy, tag, faults, seed, datapath, statuses) as (envoy, faults, _):
        return send_and_collect(envoy, policy, faults, requests, headers)


def send_and_collect(envoy: EnvoyProcess, policy: MeshService, faults: dict[str, Fault], requests: int,
                     headers: dict[str, str] | None = None) -> RunResult:  # fmt: skip
    """Send ``requests`` through a running Envoy, then read its retries and ejections."""
    versions, statuses, latencies, elapsed = send((LOOPBACK, envoy.port), requests, headers)
    counters = envoy.counters()
    retries = sum(v for k, v in counters.items() if k.startswith("cluster.") and k.endswith(".upstream_rq_retry"))
    ejections = sum(v for k, v in counters.items() if k.endswith(".outlier_detection.ejections_enforced_total"))
    return RunResult(policy, faults, requests, versions, statuses, retries, ejections, latencies, elapsed)

