"""The app's configuration: cdk.json context (or `cdk ... -c key=value`), read and checked once.

Every key is required and documented in README ("Configuration"); cdk.json
holds the defaults. A bad value raises ConfigError with one line that names
the key and what is allowed; app.py prints it and exits before anything is
synthesized.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cilium_mesh import TrafficPolicy, TrafficPolicyError
from cilium_mesh.manifests import WORKLOAD_FILES, load_documents, service_names
from cilium_mesh.versions import CILIUM_RELEASES

from .versions import KUBERNETES_RELEASES, RETIRED_KUBERNETES

KEYS = (
    "region",
    "availability_zones",
    "cluster_name",
    "kubernetes_version",
    "cilium_version",
    "node_instance_type",
    "node_count",
    "kube_proxy",
    "admin_principal_arn",
    "endpoint_public_cidrs",
    "traffic_weights",
    "network_policy",
)

# x86_64 (the sample images are amd64) families with enough ENIs for the VPC CNI.
INSTANCE_FAMILIES = (
    "c5", "c5a", "c6a", "c6i", "c7a", "c7i",
    "m5", "m5a", "m6a", "m6i", "m7a", "m7i",
    "r5", "r5a", "r6a", "r6i", "r7a", "r7i",
    "t3", "t3a",
)  # fmt: skip
MIN_NODES, MAX_NODES = 2, 50

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_CLUSTER_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{0,99}$")
_INSTANCE_TYPE = re.compile(r"^([a-z][a-z0-9-]*)\.(large|xlarge|\d+xlarge|metal)$")
_CILIUM_VERSION = re.compile(r"^(\d+\.\d+)\.(\d+)$")
_PRINCIPAL_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:(role|user)/[\w+=,.@/-]+$")


class ConfigError(ValueError):
    """One line: the key, what is wrong, what is allowed."""


@dataclass(frozen=True)
class MeshConfig:
    region: str
    availability_zones: tuple[str, ...]
    cluster_name: str
    kubernetes_version: str
    cilium_version: str
    node_instance_type: str
    node_count: int
    kube_proxy: bool
    admin_principal_arn: str | None
    endpoint_public_cidrs: tuple[str, ...]
    traffic_policy: TrafficPolicy
    network_policy: bool


def _structured(value: Any) -> Any:
    """`-c key=value` arrives as a string: read JSON lists and objects from it."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _region(value: Any) -> str:
    if not isinstance(value, str) or not _REGION.match(value):
        raise ConfigError(f"region: {value!r} is not an AWS region name like 'us-west-2'")
    return value


def _zones(value: Any, region: str) -> tuple[str, ...]:
    value = _structured(value)
    if not isinstance(value, list) or len(value) != 3 or len(set(map(str, value))) != 3:
        raise ConfigError(f"availability_zones: {value!r} must be a list of 3 different zones of {region}")
    for zone in value:
        if not isinstance(zone, str) or not re.fullmatch(re.escape(region) + r"[a-z]", zone):
            raise ConfigError(f"availability_zones: {zone!r} is not a zone of {region} (like '{region}a')")
    return tuple(value)


def _cluster_name(value: Any) -> str:
    if not isinstance(value, str) or not _CLUSTER_NAME.match(value):
        raise ConfigError(
            f"cluster_name: {value!r} must start with a letter and hold only letters, digits and '-' (at most 100)"
        )
    return value


def _kubernetes_version(value: Any) -> str:
    supported = ", ".join(KUBERNETES_RELEASES)
    value = str(value)
    if value in RETIRED_KUBERNETES:
        raise ConfigError(
            f"kubernetes_version: {value} is retired on EKS (extended support ended {RETIRED_KUBERNETES[value]});"
            f" supported: {supported}"
        )
    if value not in KUBERNETES_RELEASES:
        raise ConfigError(f"kubernetes_version: {value!r} is not an EKS version; supported: {supported}")
    return value


