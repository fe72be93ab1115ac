"""A canary rollout of new traffic weights: its settings, its steps, and its gate.

Standard library only: the stack's configuration checks the settings with it, and the rollout
Lambda (rollout_lambda.py, packaged with this file and traffic.py) plans and judges with it.

A rollout moves the split from the deployed weights to the new ones in steps, each a percentage of
the change (10 -> 50 -> 100 by default). After each step but the last it waits ``pause_s``, then
asks Amazon Managed Service for Prometheus about every version that gains weight, from the
recording rules of manifests/metrics/prometheus/service-rules.yaml, each series with the service's
namespace and service labels:

  mesh_service:errors:ratio2m{version}         the share of its attempts that failed: at most max_error_ratio;
  mesh_service:latency_ms:p99_2m{destination}  p99 of the requests routed to it: at most max_p99_ms;
  mesh_service:ejections_active{destination}   Envoy ejected its hosts: none;
  mesh_service:attempts:rate2m{version}        requests it was asked per second: at least min_request_rate.

A breach stops the rollout at once (the previous weights are applied again, and the deploy fails);
a step passes once its pause is over with enough traffic and no breach; a step that has not had
enough traffic after VOLUME_WAIT_FACTOR pauses fails too (no evidence, no promotion).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field

# The rollout runs inside one custom resource: CloudFormation waits at most an hour for it
# (AWS::CloudFormation::CustomResource ServiceTimeout, 1-3600 s), and so does the Provider
# framework's waiter (total timeout). The gate is polled every QUERY_INTERVAL_S.
SERVICE_TIMEOUT_S = 3600
QUERY_INTERVAL_S = 30
# The Lambda's calls: the kubectl handler's get polls every 10 s until the field has a value (the
# annotation is always there); one invocation of that handler is update-kubeconfig plus one kubectl
# command; one AMP query.
GET_TIMEOUT_S = 30
INVOKE_READ_TIMEOUT_S = 120
INVOKE_ATTEMPTS = 2
QUERY_TIMEOUT_S = 10
# What a rollout may use of the hour: the rest is margin for applying steps and the framework.
MAX_ROLLOUT_S = 3000
# How long after its longest run a rollout waits out a failing kubectl provider before it stops (the
# waiter's hour ends 600 s after MAX_ROLLOUT_S: this stops first, with its own line).
KUBECTL_GRACE_S = 300
# A step waits at most this many pauses for its minimum traffic before it fails.
VOLUME_WAIT_FACTOR = 2
# The rules' rate window is 2 minutes; with AMP's 30 s scrapes and 60 s rule evaluation a shorter
# pause would judge a step mostly on the traffic of the one before.
MIN_PAUSE_S = 180
MAX_STEPS = 10
# The custom resource's type, as CloudFormation shows it in the stack's events.
RESOURCE_TYPE = "Custom::CiliumTrafficRollout"
# Where the rollout keeps its progress: on the CiliumEnvoyConfig it shifts (request, step, since).
STATE_ANNOTATION = "cilium-mesh.eks/rollout"


# An HTTP header name as the mesh matches it: an RFC 9110 token in lower case (HTTP/2 header names are
# lower case, and Envoy matches them so). traffic.py checks the declaration's headers with it too.
HTTP_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


class RolloutError(ValueError):
    """Rollout settings that cannot work."""


@dataclass(frozen=True)
class RolloutLoad:
    """Synthetic requests during each step of a rollout, sent from inside the cluster as a caller would
    (a Deployment in the mesh's namespace, admitted by the service's policy), each with the header
    x-cilium-mesh-load, so they are counted apart. A quiet service can then still be judged.

    rate_per_s: requests per second (default 2; the gate needs min_request_rate per version).
    path:       the path asked for (default the service's check_path).
    method:     GET (default) or HEAD: the load must be harmless to repeat.
    headers:    extra request headers (default none).
    """

    rate_per_s: float = 2.0
    path: str | None = None
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", dict(self.headers))
        if not _number(self.rate_per_s) or not 0 < self.rate_per_s <= 100:
            raise RolloutError(f"load.rate_per_s {self.rate_per_s!r} must be a number above 0 and at most 100 (requests/s)")
        if self.path is not None and (not isinstance(self.path, str) or not self.path.startswith("/")):
            raise RolloutError(f"load.path {self.path!r} must start with '/'")
        if self.method not in ("GET", "HEAD"):
            raise RolloutError(f"load.method {self.method!r} must be GET or HEAD (the load repeats its request)")
        for name, value in self.headers.items():
            if not isinstance(name, str) or not HTTP_HEADER_NAME.fullmatch(name) or not isinstance(value, str):
                raise RolloutError(f"load.headers.{name}: must be a lower-case HTTP header name with a string value")


@dataclass(frozen=True)
class RolloutSettings:
    """How new weights are rolled out.

    steps:            percentages of the change, rising, ending at 100 (default 10, 50, 100).
    pause_s:          seconds each step but the last runs before the gate may pass it (default 300).
    max_error_ratio:  the most of its attempts a version gaining weight may fail (default 0.05, the
                      error budget alert's).
    max_p99_ms:       the highest p99 latency, in ms, of requests routed to it (default 500).
    min_request_rate: requests per second it must be asked before a step may pass (default 0.5,
                      60 requests in the rules' 2-minute window).
    load:             synthetic requests during each step (RolloutLoad); default none.
    min_pause_s:      the shortest pause allowed; MIN_PAUSE_S for AMP, less only for local runs.
    """

    steps: tuple[int, ...] = (10, 50, 100)
    pause_s: int = 300
    max_error_ratio: float = 0.05
    max_p99_ms: int = 500
    min_request_rate: float = 0.5
    load: RolloutLoad | None = None
    min_pause_s: int = field(default=MIN_PAUSE_S, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps) if isinstance(self.steps, (list, tuple)) else self.steps)
        steps = self.steps
        if (
            not isinstance(steps, tuple)
            or not 1 <= len(steps) <= MAX_STEPS
            or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100 for s in steps)
            or list(steps) != sorted(set(steps))
            or steps[-1] != 100
        ):
            raise RolloutError(
                f"steps {list(steps) if isinstance(steps, tuple) else steps!r} must be 1 to {MAX_STEPS} rising whole percentages of the change, ending at 100"
            )
        if isinstance(self.pause_s, bool) or not isinstance(self.pause_s, int) or self.pause_s < self.min_pause_s:
            raise RolloutError(
                f"pause_s {self.pause_s!r} must be whole seconds, at least {self.min_pause_s} (the rules'"
                " 2-minute window plus AMP's scrape and evaluation)"
            )
        if self.worst_case_s > MAX_ROLLOUT_S:
            raise RolloutError(
                f"pause_s {self.pause_s}: {len(steps) - 1} gated steps x {VOLUME_WAIT_FACTOR} x {self.pause_s} s may take"
                f" {self.worst_case_s} s, more than the {MAX_ROLLOUT_S} s a rollout may use of CloudFormation's"
                f" {SERVICE_TIMEOUT_S} s for a custom resource"
            )
        if not _number(self.max_error_ratio) or not 0 <= self.max_error_ratio < 1:
            raise RolloutError(f"max_error_ratio {self.max_error_ratio!r} must be a number from 0 to below 1")
        if isinstance(self.max_p99_ms, bool) or not isinstance(self.max_p99_ms, int) or not 1 <= self.max_p99_ms <= 60000:
            raise RolloutError(f"max_p99_ms {self.max_p99_ms!r} must be whole milliseconds from 1 to 60000")
        if not _number(self.min_request_rate) or not 0 < self.min_request_rate <= 100000:
            raise RolloutError(f"min_request_rate {self.min_request_rate!r} must be a number above 0 (requests/s)")

    @classmethod
    def from_mapping(cls, value: Mapping, min_pause_s: int = MIN_PAUSE_S) -> RolloutSettings:
        """From the ``rollout`` context object; keys left out take their defaults."""
        unknown = sorted(set(value) - set(ROLLOUT_KEYS))
        if unknown:
            raise RolloutError(f"{unknown[0]!r} is not a rollout setting (settings: {', '.join(ROLLOUT_KEYS)})")
        load = value.get("load")
        if load is not None and not isinstance(load, RolloutLoad):
            if not isinstance(load, Mapping):
                raise RolloutError(f"load {load!r} must be an object like {{\"rate_per_s\": 2}}")
            unknown = sorted(set(load) - {f.name for f in dataclasses.fields(RolloutLoad)})
            if unknown:
                raise RolloutError(f"load.{unknown[0]}: not a load setting (settings: rate_per_s, path, method, headers)")
            load = RolloutLoad(**load)
        return cls(**{**value, "load": load}, min_pause_s=min_pause_s)

    def as_mapping(self) -> dict:
        mapping = {key: list(self.steps) if key == "steps" else getattr(self, key) for key in ROLLOUT_KEYS}
        mapping["load"] = dataclasses.asdict(self.load) if self.load else None
        return mapping

    @property
    def worst_case_s(self) -> int:
        """The longest a rollout can run: each gated step waiting out its volume wait."""
        return (len(self.steps) - 1) * VOLUME_WAIT_FACTOR * self.pause_s


ROLLOUT_KEYS = ("steps", "pause_s", "max_error_ratio", "max_p99_ms", "min_request_rate", "load")


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _shares(weights: Mapping[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {version: weight / total for version, weight in weights.items()}


# Intermediate steps are written in parts per STEP_TOTAL; the last step is the new weights as given.
STEP_TOTAL = 1000


def step_weights(old: Mapping[str, int], new: Mapping[str, int], percent: int) -> dict[str, int]:
    """The weights ``percent`` of the way from ``old`` to ``new`` (the versions of both; new's first)."""
    if percent == 100:
        return dict(new)
    before, after = _shares(old), _shares(new)
    versions = [*new, *(v for v in old if v not in new)]
    exact = {v: STEP_TOTAL * (before.get(v, 0.0) + percent / 100 * (after.get(v, 0.0) - before.get(v, 0.0))) for v in versions}
    weights = {v: math.floor(share) for v, share in exact.items()}
    # Largest remainder: the parts add up to STEP_TOTAL.
    for version in sorted(versions, key=lambda v: weights[v] - exact[v])[: STEP_TOTAL - sum(weights.values())]:
        weights[version] += 1
    return weights


def gaining_versions(old: Mapping[str, int], new: Mapping[str, int]) -> tuple[str, ...]:
    """The versions whose share of the split grows: the ones the gate judges."""
    before, after = _shares(old), _shares(new)
    return tuple(v for v in new if after[v] > before.get(v, 0.0))


def plan(old: Mapping[str, int] | None, new: Mapping[str, int], settings: RolloutSettings | None) -> list[dict[str, int]]:
    """The weights of each step: just the new ones when there is nothing to roll out gradually
    (no settings, no previous weights, or the same split)."""
    if settings is None or old is None or _shares(old) == _shares(new) or not gaining_versions(old, new):
        return [dict(new)]
    return [step_weights(old, new, percent) for percent in settings.steps]


@dataclass(frozen=True)
class Reading:
    """What the gate read for one version gaining weight (None: no series, e.g. no traffic yet)."""

    version: str
    error_ratio: float | None
    p99_ms: float | None
    ejected_hosts: float | None
    request_rate: float | None


# The gate's queries per version gaining weight: recorded series of the rules AMP evaluates, each
# service's apart by its labels (manifests/metrics/prometheus/service-rules.yaml).
def gate_queries(namespace: str, service: str, version: str) -> dict[str, str]:
    labels = f'namespace="{namespace}", service="{service}"'
    return {
        "error_ratio": f'mesh_service:errors:ratio2m{{{labels}, version="{version}"}}',
        "p99_ms": f'mesh_service:latency_ms:p99_2m{{{labels}, destination="{version}"}}',
        "ejected_hosts": f'mesh_service:ejections_active{{{labels}, destination="{version}"}}',
        "request_rate": f'mesh_service:attempts:rate2m{{{labels}, version="{version}"}}',
    }


def breach(settings: RolloutSettings, reading: Reading) -> str | None:
    """Why this version must not gain more weight, or None. Errors and latency count once it has had the
    minimum traffic (a first failed request alone is not a ratio); ejection counts at once."""
    v = reading.version
    if reading.ejected_hosts:
        return f"Envoy ejected {reading.ejected_hosts:.0f} host(s) of {v} (failing requests or connections)"
    if not enough_traffic(settings, reading):
        return None
    if reading.error_ratio is not None and reading.error_ratio > settings.max_error_ratio:
        return f"{v} failed {reading.error_ratio:.1%} of its requests (budget {settings.max_error_ratio:.1%})"
    if reading.p99_ms is not None and math.isfinite(reading.p99_ms) and reading.p99_ms > settings.max_p99_ms:
        return f"{v} p99 {reading.p99_ms:.0f} ms (budget {settings.max_p99_ms} ms)"
    return None


def enough_traffic(settings: RolloutSettings, reading: Reading) -> bool:
    return reading.request_rate is not None and reading.request_rate >= settings.min_request_rate


def with_state(document: dict, state: dict) -> dict:
    """A CiliumEnvoyConfig with the rollout's progress in its annotation (STATE_ANNOTATION)."""
    document["metadata"].setdefault("annotations", {})[STATE_ANNOTATION] = json.dumps(state, sort_keys=True)
    return document


def resource_properties(cluster_name: str, kubectl_handler: str, policy_json: str,
                        settings: RolloutSettings | None, query_url: str | None, load: list[dict] = ()) -> dict:  # fmt: skip
    """The rollout custom resource's properties (what its Lambda reads); the gate's only with settings,
    the load's documents only when it has one (a property left out, never an empty one)."""
    properties = {"ClusterName": cluster_name, "KubectlHandler": kubectl_handler, "Policy": policy_json}
    if settings is not None:
        properties["Rollout"] = json.dumps(settings.as_mapping(), sort_keys=True)
        properties["QueryUrl"] = query_url
    if load:
        properties["Load"] = json.dumps(list(load), sort_keys=True)
    return properties


def describe(weights: Mapping[str, int]) -> str:
    """Weights as shares: 'v1 90%, v2 10%'."""
    return ", ".join(f"{v} {share:.0%}" for v, share in _shares(weights).items())
