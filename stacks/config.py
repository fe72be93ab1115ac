"""The app's configuration: cdk.json context (or `cdk ... -c key=value`), read and checked once.

Every key is required and documented in docs/configuration.md; cdk.json
holds the defaults. A bad value raises ConfigError with one line that names
the key and what is allowed; app.py prints it and exits before anything is
synthesized. What is accepted comes back in one canonical form (a CIDR as
`str(IPv4Network)`, a count as an int), so the stack never sees two spellings
of the same setting.
"""

from __future__ import annotations

import functools
import gzip
import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore
from cilium_mesh import DeclarationError, MeshService
from cilium_mesh.declaration import ServicesError, check_list, sample_service, services
from cilium_mesh.manifests import DATAPATHS
from cilium_mesh.metrics_files import RuleFileError, rule_file
from cilium_mesh.rollout_plan import RolloutError, RolloutSettings
from cilium_mesh.versions import CILIUM_RELEASES, WIREGUARD_FIRST_PATCH

from .versions import KUBERNETES_RELEASES, RETIRED_KUBERNETES

KEYS = (
    "region",
    "availability_zones",
    "cluster_name",
    "kubernetes_version",
    "cilium_version",
    "node_instance_type",
    "node_count",
    "admin_principal_arn",
    "endpoint_public_cidrs",
    "traffic_weights",
    "network_policy",
    "datapath",
    "metrics",
    "alert_email",
    "smoke_test",
    "rollout",
    "existing_cluster",
    "sample_app",
    "services",
    "encryption",
)

# Keys whose null is a value (none), not a missing key.
OPTIONAL_KEYS = ("admin_principal_arn", "alert_email", "rollout", "existing_cluster", "traffic_weights", "services", "encryption",
                 "datapath")

# Keys this app once read, with why they are gone: a leftover `-c kube_proxy=true` says so.
REMOVED_KEYS = {
    "kube_proxy": "removed: Cilium's Ingress needs kube-proxy replacement (Cilium 1.19+)",
}

# Context keys of the CDK CLI itself (aws-cdk 2.1148.1), accepted and ignored. `cdk acknowledge`
# writes acknowledged-issue-numbers and `cdk cli-telemetry` writes cli-telemetry to cdk.context.json
# (lib/cli/cdk-toolkit.js); the CLI's README tells users to turn notices off "through context in
# cdk.json". Keys with ':' or '/' (feature flags, aws:cdk:*) are the CDK's too and also ignored.
CDK_CLI_KEYS = ("acknowledged-issue-numbers", "cli-telemetry", "notices")

# x86_64 (the sample images are amd64) families with enough ENIs for the VPC CNI.
INSTANCE_FAMILIES = (
    "c5", "c5a", "c6a", "c6i", "c7a", "c7i",
    "m5", "m5a", "m6a", "m6i", "m7a", "m7i",
    "r5", "r5a", "r6a", "r6i", "r7a", "r7i",
    "t3", "t3a",
)  # fmt: skip
MIN_NODES, MAX_NODES = 2, 50
# EKS quota "Public endpoint access CIDR ranges per cluster" (not adjustable).
MAX_PUBLIC_CIDRS = 40

# re.ASCII: \w and \d would otherwise accept non-ASCII letters and digits ('١' is a digit to Python).
_REGION = re.compile(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]", re.ASCII)
_CLUSTER_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]{0,99}", re.ASCII)
# Cilium's chart (templates/validate.yaml) for cluster.name, which the eni datapath sets.
_CILIUM_CLUSTER_NAME = re.compile(r"([a-z0-9][-a-z0-9]*)?[a-z0-9]", re.ASCII)
CILIUM_CLUSTER_NAME_MAX = 32
_INSTANCE_TYPE = re.compile(r"([a-z][a-z0-9-]*)\.(large|xlarge|[0-9]+xlarge|metal(-[0-9]+xl)?)", re.ASCII)
# Up to four digits a part: int() of a longer digit string can fail (and no release is that long).
_CILIUM_VERSION = re.compile(r"v?([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})", re.ASCII)
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}", re.ASCII)
# An address SNS can subscribe: local part, '@', a domain with a dot (no spaces, one '@').
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", re.ASCII)
_PRINCIPAL_ARN = re.compile(r"arn:aws(-[a-z]+)*:iam::[0-9]{12}:(role|user)/[\w+=,.@/-]+", re.ASCII)