def _cilium_version(value: Any) -> str:
    supported = ", ".join(f"{minor}.0-{minor}.{patch}" for minor, patch in CILIUM_RELEASES.items())
    match = _CILIUM_VERSION.match(str(value))
    if not match:
        raise ConfigError(f"cilium_version: {value!r} is not a release like '1.19.6'; supported: {supported}")
    minor, patch = match.group(1), int(match.group(2))
    if minor not in CILIUM_RELEASES:
        newest = max(CILIUM_RELEASES, key=lambda m: tuple(map(int, m.split("."))))
        if tuple(map(int, minor.split("."))) < tuple(map(int, newest.split("."))):
            raise ConfigError(f"cilium_version: {value} is end-of-life; supported: {supported}")
        raise ConfigError(f"cilium_version: {value} is not published; supported: {supported}")
    if patch > CILIUM_RELEASES[minor]:
        raise ConfigError(f"cilium_version: {value} is not published; supported: {supported}")
    return str(value)


def _instance_type(value: Any) -> str:
    match = _INSTANCE_TYPE.match(value) if isinstance(value, str) else None
    if not match or match.group(1) not in INSTANCE_FAMILIES:
        raise ConfigError(
            f"node_instance_type: {value!r} must be <family>.<large|xlarge|Nxlarge> with an x86_64 family of "
            f"{', '.join(INSTANCE_FAMILIES)}"
        )
    return value


def _node_count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_NODES <= value <= MAX_NODES:
        raise ConfigError(f"node_count: {value!r} must be a whole number from {MIN_NODES} to {MAX_NODES}")
    return value


def _flag(key: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: {value!r} must be true or false")

    return parse


def _principal(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _PRINCIPAL_ARN.match(value):
        raise ConfigError(
            f"admin_principal_arn: {value!r} must be null or an IAM role or user ARN like "
            "'arn:aws:iam::123456789012:role/Admin'"
        )
    return value


def _cidrs(value: Any) -> tuple[str, ...]:
    value = _structured(value)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"endpoint_public_cidrs: {value!r} must be a non-empty list of IPv4 CIDRs like '203.0.113.0/24'")
    for cidr in value:
        try:
            ipaddress.IPv4Network(cidr, strict=True)
        except (ValueError, TypeError):
            raise ConfigError(
                f"endpoint_public_cidrs: {cidr!r} is not an IPv4 CIDR with its host bits zero, like '203.0.113.0/24'"
            ) from None
    return tuple(value)


def _traffic_policy(value: Any) -> TrafficPolicy:
    value = _structured(value)
    if not isinstance(value, dict):
        raise ConfigError(f'traffic_weights: {value!r} must map versions to weights, like {{"v1": 90, "v2": 10}}')
    try:
        policy = TrafficPolicy(weights=value)
        policy.check_services(service_names(load_documents(*WORKLOAD_FILES), policy.namespace))
    except TrafficPolicyError as error:
        raise ConfigError(f"traffic_weights: {error}") from None
    return policy


def load_config(settings: Mapping[str, Any]) -> MeshConfig:
    """Read and check every key of the context (``app.node.get_all_context()``).

    Keys with ':' or '/' are the CDK's own; any other key must be one of KEYS,
    so a typo such as ``-c node_cout=3`` is not silently ignored.
    """
    unknown = sorted(k for k in settings if k not in KEYS and ":" not in k and "/" not in k)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a configuration key (keys: {', '.join(KEYS)})")
    missing = [key for key in KEYS if settings.get(key) is None and key != "admin_principal_arn"]
    if missing:
        raise ConfigError(f"{missing[0]}: missing from cdk.json context (keys: {', '.join(KEYS)})")
    context = settings.get
    region = _region(context("region"))
    return MeshConfig(
        region=region,
        availability_zones=_zones(context("availability_zones"), region),
        cluster_name=_cluster_name(context("cluster_name")),
        kubernetes_version=_kubernetes_version(context("kubernetes_version")),
        cilium_version=_cilium_version(context("cilium_version")),
        node_instance_type=_instance_type(context("node_instance_type")),
        node_count=_node_count(context("node_count")),
        kube_proxy=_flag("kube_proxy")(context("kube_proxy")),
        admin_principal_arn=_principal(context("admin_principal_arn")),
        endpoint_public_cidrs=_cidrs(context("endpoint_public_cidrs")),
        traffic_policy=_traffic_policy(context("traffic_weights")),
        network_policy=_flag("network_policy")(context("network_policy")),
    )


def load_config_or_exit(settings: Mapping[str, Any]) -> MeshConfig:
    """For app.py: a bad value ends the process with its one line, before any synthesis."""
    try:
        return load_config(settings)
    except ConfigError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
