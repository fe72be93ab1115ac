"""The traffic policy: what it generates, what Cilium makes of it, and how a real Envoy behaves with it."""

import copy
import json
import math
import subprocess
import sys

import pytest
from cilium_mesh.traffic import (
    TrafficPolicy,
    TrafficPolicyError,
    cluster_references,
    qualified_name,
    qualify_like_cilium,
)
from conftest import ROOT
from tools.envoy_harness import Fault, deployed_form_bootstrap, local_bootstrap, run, validate_bootstrap

DEFAULT = TrafficPolicy(weights={"v1": 50, "v2": 50})
CANARY = TrafficPolicy(weights={"v1": 90, "v2": 10})
PORTS = {"v1": [40001], "v2": [40002]}
SPLIT_REQUESTS = 2000
FAULT_REQUESTS = 1000
# |share - weight| within 4.5 standard errors: a correct split fails this about once in 150,000 runs.
SIGMAS = 4.5


def defined_clusters(resources):
    return {r["name"] for r in resources if r["@type"].endswith(".Cluster")}


# --- what Cilium makes of the resources --------------------------------------------------------


def test_qualified_name_follows_cilium():
    assert qualified_name("workshop", "cec", "route") == "workshop/cec/route"
    assert qualified_name("workshop", "cec", "workshop/catalogdetailv1") == "workshop/catalogdetailv1"
    assert qualified_name("workshop", "cec", "other/x", force_namespace=True) == "workshop/cec/other/x"
    assert qualified_name("workshop", "cec", "workshop/x", force_namespace=True) == "workshop/x"
    assert qualified_name("workshop", "cec", "") == ""


@pytest.mark.parametrize("policy", [DEFAULT, CANARY, TrafficPolicy(weights={"v1": 1, "v2": 0, "v3": 2})])
def test_every_cluster_reference_resolves_after_cilium_qualifies_names(policy):
    resources = qualify_like_cilium(policy.envoy_resources(), policy.namespace, policy.name)
    eds = {policy.eds_cluster(v) for v in policy.versions}
    assert cluster_references(resources) <= defined_clusters(resources)
    assert eds <= defined_clusters(resources)
    listener = next(r for r in resources if r["@type"].endswith("Listener"))
    route = next(r for r in resources if r["@type"].endswith("RouteConfiguration"))
    rds = listener["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"]
    assert rds == route["name"] == f"workshop/{policy.name}/route"


def test_aggregate_members_are_written_qualified_because_cilium_does_not_rewrite_them():
    """An unqualified member would stay unqualified while its cluster gets a prefix: a dangling reference."""
    resources = DEFAULT.envoy_resources()
    broken = copy.deepcopy(resources)
    for resource in broken:
        if "cluster_type" in resource:
            resource["cluster_type"]["typed_config"]["clusters"] = ["catalogdetail-local"]
    broken.append({**copy.deepcopy(resources[2]), "name": "catalogdetail-local"})
    qualified = qualify_like_cilium(broken, "workshop", DEFAULT.name)
    assert not cluster_references(qualified) <= defined_clusters(qualified)


def test_failover_order_puts_own_version_first_then_heaviest():
    policy = TrafficPolicy(weights={"v1": 10, "v2": 30, "v3": 60})
    aggregates = {
        r["name"]: r["cluster_type"]["typed_config"]["clusters"] for r in policy.envoy_resources() if "cluster_type" in r
    }
    assert aggregates["catalogdetail-v1-failover"] == [
        "workshop/catalogdetailv1",
        "workshop/catalogdetailv3",
        "workshop/catalogdetailv2",
    ]


def test_zero_weight_versions_take_no_share_but_stay_failover_targets():
    policy = TrafficPolicy(weights={"v1": 100, "v2": 0})
    route = policy.route_configuration()["virtual_hosts"][0]["routes"][-1]["route"]
    assert route["weighted_clusters"]["clusters"] == [{"name": "catalogdetail-v1-failover", "weight": 100}]
    assert "workshop/catalogdetailv2" in json.dumps(policy.envoy_resources())


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"v1": -1, "v2": 1}, "non-negative integer"),
        ({"v1": 0}, "positive sum"),
        ({}, "at least one version"),
        ({"v1": True}, "non-negative integer"),
        ({"V1": 1}, "DNS-1123"),
        ({"v" + "x" * 60: 1}, "DNS-1123"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(TrafficPolicyError, match=message):
        TrafficPolicy(weights=weights)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("request_timeout_ms", 0, "request_timeout_ms must be a positive integer"),
        ("connect_timeout_ms", -5, "connect_timeout_ms must be a positive integer"),
        ("pin_header", "X Version", "lower-case HTTP header"),
        ("service", "Catalog", "DNS-1123"),
        ("port", 70000, "port must be 1-65535"),
    ],
)
def test_bad_settings_are_rejected(field, value, message):
    with pytest.raises(TrafficPolicyError, match=message):
        TrafficPolicy(weights={"v1": 1}, **{field: value})