class ConfigError(ValueError):
    """One line: the key, what is wrong, what is allowed."""


# existing_cluster: a cluster the user runs, imported. Everything the import needs is in the setting,
# so synth looks nothing up in AWS. Its keys, each required, and what they take:
EXISTING_CLUSTER_KEYS = {
    "name": "the cluster's name",
    "kubernetes_version": 'its Kubernetes version, a string like "1.33"',
    "endpoint": "its API server endpoint, https://<id>.<suffix>.<region>.eks.amazonaws.com (Cilium needs it before Services route)",
    "vpc_id": "its VPC, vpc-<hex>",
    "private_subnet_ids": "its nodes' private subnets, 2 to 16 subnet-<hex> (AMP's collector, and the kubectl provider with private access)",
    "cluster_security_group_id": "the cluster security group EKS made, sg-<hex>",
    "endpoint_access": "public, private or public_and_private",
    "public_access_cidrs": 'with public access, the CIDRs it admits, like ["0.0.0.0/0"] (not needed with private)',
    "authentication_mode": "API or API_AND_CONFIG_MAP (access entries)",
    "vpc_cni_version": "the amazon-vpc-cni add-on's version, like v1.19.2-eksbuild.1",
}
# ...and the one key that may be left out (or null).
EXISTING_CLUSTER_OPTIONAL_KEYS = {
    "node_security_group_id": "the nodes' security group, sg-<hex>, when they are not in the cluster security group"
    " (terraform-aws-eks gives its node groups one); null: the cluster security group, as EKS managed node groups use",
}
ENDPOINT_ACCESS = ("public", "private", "public_and_private")
AUTHENTICATION_MODES = ("API", "API_AND_CONFIG_MAP", "CONFIG_MAP")
# Cilium's aws-cni chaining needs the VPC CNI 1.11.2 or newer (Documentation/installation/cni-chaining-aws-cni.rst).
MIN_VPC_CNI = (1, 11, 2)
_AWS_ID = {kind: re.compile(rf"{kind}-([0-9a-f]{{8}}|[0-9a-f]{{17}})", re.ASCII) for kind in ("vpc", "subnet", "sg")}
_VPC_CNI_VERSION = re.compile(r"v?([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})(-eksbuild\.[0-9]{1,4})?", re.ASCII)


@dataclass(frozen=True)
class ExistingCluster:
    """A cluster the user already runs, as the stack imports it (docs/existing-cluster.md)."""

    name: str
    kubernetes_version: str
    endpoint: str
    vpc_id: str
    private_subnet_ids: tuple[str, ...]
    cluster_security_group_id: str
    endpoint_access: str
    public_access_cidrs: tuple[str, ...]
    authentication_mode: str
    vpc_cni_version: str
    node_security_group_id: str | None = None

    @property
    def provider_in_vpc(self) -> bool:
        """With private access the kubectl provider runs in the private subnets, with the cluster security group."""
        return self.endpoint_access != "public"


@dataclass(frozen=True)
class MeshConfig:
    """The checked configuration, in canonical form."""

    region: str
    availability_zones: tuple[str, ...]
    cluster_name: str
    kubernetes_version: str
    cilium_version: str
    node_instance_type: str
    node_count: int
    admin_principal_arn: str | None
    endpoint_public_cidrs: tuple[str, ...]
    services: tuple[MeshService, ...]
    network_policy: bool
    datapath: str
    metrics: bool
    alert_email: str | None
    smoke_test: bool
    existing_cluster: ExistingCluster | None = None
    sample_app: bool = True
    encryption: str = "none"

    def service(self, key: str) -> MeshService:
        """A declared service by ``namespace/name``."""
        return next(s for s in self.services if s.key == key)


@functools.cache
def ec2_instance_types() -> frozenset[str]:
    """Every instance type EC2 knows, from botocore's EC2 model (each botocore release adds new ones).

    Read from the file botocore's Loader picks (the newest API version's service-2.json.gz) without
    importing the Loader, which alone costs a fifth of a second on every synth.
    """
    newest_api = max((Path(botocore.__file__).parent / "data" / "ec2").iterdir())
    model = json.loads(gzip.decompress((newest_api / "service-2.json.gz").read_bytes()))
    return frozenset(model["shapes"]["InstanceType"]["enum"])


