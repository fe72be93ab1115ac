"""A Service in the mesh: its declaration (one model for cdk.json's ``services`` and for Python), and
the CiliumEnvoyConfig, version Services and network policy rendered from it.

Standard library only: the rollout Lambda renders each step's CiliumEnvoyConfig with this file.
Types of a declaration from cdk.json are checked by cilium_mesh.declaration (pydantic); what this
file checks, on both ways in, is everything else, one line per mistake naming its path, e.g.
``services[payments].routes[1].to: version v3 is not declared``.

A service's requests go, in order: to the version its pin header names; to the first declared route
that matches (one version, or the split); else to the split by integer weight. Everything used is
built into cilium-envoy (no aggregate cluster, no retry predicates or priorities, no fault filter:
cilium/proxy leaves them out).

With ``failover`` on (the default), each weighted destination is one Envoy cluster whose endpoints
are the version Services' cluster DNS names (headless Services, so DNS answers their pods'
addresses, which carry the pods' identities in Cilium's policy; a ClusterIP would be "world"), its
own version at priority 0 and the other versions at priorities 1, 2, ... When outlier detection
ejects the priority-0 host (a version down, answering errors, or without endpoints), Envoy sends
that destination's share to the next priority. While every version is healthy the split is exactly
the configured one. Pinned and routed requests go to the version's own Service endpoints (Cilium's
EDS cluster), never elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

if __package__:
    from .rollout_plan import HTTP_HEADER_NAME, RolloutSettings
else:  # in the rollout Lambda, where this file is the top-level module traffic
    from rollout_plan import HTTP_HEADER_NAME, RolloutSettings

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes label keys (an optional DNS prefix and '/') and values.
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_PATH = re.compile(r"^/[\x21-\x7e]*$")
RETRY_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "http3-post-connect-failure",
    }
)
HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "POST", "PATCH", "CONNECT")
# RFC 9110 9.2.2: a request of these methods may be repeated with the same effect.
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
# Envoy keeps weights and their sum in uint32 (RouteAction.WeightedCluster).
MAX_TOTAL_WEIGHT = 2**32 - 1
# Timeouts and intervals are protobuf Durations; a day is far beyond any sane value.
MAX_DURATION_MS = 86_400_000
CLUSTER_DOMAIN = "svc.cluster.local"
# The response header that says which version a request was routed to (the smoke test reads it).
DESTINATION_HEADER = "x-cilium-mesh-destination"
# The header the rollout's synthetic load carries; its requests are counted apart (a virtual cluster).
LOAD_HEADER = "x-cilium-mesh-load"
MANAGED_BY = {"app.kubernetes.io/managed-by": "cilium-mesh-eks"}
# The namespace of the mesh's own workloads: the smoke test and the rollouts' load.
MESH_NAMESPACE = "cilium-mesh"
SMOKE_TEST_LABELS = {"app": "smoke-test"}
OUTSIDER_LABELS = {"app": "smoke-test-outsider"}

LISTENER_NAME = "listener"
ROUTE_NAME = "route"


class DeclarationError(ValueError):
    """A declaration Envoy or Cilium would reject, or that cannot work: one line, its path first."""


def _type(name: str) -> str:
    return f"type.googleapis.com/{name}"


def duration(milliseconds: int) -> str:
    """A protobuf Duration in JSON form: whole seconds, or seconds with 3 decimals ("1.5s" is "1.500s")."""
    seconds, millis = divmod(milliseconds, 1000)
    return f"{seconds}s" if not millis else f"{seconds}.{millis:03d}s"


def _whole(value, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def _frozen(mapping) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Retries:
    """Retries of one request. With failover, a retry reaches another version once the failing one is ejected.

    attempts:           retries after the first try (Istio's ``attempts``); default 3.
    per_try_timeout_ms: each try's own timeout; default 1000.
    conditions:         Envoy's retry_on conditions; default 5xx, reset, connect-failure, refused-stream.
    methods:            the methods retried; default the idempotent ones (RFC 9110): GET, HEAD, OPTIONS,
                        TRACE, PUT, DELETE. POST, PATCH or CONNECT need ``non_idempotent: true``.
    non_idempotent:     the opt-in to retry methods that are not idempotent; default false.
    """

    attempts: int = 3
    per_try_timeout_ms: int = 1000
    conditions: tuple[str, ...] = ("5xx", "reset", "connect-failure", "refused-stream")
    methods: tuple[str, ...] = IDEMPOTENT_METHODS
    non_idempotent: bool = False


@dataclass(frozen=True)
class OutlierDetection:
    """Passive health: hosts that keep failing are ejected for a while.

    consecutive_5xx:                  5xx answers in a row that eject a host; default 5.
    consecutive_local_origin_failure: connection failures in a row (refused, reset) that eject a host; default 2.
    failure_percentage_threshold:     a host answering at least this share of errors within one
                                      ``interval`` is ejected (needs ``failure_percentage_request_volume``
                                      requests in that interval); default 20, null turns it off.
    max_ejection_percent:             default 100, so that a version with one Service address can be ejected.
    """

    consecutive_5xx: int = 5
    consecutive_local_origin_failure: int = 2
    failure_percentage_threshold: int | None = 20
    failure_percentage_request_volume: int = 20
    interval_ms: int = 1000
    base_ejection_time_ms: int = 30000
    max_ejection_percent: int = 100


@dataclass(frozen=True)
class CircuitBreakers:
    """Limits of each cluster, set explicitly: Cilium fills its own into clusters that set none, and
    which ones depends on its version (1.18: max_retries only; 1.19: connections and requests too;
    1.20: pending requests too; cec_resource_parser.go fillInCircuitBreakers), while upstream Envoy's
    defaults are 3 retries and 1024 of the rest. These are Cilium's values: the same behaviour on every
    supported Cilium, and in the preview's Envoy."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 128


@dataclass(frozen=True)
class Route:
    """One ordered rule: requests that match every given condition go ``to`` one version, or to the split.

    path_prefix / path: the path starts with, or is exactly, this (at most one of the two; default any path).
    headers:            header name -> exact value, all of them present (default none).
    methods:            any of these methods (default any).
    to:                 a declared version, or "split" (default).
    """

    path_prefix: str | None = None
    path: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    to: str = "split"

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", _frozen(self.headers))
        object.__setattr__(self, "methods", tuple(self.methods))


@dataclass(frozen=True)
class Mirror:
    """A copy of ``percent`` of the split's and routes' requests (not the pinned ones) to ``version``; its
    answers are dropped (Envoy's router, request_mirror_policies)."""

    version: str
    percent: float


@dataclass(frozen=True)
class HttpRule:
    """Under datapath eni, what a caller may ask (Cilium's L7 rule): a method and a path (a regular expression)."""

    method: str
    path: str


@dataclass(frozen=True)
class Caller:
    """Workloads the mesh admits to the service.

    labels:    their pods' labels (all of them).
    namespace: theirs; default the service's.
    http:      under datapath eni, the requests they may make (default: any request on the port).
    """

    labels: Mapping[str, str]
    namespace: str | None = None
    http: tuple[HttpRule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "http", tuple(self.http))


@dataclass(frozen=True)
class MeshService:
    """One Service of the mesh, across its version Services ``<name><version>`` (docs/services.md).

    name, namespace:      the Service the callers already use (DNS labels).
    port:                 its port.
    versions:             version -> the labels of that version's pods; the stack makes a headless
                          Service ``<name><version>`` selecting each.
    target_port:          the pods' port; default ``port``.
    weights:              version -> integer weight; default an even split; a version left out has 0
                          (drained: only pinned and routed requests reach it).
    pin_header:           a request with ``<pin_header>: <version>`` goes to that version only; default none.
    routes:               ordered rules before the split (Route).
    mirror:               a share of the requests copied to a version (Mirror); default none.
    timeout_ms:           the whole request, retries included; default 5000.
    connect_timeout_ms:   each connection to a pod; default 2000.
    dns_refresh_ms:       how often the failover clusters resolve the version Services; default 5000.
    retries:              Retries; default 3 retries of idempotent methods.
    outlier_detection:    OutlierDetection; circuit_breakers: CircuitBreakers.
    failover:             true (default): a weighted destination falls back to the other weighted
                          versions, heaviest first; a list: that priority order; false: no failover.
    failover_to_drained:  versions with weight 0 also take failover traffic (default false).
    callers:              the workloads admitted (Caller); default null: the mesh applies no policy to
                          the service's pods. Probes, the smoke test and the rollout's load are admitted too.
    namespace_default_deny: the mesh denies everything else in and out of the service's namespace (default false).
    check_path:           what the smoke test and the load ask for (GET); default "/".
    split_local_origin_errors: outlier detection counts connection failures apart from 5xx; default true.
    rollout:              how changed weights roll out (RolloutSettings); default null: at once.
    """

    name: str
    namespace: str
    port: int
    versions: Mapping[str, Mapping[str, str]]
    weights: Mapping[str, int] | None = None
    target_port: int | None = None
    pin_header: str | None = None
    routes: tuple[Route, ...] = ()
    mirror: Mirror | None = None
    timeout_ms: int = 5000
    connect_timeout_ms: int = 2000
    dns_refresh_ms: int = 5000
    retries: Retries = field(default_factory=Retries)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    failover: bool | tuple[str, ...] = True
    failover_to_drained: bool = False
    callers: tuple[Caller, ...] | None = None
    namespace_default_deny: bool = False
    check_path: str = "/"
    split_local_origin_errors: bool = True
    rollout: RolloutSettings | None = None

    def __post_init__(self) -> None:
        versions = {v: _frozen(labels) for v, labels in dict(self.versions or {}).items()}
        object.__setattr__(self, "versions", MappingProxyType(versions))
        weights = dict(self.weights) if self.weights is not None else dict.fromkeys(versions, 1)
        for version in versions:
            weights.setdefault(version, 0)
        object.__setattr__(self, "weights", MappingProxyType(weights))
        object.__setattr__(self, "routes", tuple(self.routes))
        if self.callers is not None:
            object.__setattr__(self, "callers", tuple(self.callers))
        if isinstance(self.failover, list):
            object.__setattr__(self, "failover", tuple(self.failover))
        object.__setattr__(self, "retries", dataclasses.replace(
            self.retries, conditions=tuple(self.retries.conditions), methods=tuple(self.retries.methods)))  # fmt: skip
        self._validate()

    # --- JSON for the rollout Lambda -----------------------------------------------------------

    def to_json(self) -> str:
        """Every setting but the rollout's (its own property) as JSON, for the rollout Lambda."""
        settings = _plain(self)
        settings.pop("rollout")
        return json.dumps(settings, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MeshService:
        s = json.loads(text)
        return cls(
            **{k: v for k, v in s.items() if k not in ("routes", "mirror", "retries", "outlier_detection", "circuit_breakers", "callers", "failover")},
            failover=tuple(s["failover"]) if isinstance(s["failover"], list) else s["failover"],
            routes=tuple(Route(**r) for r in s["routes"]),
            mirror=Mirror(**s["mirror"]) if s["mirror"] else None,
            retries=Retries(**s["retries"]),
            outlier_detection=OutlierDetection(**s["outlier_detection"]),
            circuit_breakers=CircuitBreakers(**s["circuit_breakers"]),
            callers=None if s["callers"] is None else tuple(
                Caller(labels=c["labels"], namespace=c["namespace"], http=tuple(HttpRule(**h) for h in c["http"])) for c in s["callers"]),
        )  # fmt: skip

    def with_weights(self, weights: Mapping[str, int]) -> MeshService:
        return dataclasses.replace(self, weights=weights)

    # --- Names ---------------------------------------------------------------------------------

    @property
    def key(self) -> str:
        """``namespace/name``: how the tools and the rules name a service."""
        return f"{self.namespace}/{self.name}"

    @property
    def cec_name(self) -> str:
        return f"{self.name}-traffic"

    @property
    def pod_port(self) -> int:
        return self.port if self.target_port is None else self.target_port

    @property
    def weighted_versions(self) -> tuple[str, ...]:
        return tuple(v for v, w in self.weights.items() if w > 0)

    def version_service(self, version: str) -> str:
        return f"{self.name}{version}"

    def version_host(self, version: str) -> str:
        """The version Service's cluster DNS name: its pods' addresses, the Service being headless."""
        return f"{self.version_service(version)}.{self.namespace}.{CLUSTER_DOMAIN}"

    def eds_cluster(self, version: str) -> str:
        """The cluster Cilium fills with the endpoints of a backend Service (``namespace/name``)."""
        return f"{self.namespace}/{self.version_service(version)}"

    def failover_cluster(self, version: str) -> str:
        return f"{self.name}-{version}"

    def failover_order(self, version: str) -> list[str]:
        """Priorities of a weighted destination: its own version, then the declared order (or the other
        versions by weight, heaviest first, then name); drained versions only with ``failover_to_drained``."""
        candidates = self.versions if self.failover_to_drained else self.weighted_versions
        if isinstance(self.failover, tuple):
            others = [v for v in self.failover if v != version and v in candidates]
        else:
            others = sorted((v for v in candidates if v != version), key=lambda v: (-self.weights[v], v))
        return [version, *others]

    # --- Checks ----------------------------------------------------------------------------------

    def _fail(self, path: str, message: str):
        raise DeclarationError(f"services[{self.name}].{path}: {message}")

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not _DNS_LABEL.fullmatch(self.name) or len(self.name) > 63:
            raise DeclarationError(f"services[{self.name!r}].name: {self.name!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
        if not isinstance(self.namespace, str) or not _DNS_LABEL.fullmatch(self.namespace) or len(self.namespace) > 63:
            self._fail("namespace", f"{self.namespace!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
        for label, value in (("port", self.port), ("target_port", self.pod_port)):
            if not _whole(value, 1, 65535):
                self._fail(label, f"must be 1-65535 (got {value!r})")
        if not self.versions:
            self._fail("versions", "declare at least one version and its pods' labels")
        for version, labels in self.versions.items():
            service = self.version_service(version) if isinstance(version, str) else ""
            if not _DNS_LABEL.fullmatch(version or "") or len(service) > 63:
                self._fail(f"versions.{version}", f"must make a DNS label Service name '{self.name}<version>' (a-z, 0-9, '-', at most 63)")
            if not labels:
                self._fail(f"versions.{version}", "needs its pods' labels")
            self._check_labels(f"versions.{version}", labels)
        names = list(self.versions)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                x, y = self.versions[a], self.versions[b]
                if all(x[k] == y[k] for k in x.keys() & y.keys()):
                    self._fail(f"versions.{b}", f"labels {dict(y)} and version {a}'s {dict(x)} can select the same pod;"
                                                " give each version a label the others set differently")  # fmt: skip
        for version, weight in self.weights.items():
            if version not in self.versions:
                self._fail(f"weights.{version}", f"version {version} is not declared (versions: {', '.join(names)})")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                self._fail(f"weights.{version}", f"must be a non-negative integer (got {weight!r})")
        total = sum(self.weights.values())
        if total <= 0:
            self._fail("weights", "must have a positive sum (got all zero)")
        if total > MAX_TOTAL_WEIGHT:
            self._fail("weights", f"must sum to at most {MAX_TOTAL_WEIGHT} (Envoy's uint32; got {total})")
        if self.pin_header is not None:
            self._check_header("pin_header", self.pin_header)
        for i, route in enumerate(self.routes):
            self._check_route(f"routes[{i}]", route)
        if self.mirror is not None:
            self._check_version("mirror.version", self.mirror.version)
            p = self.mirror.percent
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100 or round(p * 10000) != p * 10000:
                self._fail("mirror.percent", f"must be above 0 and at most 100, in steps of 0.0001 (got {p!r})")
        if isinstance(self.failover, tuple):
            for i, version in enumerate(self.failover):
                self._check_version(f"failover[{i}]", version)
            if len(set(self.failover)) != len(self.failover):
                self._fail("failover", "names a version twice")
        elif not isinstance(self.failover, bool):
            self._fail("failover", f"must be true, false or a list of versions (got {self.failover!r})")
        self._check_resilience()
        if self.rollout is not None and self.failover is False:
            self._fail("rollout", "needs failover (not false): the gate reads each version's per-endpoint stats of the failover"
                                  " clusters, which a split over EDS clusters does not record")  # fmt: skip
        if self.callers is not None:
            for i, caller in enumerate(self.callers):
                self._check_caller(f"callers[{i}]", caller)
        if not isinstance(self.check_path, str) or not _PATH.fullmatch(self.check_path):
            self._fail("check_path", f"{self.check_path!r} must be a path starting with '/'")

    def _check_version(self, path: str, version) -> None:
        if version not in self.versions:
            self._fail(path, f"version {version} is not declared (versions: {', '.join(self.versions)})")

    def _check_header(self, path: str, name) -> None:
        if not isinstance(name, str) or not HTTP_HEADER_NAME.fullmatch(name):
            self._fail(path, f"{name!r} is not an HTTP header name in lower case (an RFC 9110 token)")

    def _check_labels(self, path: str, labels: Mapping) -> None:
        for key, value in labels.items():
            if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
                self._fail(f"{path}.{key}", "is not a Kubernetes label key")
            if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
                self._fail(f"{path}.{key}", f"{value!r} is not a Kubernetes label value")

    def _check_methods(self, path: str, methods) -> None:
        for method in methods:
            if method not in HTTP_METHODS:
                self._fail(path, f"{method!r} is not one of {', '.join(HTTP_METHODS)}")

    def _check_route(self, path: str, route: Route) -> None:
        if route.to != "split":
            self._check_version(f"{path}.to", route.to)
        if route.path_prefix is not None and route.path is not None:
            self._fail(path, "give path_prefix or path, not both")
        for key in ("path_prefix", "path"):
            value = getattr(route, key)
            if value is not None and (not isinstance(value, str) or not _PATH.fullmatch(value)):
                self._fail(f"{path}.{key}", f"{value!r} must start with '/' (visible ASCII only)")
        for name, value in route.headers.items():
            self._check_header(f"{path}.headers", name)
            if name == self.pin_header:
                self._fail(f"{path}.headers.{name}", "is the pin header (pin_header), whose routes come first: this route would never see it")
            if name.startswith(":"):
                self._fail(f"{path}.headers.{name}", "pseudo-headers are not matched; use path or methods")
            if not isinstance(value, str):
                self._fail(f"{path}.headers.{name}", f"must be a string (got {value!r})")
        self._check_methods(f"{path}.methods", route.methods)
        if route.path_prefix is None and route.path is None and not route.headers and not route.methods:
            self._fail(path, "matches every request, so the split and every later route are never reached; give it a condition")

    def _check_caller(self, path: str, caller: Caller) -> None:
        if not caller.labels:
            self._fail(f"{path}.labels", "name the callers' pods by at least one label")
        self._check_labels(f"{path}.labels", caller.labels)
        if caller.namespace is not None and (not isinstance(caller.namespace, str) or not _DNS_LABEL.fullmatch(caller.namespace)):
            self._fail(f"{path}.namespace", f"{caller.namespace!r} is not a DNS label")
        for j, rule in enumerate(caller.http):
            self._check_methods(f"{path}.http[{j}].method", (rule.method,))
            if not isinstance(rule.path, str) or not rule.path.startswith("/"):
                self._fail(f"{path}.http[{j}].path", f"{rule.path!r} must start with '/'")

    def _check_resilience(self) -> None:
        od, cb, retries = self.outlier_detection, self.circuit_breakers, self.retries
        durations = {
            "timeout_ms": self.timeout_ms,
            "connect_timeout_ms": self.connect_timeout_ms,
            "dns_refresh_ms": self.dns_refresh_ms,
            "retries.per_try_timeout_ms": retries.per_try_timeout_ms,
            "outlier_detection.interval_ms": od.interval_ms,
            "outlier_detection.base_ejection_time_ms": od.base_ejection_time_ms,
        }
        counts = {
            "retries.attempts": retries.attempts,
            "outlier_detection.consecutive_5xx": od.consecutive_5xx,
            "outlier_detection.consecutive_local_origin_failure": od.consecutive_local_origin_failure,
            "outlier_detection.failure_percentage_request_volume": od.failure_percentage_request_volume,
        }
        for label, value in {**durations, **counts}.items():
            if not _whole(value, 1, MAX_DURATION_MS if label in durations else 1000):
                self._fail(label, f"must be a whole number from 1 to {MAX_DURATION_MS if label in durations else 1000} (got {value!r})")
        for name in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            value = getattr(cb, name)
            if not _whole(value, 1, MAX_TOTAL_WEIGHT):
                self._fail(f"circuit_breakers.{name}", f"must be a whole number from 1 to {MAX_TOTAL_WEIGHT} (got {value!r})")
        percents = {"outlier_detection.max_ejection_percent": od.max_ejection_percent}
        if od.failure_percentage_threshold is not None:
            percents["outlier_detection.failure_percentage_threshold"] = od.failure_percentage_threshold
        for label, value in percents.items():
            if not _whole(value, 1, 100):
                self._fail(label, f"must be a whole number from 1 to 100 (got {value!r})")
        unknown = sorted(set(retries.conditions) - RETRY_CONDITIONS)
        if unknown or not retries.conditions:
            self._fail("retries.conditions", f"{unknown or '[]'} not allowed; use some of {', '.join(sorted(RETRY_CONDITIONS))}")
        self._check_methods("retries.methods", retries.methods)
        risky = [m for m in retries.methods if m not in IDEMPOTENT_METHODS]
        if risky and not retries.non_idempotent:
            self._fail("retries.methods", f"{', '.join(risky)} are not idempotent: a retry may repeat their effect;"
                                          " set retries.non_idempotent true to retry them anyway")  # fmt: skip

    def check_services(self, services: set[str]) -> None:
        """Every version must have its Service (``<name><version>``) among ``services`` (hand-written ones)."""
        missing = [v for v in self.versions if self.version_service(v) not in services]
        if missing:
            self._fail(
                "versions",
                f"no Service {', '.join(self.version_service(v) for v in missing)} in namespace {self.namespace}",
            )

    # --- Kubernetes objects ----------------------------------------------------------------------

    def version_services(self) -> list[dict]:
        """The headless Service of each version: DNS answers its pods' own addresses (see the module's docstring)."""
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": self.version_service(v), "namespace": self.namespace,
                             "labels": {**MANAGED_BY, "cilium-mesh.eks/service": self.name, "cilium-mesh.eks/version": v}},
                "spec": {"clusterIP": "None", "selector": dict(labels),
                         "ports": [{"name": "http", "port": self.port, "targetPort": self.pod_port}]},
            }  # fmt: skip
            for v, labels in self.versions.items()
        ]

    # --- Envoy -----------------------------------------------------------------------------------

    def _retry_policy(self) -> dict:
        return {
            "retry_on": ",".join(self.retries.conditions),
            "num_retries": self.retries.attempts,
            "per_try_timeout": duration(self.retries.per_try_timeout_ms),
        }

    def _weighted_destination(self, version: str) -> str:
        return self.failover_cluster(version) if self.failover is not False else self.eds_cluster(version)

    def _destination(self, to: str) -> dict:
        """The route action's destination: one version's EDS cluster, or the weighted split."""
        if to != "split":
            return {"cluster": self.eds_cluster(to)}
        split = [{"name": self._weighted_destination(v), "weight": self.weights[v],
                  "response_headers_to_add": [_header(DESTINATION_HEADER, v)]} for v in self.weighted_versions]  # fmt: skip
        return {"weighted_clusters": {"clusters": split}}

    def _routes(self, name: str, match: dict, to: str, methods: tuple[str, ...], mirrored: bool) -> list[dict]:
        """One rule as Envoy routes: with retries only for the methods retried, each method its own route
        (an exact :method match), then the rule's other methods without retries."""
        action = {**self._destination(to), "timeout": duration(self.timeout_ms)}
        if mirrored and self.mirror is not None:
            action["request_mirror_policies"] = [{
                "cluster": self.eds_cluster(self.mirror.version),
                "runtime_fraction": {"default_value": {"numerator": round(self.mirror.percent * 10000), "denominator": "MILLION"}},
            }]  # fmt: skip
        extra = {} if to == "split" else {"response_headers_to_add": [_header(DESTINATION_HEADER, to)]}
        if not methods and set(self.retries.methods) >= set(HTTP_METHODS):  # every method retried: one route
            return [{"name": name, "match": match, "route": {**action, "retry_policy": self._retry_policy()}, **extra}]
        retried = [m for m in self.retries.methods if not methods or m in methods]
        routes = []
        for method in retried:
            routes.append({"name": f"{name}-retried-{method.lower()}", "match": _with_method(match, method),
                           "route": {**action, "retry_policy": self._retry_policy()}, **extra})  # fmt: skip
        remaining = [m for m in methods if m not in retried]
        if not methods:
            routes.append({"name": name, "match": match, "route": action, **extra})
        for method in remaining:
            routes.append({"name": f"{name}-{method.lower()}", "match": _with_method(match, method), "route": action, **extra})
        return routes

    def route_configuration(self) -> dict:
        routes = []
        if self.pin_header:
            for version in self.versions:
                match = {"prefix": "/", "headers": [{"name": self.pin_header, "string_match": {"exact": version}}]}
                routes += self._routes(f"pin-{version}", match, version, (), mirrored=False)
        for i, rule in enumerate(self.routes):
            match = {"path": rule.path} if rule.path is not None else {"prefix": rule.path_prefix or "/"}
            if rule.headers:
                match["headers"] = [{"name": k, "string_match": {"exact": v}} for k, v in rule.headers.items()]
            routes += self._routes(f"route-{i}", match, rule.to, rule.methods, mirrored=True)
        routes += self._routes("split", {"prefix": "/"}, "split", (), mirrored=True)
        # A rollout's synthetic requests, counted apart (Envoy's vhost.<name>.vcluster.load.upstream_rq_*).
        load = {"name": "load", "headers": [{"name": LOAD_HEADER, "present_match": True}]}
        virtual_host = {"name": self.name, "domains": ["*"], "routes": routes, "virtual_clusters": [load]}
        return {
            "@type": _type("envoy.config.route.v3.RouteConfiguration"),
            "name": ROUTE_NAME,
            "virtual_hosts": [virtual_host],
        }

    def listener(self) -> dict:
        return {
            "@type": _type("envoy.config.listener.v3.Listener"),
            "name": LISTENER_NAME,
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": _type(
                                    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
                                ),
                                # Its namespace too: one node's Envoy serves same-named services of two namespaces.
                                "stat_prefix": f"{self.namespace}/{self.cec_name}",
                                "rds": {"route_config_name": ROUTE_NAME},
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {"@type": _type("envoy.extensions.filters.http.router.v3.Router")},
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        }

    def _outlier_detection(self) -> dict:
        od = self.outlier_detection
        detection = {
            "consecutive_5xx": od.consecutive_5xx,
            "split_external_local_origin_errors": self.split_local_origin_errors,
            "consecutive_local_origin_failure": od.consecutive_local_origin_failure,
            "interval": duration(od.interval_ms),
            "base_ejection_time": duration(od.base_ejection_time_ms),
            "max_ejection_percent": od.max_ejection_percent,
        }
        if od.failure_percentage_threshold is not None:
            detection.update(
                {
                    "failure_percentage_threshold": od.failure_percentage_threshold,
                    "enforcing_failure_percentage": 100,
                    "enforcing_failure_percentage_local_origin": 100,
                    "failure_percentage_minimum_hosts": 1,
                    "failure_percentage_request_volume": od.failure_percentage_request_volume,
                }
            )
        return detection

    def _circuit_breakers(self) -> dict:
        cb = self.circuit_breakers
        return {
            "thresholds": [
                {
                    "max_connections": cb.max_connections,
                    "max_pending_requests": cb.max_pending_requests,
                    "max_requests": cb.max_requests,
                    "max_retries": cb.max_retries,
                }
            ]
        }

    def _eds_cluster_resource(self, version: str) -> dict:
        return {
            "@type": _type("envoy.config.cluster.v3.Cluster"),
            "name": self.eds_cluster(version),
            "type": "EDS",
            "connect_timeout": duration(self.connect_timeout_ms),
            "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": self._circuit_breakers(),
            "outlier_detection": self._outlier_detection(),
        }

    def _failover_cluster_resource(self, version: str) -> dict:
        """One cluster per weighted destination: the version Services by DNS name, one priority each."""
        return {
            "@type": _type("envoy.config.cluster.v3.Cluster"),
            "name": self.failover_cluster(version),
            "type": "STRICT_DNS",
            "dns_lookup_family": "V4_ONLY",
            "dns_refresh_rate": duration(self.dns_refresh_ms),
            "connect_timeout": duration(self.connect_timeout_ms),
            "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": self._circuit_breakers(),
            "outlier_detection": self._outlier_detection(),
            # Stats per endpoint, labelled with its hostname (the version Service's name): which
            # version served a destination's requests, so failover and the split as served are
            # metrics (manifests/metrics/prometheus/rules.yaml). Envoy has no per-priority stat.
            "track_cluster_stats": {"per_endpoint_stats": True},
            "load_assignment": {
                "cluster_name": self.failover_cluster(version),
                "endpoints": [
                    {
                        "priority": priority,
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": self.version_host(member), "port_value": self.pod_port}
                                    }
                                }
                            }
                        ],
                    }
                    for priority, member in enumerate(self.failover_order(version))
                ],
            },
        }

    def envoy_resources(self) -> list[dict]:
        """The Envoy resources as written in the CiliumEnvoyConfig (before Cilium qualifies names)."""
        resources = [self.listener(), self.route_configuration()]
        resources += [self._eds_cluster_resource(v) for v in self.versions]
        if self.failover is not False:
            resources += [self._failover_cluster_resource(v) for v in self.weighted_versions]
        return resources

    def cilium_envoy_config(self) -> dict:
        return {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEnvoyConfig",
            "metadata": {
                "name": self.cec_name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "cilium-mesh-eks"},
            },
            "spec": {
                "services": [{"name": self.name, "namespace": self.namespace, "listener": LISTENER_NAME}],
                "backendServices": [
                    {"name": self.version_service(v), "namespace": self.namespace} for v in self.versions
                ],
                "resources": self.envoy_resources(),
            },
        }


