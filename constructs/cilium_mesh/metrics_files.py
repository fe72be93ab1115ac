"""The mesh's metrics files, and the rule file rendered from them for the declared services: what AMP and
the local Prometheus evaluate.

Free of aws-cdk-lib, so the local tools (checks/metrics_harness.py, tools.preview) load it without
starting the CDK's Node.js runtime.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import yaml

from .manifests import MANIFESTS_DIR, load_documents, parse_documents
from .traffic import MESH_NAMESPACE, OUTSIDER_LABELS, SMOKE_TEST_LABELS, MeshService, qualify_like_cilium, qualified_name

METRICS_DIR = MANIFESTS_DIR / "metrics"
SCRAPE_CONFIG_FILE = METRICS_DIR / "prometheus" / "scrape-config.yaml"
SERVICE_RULES_FILE = METRICS_DIR / "prometheus" / "service-rules.yaml"
NAMESPACE_RULES_FILE = METRICS_DIR / "prometheus" / "namespace-rules.yaml"
ENCRYPTION_RULES_FILE = METRICS_DIR / "prometheus" / "encryption-rules.yaml"
SCRAPER_RBAC_FILE = METRICS_DIR / "scraper-rbac.yaml"
DASHBOARD_FILE = METRICS_DIR / "dashboards" / "mesh-services.json"
# Cilium's metrics ports (chart defaults): agent 9962, operator 9963, cilium-envoy 9964, Hubble 9965.
METRICS_PORTS = (9962, 9965)
RULES_NAMESPACE = "cilium-mesh"

# AMP's quotas on what the one rule groups namespace carries (Amazon Managed Service for Prometheus
# User Guide, "Amazon Managed Service for Prometheus service quotas",
# https://docs.aws.amazon.com/prometheus/latest/userguide/AMP_quotas.html; the Service Quotas code in
# brackets: `aws service-quotas get-aws-default-service-quota --service-code aps --quota-code <code>`
# gives a Region's value).
# "Rule group namespace definition file size" [L-C62641E3]: 1 MB, counted here as 10^6 bytes, the
# stricter reading.
AMP_RULE_FILE_MAX_BYTES = 1_000_000
# "Rules per workspace" [L-3D15CDB4]: 2,000 recording and alerting rules by default, adjustable; the
# stack's namespace is the workspace's only one.
AMP_RULES_PER_WORKSPACE = 2_000
# A third limit cannot be reached: the namespace's and a group's names together at most 721 UTF-8 bytes
# (API reference, CreateRuleGroupsNamespace); the namespace's is 11, a group's at most 127 (namespace/name).

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class RuleFileError(ValueError):
    """The rule file would not fit in AMP: one line, what is over which quota."""


def _regex_literal(text: str) -> str:
    """``text`` matched literally by RE2 inside a PromQL string: names here are DNS labels and label
    values, whose only character with a meaning in a regex is '.'."""
    return text.replace(".", "[.]")


def _fill(value, values: dict[str, str], source: str):
    """Every ``${name}`` in the strings of a loaded template replaced; an unknown name is a mistake in the template."""
    if isinstance(value, dict):
        return {k: _fill(v, values, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values, source) for v in value]
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            if match.group(1) not in values:
                raise ValueError(f"{source}: unknown placeholder ${{{match.group(1)}}}")
            return values[match.group(1)]

        return _PLACEHOLDER.sub(replace, value)
    return value


def _envoy_names(service: MeshService) -> tuple[str, str]:
    """(virtual host, stat prefix) as Envoy names them: the service's route and listener as Cilium delivers them."""
    delivered = qualify_like_cilium(service.envoy_resources(), service.namespace, service.cec_name)
    resources = {r["@type"].rsplit(".", 1)[-1]: r for r in delivered}
    (virtual_host,) = resources["RouteConfiguration"]["virtual_hosts"]
    (chain,) = resources["Listener"]["filter_chains"]
    (manager,) = chain["filters"]
    return virtual_host["name"], manager["typed_config"]["stat_prefix"]


