"""The mesh's metrics files, and the rule file rendered from them: what AMP and the local Prometheus evaluate.

Free of aws-cdk-lib, so the local tools (checks/metrics_harness.py, tools.preview) load it without
starting the CDK's Node.js runtime.
"""

from __future__ import annotations

import yaml

from .manifests import MANIFESTS_DIR, load_documents
from .traffic import MeshService

METRICS_DIR = MANIFESTS_DIR / "metrics"
SCRAPE_CONFIG_FILE = METRICS_DIR / "prometheus" / "scrape-config.yaml"
RULES_FILE = METRICS_DIR / "prometheus" / "rules.yaml"
SCRAPER_RBAC_FILE = METRICS_DIR / "scraper-rbac.yaml"
DASHBOARD_FILE = METRICS_DIR / "dashboards" / "catalogdetail-traffic.json"
# Cilium's metrics ports (chart defaults): agent 9962, operator 9963, cilium-envoy 9964, Hubble 9965.
METRICS_PORTS = (9962, 9965)
RULES_NAMESPACE = "cilium-mesh"
WEIGHTS_GROUP = "catalogdetail-weights"


def weights_group(policy: MeshService) -> dict:
    """The configured split as series (catalogdetail:weight:ratio{version=...}), which the share and
    no-traffic rules compare with; rendered from the traffic policy, its one source."""
    total = sum(policy.weights.values())
    return {
        "name": WEIGHTS_GROUP,
        "rules": [
            {"record": "catalogdetail:weight:ratio", "expr": f"vector({policy.weights[v] / total:g})", "labels": {"version": v}}
            for v in policy.versions
        ],
    }


def rule_file(policy: MeshService) -> str:
    """What AMP and the local Prometheus evaluate: manifests/metrics/prometheus/rules.yaml and the weights group."""
    (rules,) = load_documents(RULES_FILE)
    return yaml.safe_dump({"groups": [*rules["groups"], weights_group(policy)]}, sort_keys=False, width=1000)