def _shown(value: Any) -> str:
    """A value inside the one error line: repr (a newline shows as \\n), at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _structured(value: Any) -> Any:
    """`-c key=value` arrives as a string: read JSON lists, objects and null from it."""
    if isinstance(value, str) and value.strip() == "null":
        return None
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # not JSON, an integer too long to read, nested too deep
            return value
    return value


def _region(value: Any) -> str:
    if not isinstance(value, str) or not _REGION.fullmatch(value):
        raise ConfigError(f"region: {_shown(value)} is not an AWS region name like 'us-west-2'")
    return value


def _zones(value: Any, region: str) -> tuple[str, ...]:
    value = _structured(value)
    if not isinstance(value, list) or len(value) != 3:
        raise ConfigError(f"availability_zones: {_shown(value)} must be a list of 3 different zones of {region}")
    for zone in value:
        if not isinstance(zone, str) or not re.fullmatch(re.escape(region) + "[a-z]", zone, re.ASCII):
            raise ConfigError(f"availability_zones: {_shown(zone)} is not a zone of {region} (like '{region}a')")
        if value.count(zone) > 1:
            raise ConfigError(f"availability_zones: {zone!r} is listed twice; give 3 different zones of {region}")
    return tuple(value)


def _cluster_name(value: Any) -> str:
    if not isinstance(value, str) or not _CLUSTER_NAME.fullmatch(value):
        raise ConfigError(
            f"cluster_name: {_shown(value)} must start with a letter and hold only letters, digits and '-'"
            " (at most 100)"
        )
    return value


def _datapath(value: Any, cluster_name: str, existing: bool) -> str:
    """The datapath, null being eni for a created cluster and chaining for an existing one (the only one it can
    take); eni also names Cilium's cluster (ENI tags), so the cluster name must suit Cilium's chart."""
    if value is None:
        value = "chaining" if existing else "eni"
    if value not in DATAPATHS:
        raise ConfigError(f"datapath: {_shown(value)} must be one of {', '.join(DATAPATHS)}")
    if value == "eni" and not (
        len(cluster_name) <= CILIUM_CLUSTER_NAME_MAX and _CILIUM_CLUSTER_NAME.fullmatch(cluster_name)
    ):
        raise ConfigError(
            f"cluster_name: {cluster_name!r} must be at most {CILIUM_CLUSTER_NAME_MAX} lowercase letters, digits"
            " and '-' with datapath eni (it becomes Cilium's cluster.name, which tags the ENIs Cilium creates)"
        )
    return value


def _kubernetes_version(value: Any, key: str = "kubernetes_version") -> str:
    """A string only: JSON reads 1.30 as the number 1.3, so a number cannot say which version it meant.
    Each supported version has its own kubectl layer (stacks/versions.py)."""
    supported = ", ".join(KUBERNETES_RELEASES)
    if not isinstance(value, str):
        raise ConfigError(
            f'{key}: {_shown(value)} must be a string like "1.35" (as a JSON number 1.30 would read'
            f" as 1.3); supported: {supported}"
        )
    if value in RETIRED_KUBERNETES:
        raise ConfigError(
            f"{key}: {value} is retired on EKS (extended support ended {RETIRED_KUBERNETES[value]}) and has no"
            f" kubectl layer here; supported: {supported}"
        )
    if value not in KUBERNETES_RELEASES:
        raise ConfigError(f"{key}: {_shown(value)} is not an EKS version with a kubectl layer; supported: {supported}")
    return value


def _cilium_version(value: Any) -> str:
    """Only the chart version exactly as helm.cilium.io publishes it, which is what helm is given."""
    supported = ", ".join(f"{minor}.0-{minor}.{patch}" for minor, patch in CILIUM_RELEASES.items())
    match = _CILIUM_VERSION.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ConfigError(
            f"cilium_version: {_shown(value)} is not a release like '1.19.6'; supported: {supported}"
        )
    major, minor, patch = (int(part) for part in match.groups())
    canonical = f"{major}.{minor}.{patch}"
    if value != canonical:
        raise ConfigError(f"cilium_version: {value!r} is not how Cilium names its releases: write {canonical}")
    release = f"{major}.{minor}"
    if release not in CILIUM_RELEASES:
        newest = max(tuple(map(int, m.split("."))) for m in CILIUM_RELEASES)
        if (major, minor) < newest:
            raise ConfigError(f"cilium_version: {value} is end-of-life; supported: {supported}")
        raise ConfigError(f"cilium_version: {value} is not published; supported: {supported}")
    if patch > CILIUM_RELEASES[release]:
        raise ConfigError(f"cilium_version: {value} is not published; supported: {supported}")
    return value


def _instance_type(value: Any) -> str:
    """An allowed x86_64 family and size first, then a real instance type by botocore's EC2 model."""
    match = _INSTANCE_TYPE.fullmatch(value) if isinstance(value, str) else None
    if not match or match.group(1) not in INSTANCE_FAMILIES:
        raise ConfigError(
            f"node_instance_type: {_shown(value)} must be <family>.<large|xlarge|Nxlarge|metal|metal-Nxl>"
            f" with an x86_64 family of {', '.join(INSTANCE_FAMILIES)}"
        )
    if value not in ec2_instance_types():
        raise ConfigError(
            f"node_instance_type: {value!r} is not an EC2 instance type (botocore {botocore.__version__}'s EC2"
            " model); like 'm6i.large' or 'm6i.2xlarge'"
        )
    return value