def service_group(service: MeshService) -> dict:
    """manifests/metrics/prometheus/service-rules.yaml for one service: its configured weights first, then
    the template's rules, every one labelled with the service's namespace and name."""
    (template,) = load_documents(SERVICE_RULES_FILE)
    host_prefix = service.version_service("")
    virtual_host, stat_prefix = _envoy_names(service)
    values = {
        "key": service.key,
        "selector": f'namespace="{service.namespace}", service="{service.name}"',
        "failover_cluster": qualified_name(service.namespace, service.cec_name, service.failover_cluster("")) + "(.+)",
        "version_host": f"{host_prefix}([^.]+){_regex_literal(service.version_host('')[len(host_prefix):])}",
        "virtual_host": virtual_host,
        "stat_prefix": stat_prefix,
    }
    group = _fill(template, values, SERVICE_RULES_FILE.name)
    total = sum(service.weights.values())
    weights = [{"record": "mesh_service:weight:ratio", "expr": f"vector({service.weights[v] / total:g})",
                "labels": {"version": v}} for v in service.versions]  # fmt: skip
    group["rules"] = [*weights, *group["rules"]]
    for rule in group["rules"]:
        rule["labels"] = {"namespace": service.namespace, "service": service.name, **rule.get("labels", {})}
    return group


def namespace_group(namespaces: Sequence[str]) -> dict:
    """manifests/metrics/prometheus/namespace-rules.yaml over these namespaces."""
    (template,) = load_documents(NAMESPACE_RULES_FILE)
    values = {
        "namespaces": "|".join(sorted(set(namespaces))),
        "mesh_namespace": MESH_NAMESPACE,
        "probe_apps": "|".join(_regex_literal(labels["app"]) for labels in (SMOKE_TEST_LABELS, OUTSIDER_LABELS)),
    }
    return _fill(template, values, NAMESPACE_RULES_FILE.name)


# libyaml's emitter and parser, as manifests.py's loader: the file of 40 services is half a megabyte.
class _BlockDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """Multi-line expressions as literal blocks, as written in the templates (and as AMP's console shows them)."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)


def rule_file_usage(text: str) -> tuple[int, int]:
    """(bytes, rules) of a rule file: what AMP's quotas count (AMP_RULE_FILE_MAX_BYTES, AMP_RULES_PER_WORKSPACE)."""
    (document,) = parse_documents(text)
    return len(text.encode()), sum(len(group["rules"]) for group in document["groups"])


def rule_file(services: Sequence[MeshService], encryption: str = "none") -> str:
    """What AMP and the local Prometheus evaluate: one group per service, then one over their namespaces
    (none without services), and with encryption wireguard its group; RuleFileError if AMP would refuse it."""
    groups = [service_group(s) for s in services]
    if services:
        groups.append(namespace_group([s.namespace for s in services]))
    if encryption == "wireguard":
        groups += load_documents(ENCRYPTION_RULES_FILE)
    text = yaml.dump({"groups": groups}, Dumper=_BlockDumper, sort_keys=False, width=1000)
    size, rules = rule_file_usage(text)
    if size > AMP_RULE_FILE_MAX_BYTES:
        raise RuleFileError(f"metrics rules: {size:,} bytes for {len(services)} services, above AMP's {AMP_RULE_FILE_MAX_BYTES:,}-byte"
                            " rule groups namespace (quota L-C62641E3); declare fewer services per stack")  # fmt: skip
    if rules > AMP_RULES_PER_WORKSPACE:
        raise RuleFileError(f"metrics rules: {rules:,} rules for {len(services)} services, above AMP's {AMP_RULES_PER_WORKSPACE:,}"
                            " rules per workspace (quota L-3D15CDB4, adjustable); declare fewer services per stack")  # fmt: skip
    return text
