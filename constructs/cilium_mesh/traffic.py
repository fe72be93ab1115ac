"""L7 traffic policy for one Kubernetes Service, rendered as a CiliumEnvoyConfig.

A policy splits requests across version Services by integer weight, pins
requests that carry a header to one version, retries, times out, and ejects
failing hosts. Everything it uses is built into cilium-envoy (no aggregate
cluster, no retry predicates or priorities: cilium/proxy leaves them out).

With ``failover`` on (the default), each weighted destination is one Envoy
cluster whose endpoints are the version Services' cluster DNS names (headless
Services, so DNS answers their pods' addresses, which carry the pods'
identities in Cilium's policy; a ClusterIP would be "world"), its own
version at priority 0 and the other versions at priorities 1, 2, ... When
outlier detection ejects the priority-0 host (a version down, answering
errors, or without endpoints), Envoy sends that destination's share to the
next priority. While every version is healthy the split is exactly the
configured one. Pinned requests go to the version's own Service endpoints
(Cilium's EDS cluster), never elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HTTP_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_RETRY_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
    }
)
# Envoy keeps weights and their sum in uint32 (RouteAction.WeightedCluster).
MAX_TOTAL_WEIGHT = 2**32 - 1
# Timeouts and intervals are protobuf Durations; a day is far beyond any sane value.
MAX_DURATION_MS = 86_400_000
CLUSTER_DOMAIN = "svc.cluster.local"

LISTENER_NAME = "listener"
ROUTE_NAME = "route"


class TrafficPolicyError(ValueError):
    """A traffic policy that Envoy or Cilium would reject, or that cannot work."""


def _type(name: str) -> str:
    return f"type.googleapis.com/{name}"


def duration(milliseconds: int) -> str:
    """A protobuf Duration in JSON form: whole seconds, or seconds with 3 decimals ("1.5s" is "1.500s")."""
    seconds, millis = divmod(milliseconds, 1000)
    return f"{seconds}s" if not millis else f"{seconds}.{millis:03d}s"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one request. With failover, a retry reaches another version once the failing one is ejected."""

    retry_on: tuple[str, ...] = ("5xx", "reset", "connect-failure", "refused-stream")
    num_retries: int = 3
    per_try_timeout_ms: int = 1000