def qualified_name(namespace: str, cec_name: str, name: str, force_namespace: bool = False) -> str:
    """Cilium's ResourceQualifiedName (pkg/policy/api, 1.18-1.20).

    A name without '/' becomes 'namespace/cec/name'. With force_namespace, a name
    with '/' is prefixed too unless its first part is the namespace.
    """
    if not name:
        return name
    slash = name.find("/")
    if slash >= 0 and (not force_namespace or name[:slash] == namespace):
        return name
    return f"{namespace}/{cec_name}/{name}"


def qualify_like_cilium(resources: list[dict], namespace: str, cec_name: str) -> list[dict]:
    """The resource names Envoy sees after Cilium parses a CiliumEnvoyConfig.

    Mirrors pkg/ciliumenvoyconfig/cec_resource_parser.go for the fields this
    project uses: listener, route configuration and virtual host names
    (forced), RDS and route cluster references, cluster names and their
    load assignment's cluster name. Socket addresses (the version Services'
    DNS names) are left as they are, as Cilium leaves them.
    """
    def q(name: str, force: bool = False) -> str:
        return qualified_name(namespace, cec_name, name, force)

    out = copy.deepcopy(resources)
    for res in out:
        kind = res["@type"].rsplit(".", 1)[-1]
        if kind == "Listener":
            res["name"] = q(res["name"], force=True)
            for chain in res.get("filter_chains", []):
                for flt in chain.get("filters", []):
                    rds = flt.get("typed_config", {}).get("rds")
                    if rds and rds.get("route_config_name"):
                        rds["route_config_name"] = q(rds["route_config_name"], force=True)
        elif kind == "RouteConfiguration":
            res["name"] = q(res["name"], force=True)
            for vhost in res.get("virtual_hosts", []):
                vhost["name"] = q(vhost["name"], force=True)
                for route in vhost.get("routes", []):
                    action = route.get("route", {})
                    if "cluster" in action:
                        action["cluster"] = q(action["cluster"])
                    for wc in action.get("weighted_clusters", {}).get("clusters", []):
                        wc["name"] = q(wc["name"])
        elif kind == "Cluster":
            res["name"] = q(res["name"])
            if "load_assignment" in res:
                res["load_assignment"]["cluster_name"] = q(res["load_assignment"]["cluster_name"])
    return out


def cluster_references(resources: list[dict]) -> set[str]:
    """Every cluster name that routes point at."""
    refs: set[str] = set()
    for res in resources:
        for vhost in res.get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                action = route.get("route", {})
                if "cluster" in action:
                    refs.add(action["cluster"])
                refs.update(wc["name"] for wc in action.get("weighted_clusters", {}).get("clusters", []))
    return refs


def _header(name: str, value: str) -> dict:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _with_method(match: dict, method: str) -> dict:
    return {**match, "headers": [*match.get("headers", []), {"name": ":method", "string_match": {"exact": method}}]}


def _plain(value):
    """A declaration as JSON-ready values: dataclasses and mappings as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init and f.repr}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value