def test_a_version_needs_its_service():
    with pytest.raises(TrafficPolicyError, match="no Service catalogdetailv3"):
        TrafficPolicy(weights={"v3": 1}).check_services({"catalogdetail", "catalogdetailv1", "catalogdetailv2"})


# --- a real Envoy ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [DEFAULT, CANARY, TrafficPolicy.walkthrough()], ids=["default", "canary", "walkthrough"])
@pytest.mark.parametrize("form", ["as-deployed", "local"])
def test_real_envoy_accepts_the_deployed_resources(policy, form):
    """As deployed: listener, EDS clusters and aggregates with Cilium's RDS/EDS sources; local: the
    route configuration inline and endpoints on loopback, as the preview runs them."""
    bootstrap = deployed_form_bootstrap(policy) if form == "as-deployed" else local_bootstrap(policy, PORTS)
    result = validate_bootstrap(bootstrap)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("path", "typo"),
    [(("retry_policy",), "retry_onn"), (("weighted_clusters",), "total_weigth")],
)
def test_real_envoy_rejects_a_typo(path, typo):
    bootstrap = local_bootstrap(DEFAULT, PORTS)
    route = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    action = route["route_config"]["virtual_hosts"][0]["routes"][-1]["route"]
    action[path[0]][typo] = 1
    result = validate_bootstrap(bootstrap)
    assert result.returncode != 0
    assert typo in result.stderr + result.stdout


def test_real_envoy_rejects_a_typo_in_a_deployed_cluster():
    bootstrap = deployed_form_bootstrap(DEFAULT)
    eds = next(c for c in bootstrap["static_resources"]["clusters"] if c.get("type") == "EDS")
    eds["outlier_detection"]["consecutive_5xxx"] = 5
    result = validate_bootstrap(bootstrap)
    assert result.returncode != 0 and "consecutive_5xxx" in result.stderr + result.stdout


def test_walkthrough_policy_is_the_walkthroughs_yaml():
    """Step 11's CiliumEnvoyConfig: 50/50, retry on 5xx three times with 1s per try, local-origin ejection after 2."""
    resources = TrafficPolicy.walkthrough().envoy_resources()
    route = next(r for r in resources if r["@type"].endswith("RouteConfiguration"))
    (split,) = route["virtual_hosts"][0]["routes"]
    assert split["route"]["weighted_clusters"]["clusters"] == [
        {"name": "workshop/catalogdetailv1", "weight": 50},
        {"name": "workshop/catalogdetailv2", "weight": 50},
    ]
    assert split["route"]["retry_policy"] == {"retry_on": "5xx", "num_retries": 3, "per_try_timeout": "1s"}
    clusters = [r for r in resources if r["@type"].endswith(".Cluster")]
    assert [c["name"] for c in clusters] == ["workshop/catalogdetailv1", "workshop/catalogdetailv2"]
    for cluster in clusters:
        assert cluster["connect_timeout"] == "2s" and cluster["lb_policy"] == "ROUND_ROBIN"
        assert cluster["outlier_detection"]["split_external_local_origin_errors"] is True
        assert cluster["outlier_detection"]["consecutive_local_origin_failure"] == 2


def assert_split(result, weights):
    total = sum(weights.values())
    for version, weight in weights.items():
        expected = weight / total
        tolerance = SIGMAS * math.sqrt(expected * (1 - expected) / result.answered)
        assert abs(result.share(version) - expected) <= tolerance, (version, result.share(version), expected)


@pytest.mark.parametrize("policy", [DEFAULT, CANARY], ids=["50-50", "90-10"])
def test_split_follows_the_weights(policy):
    result = run(policy, SPLIT_REQUESTS)
    assert result.answered == SPLIT_REQUESTS
    assert_split(result, dict(policy.weights))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_route_pins_every_request(version):
    result = run(CANARY, 200, headers={"x-catalog-version": version})
    assert result.versions == {version: 200}


@pytest.mark.parametrize("fault", ["5xx:0.3", "down", "empty"])
def test_failover_keeps_answering_when_one_version_fails(fault):
    result = run(DEFAULT, FAULT_REQUESTS, {"v2": Fault.parse(fault)})
    assert result.answered_share >= 0.995, (result.statuses, result.retries)


def test_walkthrough_policy_loses_the_share_of_a_version_with_no_endpoints():
    """The contrast the failover fixes: measured on the same harness."""
    result = run(TrafficPolicy.walkthrough(), FAULT_REQUESTS, {"v2": Fault("empty")})
    assert 0.4 <= result.answered_share <= 0.6


def test_preview_command_prints_the_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.preview", "--requests", "300", "--fault", "v2=empty", "--compare"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("Cilium injects at run time" in line for line in lines)
    answered = [line.split("answered ")[1].split("%")[0] for line in lines if "answered" in line]
    assert float(answered[0]) >= 99.5 and float(answered[1]) <= 60
    assert result.stdout.count("95%") == 1 and "walkthrough" in result.stdout


def test_preview_rejects_bad_flags_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "tools.preview", "--fault", "v2=sometimes"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("preview:")]
    assert errors == ["preview: fault 'sometimes': use 5xx:<ratio>, down or empty"]