def _node_count(value: Any) -> int:
    """An int, or from `-c node_count=3` a string of ASCII digits and nothing else."""
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_NODES <= value <= MAX_NODES:
        raise ConfigError(f"node_count: {_shown(value)} must be a whole number from {MIN_NODES} to {MAX_NODES}")
    return value


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{key}: {_shown(value)} must be true or false")


def _principal(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _PRINCIPAL_ARN.fullmatch(value):
        raise ConfigError(
            f"admin_principal_arn: {_shown(value)} must be null or an IAM role or user ARN like "
            "'arn:aws:iam::123456789012:role/Admin'"
        )
    return value


def _alert_email(value: Any, metrics: bool) -> str | None:
    """Null, or one address subscribed to the alerts topic; alerts exist only with metrics on."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 254 or not _EMAIL.fullmatch(value):
        raise ConfigError(f"alert_email: {_shown(value)} must be null or an e-mail address like 'oncall@example.com'")
    if not metrics:
        raise ConfigError("alert_email: needs metrics true (alerts come from the metrics' rules); set it to null")
    return value


def _rollout(value: Any, metrics: bool) -> RolloutSettings | None:
    """Null (new weights at once), or an object of rollout settings, each left out taking its default."""
    value = _structured(value)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(
            f'rollout: {_shown(value)} must be null or an object like {{"steps": [10, 50, 100], "pause_s": 300}}'
        )
    if not metrics:
        raise ConfigError("rollout: needs metrics true (its gate reads the metrics' recording rules); set it to null")
    try:
        return RolloutSettings.from_mapping(value)
    except RolloutError as error:
        raise ConfigError(f"rollout: {error}") from None


def _cidrs(value: Any, key: str = "endpoint_public_cidrs") -> tuple[str, ...]:
    """Strings only (IPv4Network would also take an int), host bits zero, each once, as IPv4Network writes them."""
    value = _structured(value)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PUBLIC_CIDRS:
        raise ConfigError(
            f"{key}: {_shown(value)} must be a list of 1 to {MAX_PUBLIC_CIDRS} (the EKS limit)"
            " IPv4 CIDRs like '203.0.113.0/24'"
        )
    cidrs: list[str] = []
    for cidr in value:
        try:
            network = str(ipaddress.IPv4Network(cidr, strict=True)) if isinstance(cidr, str) else None
        except ValueError:
            network = None
        if network is None:
            raise ConfigError(
                f"{key}: {_shown(cidr)} is not an IPv4 CIDR string with its host bits zero,"
                " like '203.0.113.0/24'"
            )
        if network in cidrs:
            raise ConfigError(f"{key}: {cidr!r} is {network}, listed twice; give each CIDR once")
        cidrs.append(network)
    return tuple(cidrs)


def _sample_weights(value: Any) -> dict | None:
    """The sample's weights (null: its declaration's); checked with the rest of its declaration."""
    value = _structured(value)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(
            f'traffic_weights: {_shown(value)} must map versions to weights, like {{"v1": 90, "v2": 10}}'
        )
    return value


def _services(context, metrics: bool, encryption: str) -> tuple[bool, tuple[MeshService, ...]]:
    """sample_app (its catalogdetail first, with the sample's traffic_weights and rollout), then the declared
    services; a rollout needs metrics, whoever declares it."""
    sample = _flag("sample_app", context("sample_app"))
    weights = _sample_weights(context("traffic_weights"))
    rollout = _rollout(context("rollout"), metrics)
    if not sample:
        for key, value in (("traffic_weights", weights), ("rollout", rollout)):
            if value is not None:
                raise ConfigError(f"{key}: sets the sample app's catalogdetail, and sample_app is false; declare your"
                                  f" services' {'weights' if key == 'traffic_weights' else 'rollout'} in services[]; set it to null")  # fmt: skip
    try:
        declared = services(_structured(context("services")) or [])
        if sample:
            try:
                declared = (sample_service(weights, rollout), *declared)
            except (ServicesError, DeclarationError) as error:  # the sample's declaration is the code's: its weights are wrong
                raise ConfigError(f"traffic_weights: {str(error).split(': ', 1)[1]}") from None
        check_list(declared)
    except (ServicesError, DeclarationError) as error:
        raise ConfigError(str(error)) from None
    for s in declared:
        if s.rollout is not None and not metrics:
            raise ConfigError(f"services[{s.name}].rollout: needs metrics true (its gate reads the metrics' recording rules); set it to null")
    if metrics:
        try:
            rule_file(declared, encryption)
        except RuleFileError as error:
            raise ConfigError(f"services: {error}") from None
    return sample, declared


ENCRYPTIONS = ("wireguard", "none")


def _encryption(value: Any, datapath: str, cilium_version: str) -> str:
    """Transparent encryption between nodes: null is the datapath's own (eni: wireguard; chaining: none)."""
    if value is None:
        value = "wireguard" if datapath == "eni" else "none"
    if value not in ENCRYPTIONS:
        raise ConfigError(f"encryption: {_shown(value)} must be null, wireguard or none")
    if value == "wireguard" and datapath != "eni":
        raise ConfigError(
            "encryption: wireguard needs datapath eni: Cilium does not support transparent encryption while it"
            " chains onto another CNI (cilium/cilium#15596); set encryption none, or datapath eni"
        )
    minor, patch = cilium_version.rsplit(".", 1)
    if value == "wireguard" and int(patch) < WIREGUARD_FIRST_PATCH[minor]:
        first = f"{minor}.{WIREGUARD_FIRST_PATCH[minor]}"
        raise ConfigError(
            f"cilium_version: {cilium_version} with encryption wireguard fragments L7 proxy traffic in native routing"
            f" (cilium/cilium#42837, fixed in {first} by PR #42835); use {first} or newer, or encryption none"
        )
    return value


def _aws_id(key: str, value: Any, kind: str) -> str:
    if not isinstance(value, str) or not _AWS_ID[kind].fullmatch(value):
        raise ConfigError(f"{key}: {_shown(value)} is not a {kind} ID like '{kind}-0123456789abcdef0'")
    return value


def _existing_cluster(value: Any, region: str, datapath: Any) -> ExistingCluster | None:
    """Null (the stack creates its VPC, cluster and nodes), or the cluster to import, every key given."""
    value = _structured(value)
    if value is None:
        return None
    prefix = "existing_cluster"
    if not isinstance(value, dict):
        raise ConfigError(f'{prefix}: {_shown(value)} must be null or an object with {", ".join(EXISTING_CLUSTER_KEYS)}')
    keys = {**EXISTING_CLUSTER_KEYS, **EXISTING_CLUSTER_OPTIONAL_KEYS}
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ConfigError(f"{prefix}.{_key_shown(unknown[0])}: not a key of existing_cluster (keys: {', '.join(keys)})")
    # A private-only endpoint admits no public CIDRs, so it needs none.
    missing = [key for key in EXISTING_CLUSTER_KEYS if value.get(key) is None
               and not (key == "public_access_cidrs" and value.get("endpoint_access") == "private")]  # fmt: skip
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}: missing; {EXISTING_CLUSTER_KEYS[missing[0]]}")
    if datapath not in (None, "chaining"):
        raise ConfigError(
            f"{prefix}: needs datapath chaining (or null, which is chaining here), not {_shown(datapath)}: eni needs nodes that run"
            " no aws-node, and Cilium documents no in-place move from the VPC CNI to ENI mode"
        )
    name = value["name"]
    if not isinstance(name, str) or not _CLUSTER_NAME.fullmatch(name):
        raise ConfigError(f"{prefix}.name: {_shown(name)} is not an EKS cluster name (a letter, then letters, digits and '-')")
    endpoint = value["endpoint"]
    if not isinstance(endpoint, str) or not re.fullmatch(
        rf"https://[0-9A-Za-z]+\.[0-9a-z]+\.{re.escape(region)}\.eks\.amazonaws\.com", endpoint, re.ASCII
    ):
        raise ConfigError(
            f"{prefix}.endpoint: {_shown(endpoint)} is not an EKS API server endpoint of {region} like"
            f" 'https://0123456789ABCDEF0123456789ABCDEF.gr7.{region}.eks.amazonaws.com'"
        )
    subnets = _structured(value["private_subnet_ids"])
    if not isinstance(subnets, list) or not 2 <= len(subnets) <= 16:
        raise ConfigError(f"{prefix}.private_subnet_ids: {_shown(subnets)} must be a list of 2 to 16 subnet IDs")
    subnets = [_aws_id(f"{prefix}.private_subnet_ids", subnet, "subnet") for subnet in subnets]
    if len(set(subnets)) != len(subnets):
        raise ConfigError(f"{prefix}.private_subnet_ids: a subnet is listed twice; give each once")
    access = value["endpoint_access"]
    if access not in ENDPOINT_ACCESS:
        raise ConfigError(f"{prefix}.endpoint_access: {_shown(access)} must be one of {', '.join(ENDPOINT_ACCESS)}")
    public_cidrs = () if access == "private" else _cidrs(value["public_access_cidrs"], f"{prefix}.public_access_cidrs")
    if access == "public" and public_cidrs != ("0.0.0.0/0",):
        raise ConfigError(
            f"{prefix}.endpoint_access: public, limited to {', '.join(public_cidrs)}: the kubectl provider's Lambda has no"
            " fixed address to admit; turn on private access (public_and_private), and it runs in the private subnets"
        )
    mode = value["authentication_mode"]
    if mode not in AUTHENTICATION_MODES:
        raise ConfigError(f"{prefix}.authentication_mode: {_shown(mode)} must be one of {', '.join(AUTHENTICATION_MODES[:2])}")
    if mode == "CONFIG_MAP":
        raise ConfigError(
            f"{prefix}.authentication_mode: CONFIG_MAP has no access entries, which the stack's kubectl provider needs;"
            f" switch with `aws eks update-cluster-config --name {name} --access-config authenticationMode=API_AND_CONFIG_MAP`"
            " (one-way: a cluster cannot go back to CONFIG_MAP)"
        )
    cni = value["vpc_cni_version"]
    match = _VPC_CNI_VERSION.fullmatch(cni) if isinstance(cni, str) else None
    if not match:
        raise ConfigError(f"{prefix}.vpc_cni_version: {_shown(cni)} is not a VPC CNI version like 'v1.19.2-eksbuild.1'")
    if tuple(int(part) for part in match.groups()[:3]) < MIN_VPC_CNI:
        raise ConfigError(
            f"{prefix}.vpc_cni_version: {cni} is older than v{'.'.join(map(str, MIN_VPC_CNI))}, the first Cilium's"
            " aws-cni chaining supports; update the vpc-cni add-on first"
        )
    return ExistingCluster(
        name=name,
        kubernetes_version=_kubernetes_version(value["kubernetes_version"], f"{prefix}.kubernetes_version"),
        endpoint=endpoint,
        vpc_id=_aws_id(f"{prefix}.vpc_id", value["vpc_id"], "vpc"),
        private_subnet_ids=tuple(subnets),
        cluster_security_group_id=_aws_id(f"{prefix}.cluster_security_group_id", value["cluster_security_group_id"], "sg"),
        endpoint_access=access,
        public_access_cidrs=public_cidrs,
        authentication_mode=mode,
        vpc_cni_version=cni,
        node_security_group_id=None if value.get("node_security_group_id") is None else _aws_id(
            f"{prefix}.node_security_group_id", value["node_security_group_id"], "sg"),
    )