@dataclass(frozen=True)
class OutlierDetection:
    """Passive health: hosts that keep failing are ejected for a while.

    consecutive_local_origin_failure: connection failures in a row (refused, reset) that eject a host.
    failure_percentage_threshold:     a host answering at least this share of errors within one
                                      ``interval`` is ejected (needs ``failure_percentage_request_volume``
                                      requests in that interval); None turns it off.
    max_ejection_percent:             100, so that a version with one Service address can be ejected.
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
class TrafficPolicy:
    """Traffic policy for ``service`` across its version Services ``<service><version>``.

    weights:             version -> integer weight, e.g. {"v1": 90, "v2": 10}; 0 drains a version.
    pin_header:          a request with ``<pin_header>: <version>`` goes to that version
                         only (no split, no failover); None turns header routes off.
    failover:            a weighted destination falls back to the other versions.
    failover_to_drained: versions with weight 0 also take failover traffic (default: drained
                         means no traffic at all, except pinned requests).
    request_timeout_ms:  the whole request, retries included.
    """

    weights: Mapping[str, int]
    service: str = "catalogdetail"
    namespace: str = "workshop"
    port: int = 3000
    pin_header: str | None = "x-catalog-version"
    failover: bool = True
    failover_to_drained: bool = False
    request_timeout_ms: int = 5000
    connect_timeout_ms: int = 2000
    dns_refresh_ms: int = 5000
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    split_local_origin_errors: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        self._validate()

    @classmethod
    def walkthrough(cls) -> TrafficPolicy:
        """The walkthrough's hand-written 50/50 policy, kept to compare against."""
        return cls(
            weights={"v1": 50, "v2": 50},
            pin_header=None,
            failover=False,
            request_timeout_ms=15000,
            retries=RetryPolicy(retry_on=("5xx",), num_retries=3, per_try_timeout_ms=1000),
            outlier_detection=OutlierDetection(
                consecutive_5xx=5,
                consecutive_local_origin_failure=2,
                failure_percentage_threshold=None,
                interval_ms=10000,
                base_ejection_time_ms=30000,
                max_ejection_percent=10,
            ),
        )

    def to_json(self) -> str:
        """Every setting as JSON, for the rollout Lambda (which renders the steps' CiliumEnvoyConfigs)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        settings["weights"] = dict(self.weights)
        for name in ("retries", "outlier_detection", "circuit_breakers"):
            settings[name] = dataclasses.asdict(settings[name])
        return json.dumps(settings, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrafficPolicy:
        settings = json.loads(text)
        retries = settings.pop("retries")
        outlier_detection = OutlierDetection(**settings.pop("outlier_detection"))
        circuit_breakers = CircuitBreakers(**settings.pop("circuit_breakers"))
        return cls(
            **settings,
            retries=RetryPolicy(**{**retries, "retry_on": tuple(retries["retry_on"])}),
            outlier_detection=outlier_detection,
            circuit_breakers=circuit_breakers,
        )

    def with_weights(self, weights: Mapping[str, int]) -> TrafficPolicy:
        return dataclasses.replace(self, weights=weights)

    @property
    def name(self) -> str:
        return f"{self.service}-traffic"

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self.weights)

    @property
    def weighted_versions(self) -> tuple[str, ...]:
        return tuple(v for v, w in self.weights.items() if w > 0)

    def version_service(self, version: str) -> str:
        return f"{self.service}{version}"

    def version_host(self, version: str) -> str:
        """The version Service's cluster DNS name: its pods' addresses, the Service being headless."""
        return f"{self.version_service(version)}.{self.namespace}.{CLUSTER_DOMAIN}"

    def eds_cluster(self, version: str) -> str:
        """The cluster Cilium fills with the endpoints of a backend Service (``namespace/name``)."""
        return f"{self.namespace}/{self.version_service(version)}"

    def failover_cluster(self, version: str) -> str:
        return f"{self.service}-{version}"

    def failover_order(self, version: str) -> list[str]:
        """Priorities of a weighted destination: its own version, then the others by weight
        (heaviest first), then name; drained versions only with ``failover_to_drained``."""
        candidates = self.versions if self.failover_to_drained else self.weighted_versions
        others = sorted((v for v in candidates if v != version), key=lambda v: (-self.weights[v], v))
        return [version, *others]

    def _validate(self) -> None:
        for label, value in (("service", self.service), ("namespace", self.namespace)):
            if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value) or len(value) > 63:
                raise TrafficPolicyError(f"{label} {value!r} is not a DNS-1123 label (a-z, 0-9, '-', at most 63)")
        if not self.weights:
            raise TrafficPolicyError("weights must name at least one version")
        for version, weight in self.weights.items():
            service = self.version_service(version) if isinstance(version, str) else None
            if service is None or not _DNS_LABEL.fullmatch(version) or len(service) > 63:
                raise TrafficPolicyError(
                    f"version {version!r} must make a DNS-1123 Service name '{self.service}<version>' (a-z, 0-9, '-')"
                )
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise TrafficPolicyError(f"weight of {version} must be a non-negative integer (got {weight!r})")
        total = sum(self.weights.values())
        if total <= 0:
            raise TrafficPolicyError("weights must have a positive sum (got all zero)")
        if total > MAX_TOTAL_WEIGHT:
            raise TrafficPolicyError(f"weights must sum to at most {MAX_TOTAL_WEIGHT} (Envoy's uint32; got {total})")
        if self.pin_header is not None and not _HTTP_HEADER.fullmatch(self.pin_header):
            raise TrafficPolicyError(f"pin_header {self.pin_header!r} must be a lower-case HTTP header name")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise TrafficPolicyError(f"port must be 1-65535 (got {self.port!r})")
        od = self.outlier_detection
        durations = {
            "request_timeout_ms": self.request_timeout_ms,
            "connect_timeout_ms": self.connect_timeout_ms,
            "dns_refresh_ms": self.dns_refresh_ms,
            "retries.per_try_timeout_ms": self.retries.per_try_timeout_ms,
            "outlier_detection.interval_ms": od.interval_ms,
            "outlier_detection.base_ejection_time_ms": od.base_ejection_time_ms,
        }
        cb = self.circuit_breakers
        limits = {
            "circuit_breakers.max_connections": cb.max_connections,
            "circuit_breakers.max_pending_requests": cb.max_pending_requests,
            "circuit_breakers.max_requests": cb.max_requests,
            "circuit_breakers.max_retries": cb.max_retries,
        }
        for label, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOTAL_WEIGHT:
                raise TrafficPolicyError(f"{label} must be an integer from 1 to {MAX_TOTAL_WEIGHT} (got {value!r})")
        counts = {
            "retries.num_retries": self.retries.num_retries,
            "outlier_detection.consecutive_5xx": od.consecutive_5xx,
            "outlier_detection.consecutive_local_origin_failure": od.consecutive_local_origin_failure,
            "outlier_detection.failure_percentage_request_volume": od.failure_percentage_request_volume,
        }
        for label, value in {**durations, **counts}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrafficPolicyError(f"{label} must be a positive integer (got {value!r})")
        for label, value in durations.items():
            if value > MAX_DURATION_MS:
                raise TrafficPolicyError(f"{label} must be at most {MAX_DURATION_MS} (a day; got {value})")
        for label, value in counts.items():
            if value > 1000:
                raise TrafficPolicyError(f"{label} must be at most 1000 (got {value})")
        percents = {"outlier_detection.max_ejection_percent": od.max_ejection_percent}
        if od.failure_percentage_threshold is not None:
            percents["outlier_detection.failure_percentage_threshold"] = od.failure_percentage_threshold
        for label, value in percents.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                raise TrafficPolicyError(f"{label} must be an integer from 1 to 100 (got {value!r})")
        unknown = sorted(set(self.retries.retry_on) - _RETRY_CONDITIONS)
        if unknown or not self.retries.retry_on:
            raise TrafficPolicyError(
                f"retries.retry_on {unknown or '[]'} not allowed; use some of {sorted(_RETRY_CONDITIONS)}"
            )

    def check_services(self, services: set[str]) -> None:
        """Every version must have its Service (``<service><version>``) among ``services``."""
        missing = [v for v in self.versions if self.version_service(v) not in services]
        if missing:
            raise TrafficPolicyError(
                f"no Service {', '.join(self.version_service(v) for v in missing)} in namespace "
                f"{self.namespace} for version {', '.join(missing)}; versions with a Service: "
                f"{', '.join(sorted(s[len(self.service):] for s in services if s.startswith(self.service) and s != self.service)) or 'none'}"
            )

    def _route_action(self, **destination) -> dict:
        return {
            **destination,
            "timeout": duration(self.request_timeout_ms),
            "retry_policy": {
                "retry_on": ",".join(self.retries.retry_on),
                "num_retries": self.retries.num_retries,
                "per_try_timeout": duration(self.retries.per_try_timeout_ms),
            },
        }

    def _weighted_destination(self, version: str) -> str:
        return self.failover_cluster(version) if self.failover else self.eds_cluster(version)

    def route_configuration(self) -> dict:
        routes = []
        if self.pin_header:
            for version in self.versions:
                routes.append(
                    {
                        "name": f"pin-{version}",
                        "match": {
                            "prefix": "/",
                            "headers": [{"name": self.pin_header, "string_match": {"exact": version}}],
                        },
                        "route": self._route_action(cluster=self.eds_cluster(version)),
                    }
                )
        split = [{"name": self._weighted_destination(v), "weight": self.weights[v]} for v in self.weighted_versions]
        routes.append(
            {
                "name": "split",
                "match": {"prefix": "/"},
                "route": self._route_action(weighted_clusters={"clusters": split}),
            }
        )
        return {
            "@type": _type("envoy.config.route.v3.RouteConfiguration"),
            "name": ROUTE_NAME,
            "virtual_hosts": [{"name": self.service, "domains": ["*"], "routes": routes}],
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
                                "stat_prefix": self.name,
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
                                        "socket_address": {"address": self.version_host(member), "port_value": self.port}
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
        if self.failover:
            resources += [self._failover_cluster_resource(v) for v in self.weighted_versions]
        return resources

    def cilium_envoy_config(self) -> dict:
        return {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEnvoyConfig",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "cilium-mesh-eks"},
            },
            "spec": {
                "services": [{"name": self.service, "namespace": self.namespace, "listener": LISTENER_NAME}],
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