def _key_shown(key: str) -> str:
    """A key as the start of the error line; one with a newline or other control character as its repr."""
    return key if key.isprintable() else repr(key)


def load_config(settings: Mapping[str, Any]) -> MeshConfig:
    """Read and check every key of the context (``app.node.get_all_context()``).

    The CDK's own keys (CDK_CLI_KEYS, and any with ':' or '/') are ignored; any
    other key must be one of KEYS, so a typo such as ``-c node_cout=3`` is not
    silently ignored.
    """
    for key in settings:
        if key in REMOVED_KEYS:
            raise ConfigError(f"{key}: {REMOVED_KEYS[key]}")
    unknown = sorted(k for k in settings if k not in KEYS and k not in CDK_CLI_KEYS and ":" not in k and "/" not in k)
    if unknown:
        raise ConfigError(f"{_key_shown(unknown[0])}: not a configuration key (keys: {', '.join(KEYS)})")
    missing = [key for key in KEYS if settings.get(key) is None and key not in OPTIONAL_KEYS]
    if missing:
        raise ConfigError(f"{missing[0]}: missing from cdk.json context (keys: {', '.join(KEYS)})")
    context = settings.get
    region = _region(context("region"))
    existing = _existing_cluster(context("existing_cluster"), region, context("datapath"))
    # With an existing cluster, its own name and version; the keys for a created cluster are not used.
    cluster_name = existing.name if existing else _cluster_name(context("cluster_name"))
    kubernetes_version = existing.kubernetes_version if existing else _kubernetes_version(context("kubernetes_version"))
    if existing and context("admin_principal_arn") is not None:
        raise ConfigError(
            "admin_principal_arn: an existing cluster keeps the access it has (the stack adds an access entry for its"
            " own kubectl provider only); set it to null"
        )
    metrics = _flag("metrics", context("metrics"))
    datapath = _datapath(context("datapath"), cluster_name, existing is not None)
    cilium_version = _cilium_version(context("cilium_version"))
    encryption = _encryption(_structured(context("encryption")), datapath, cilium_version)
    sample, declared = _services(context, metrics, encryption)
    return MeshConfig(
        region=region,
        availability_zones=_zones(context("availability_zones"), region),
        cluster_name=cluster_name,
        kubernetes_version=kubernetes_version,
        cilium_version=cilium_version,
        node_instance_type=_instance_type(context("node_instance_type")),
        node_count=_node_count(context("node_count")),
        admin_principal_arn=_principal(context("admin_principal_arn")),
        endpoint_public_cidrs=_cidrs(context("endpoint_public_cidrs")),
        services=declared,
        network_policy=_flag("network_policy", context("network_policy")),
        datapath=datapath,
        metrics=metrics,
        alert_email=_alert_email(context("alert_email"), metrics),
        smoke_test=_flag("smoke_test", context("smoke_test")),
        existing_cluster=existing,
        sample_app=sample,
        encryption=encryption,
    )


def cli_context() -> dict | None:
    """The context the CDK CLI hands the app, as cdk.App reads it (aws-cdk 2.1148.1, toolkit-lib
    prepare-source.ts writeContextToEnv: CDK_CONTEXT_JSON, and what does not fit in the environment in
    the file CONTEXT_OVERFLOW_LOCATION_ENV names); None when the app runs without the CLI."""
    text = os.environ.get("CDK_CONTEXT_JSON")
    if text is None:
        return None
    context = json.loads(text)
    overflow = os.environ.get("CONTEXT_OVERFLOW_LOCATION_ENV")
    if overflow:
        context.update(json.loads(Path(overflow).read_text()))
    return context


def load_config_or_exit(settings: Mapping[str, Any]) -> MeshConfig:
    """For app.py: a bad value ends the process with its one line, before any synthesis."""
    try:
        return load_config(settings)
    except ConfigError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
