"""The traffic policy: what it generates, what Cilium makes of it, and how cilium-envoy's Envoy behaves with it."""

import copy
import dataclasses
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from cilium_mesh.traffic import (
    MAX_TOTAL_WEIGHT,
    CircuitBreakers,
    MeshService,
    DeclarationError,
    cluster_references,
    duration,
    qualified_name,
    qualify_like_cilium,
)
from conftest import CONTEXT, ROOT
from checks.cilium_envoy import ENVOY_BUILDS, build_for
from checks.envoy_harness import Fault, cilium_xds_bootstrap, run, running, send_and_collect, validate_bootstrap

DEFAULT = MeshService(weights={"v1": 50, "v2": 50})
CANARY = MeshService(weights={"v1": 90, "v2": 10})
TAG = build_for(CONTEXT["cilium_version"]).tag
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


@pytest.mark.parametrize("policy", [DEFAULT, CANARY, MeshService(weights={"v1": 1, "v2": 0, "v3": 2})])
def test_every_cluster_reference_resolves_after_cilium_qualifies_names(policy):
    resources = qualify_like_cilium(policy.envoy_resources(), policy.namespace, policy.cec_name)
    eds = {policy.eds_cluster(v) for v in policy.versions}
    assert cluster_references(resources) <= defined_clusters(resources)
    assert eds <= defined_clusters(resources)
    listener = next(r for r in resources if r["@type"].endswith("Listener"))
    route = next(r for r in resources if r["@type"].endswith("RouteConfiguration"))
    rds = listener["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"]
    assert rds == route["name"] == f"workshop/{policy.cec_name}/route"


def test_cilium_qualifies_the_failover_clusters_and_leaves_their_dns_names():
    resources = qualify_like_cilium(DEFAULT.envoy_resources(), "workshop", DEFAULT.cec_name)
    failover = next(r for r in resources if r.get("type") == "STRICT_DNS")
    assert failover["name"] == failover["load_assignment"]["cluster_name"] == "workshop/catalogdetail-traffic/catalogdetail-v1"
    hosts = [e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] for e in failover["load_assignment"]["endpoints"]]
    assert hosts == [
        {"address": "catalogdetailv1.workshop.svc.cluster.local", "port_value": 3000},
        {"address": "catalogdetailv2.workshop.svc.cluster.local", "port_value": 3000},
    ]


def test_failover_priorities_put_own_version_first_then_heaviest():
    policy = MeshService(weights={"v1": 10, "v2": 30, "v3": 60})
    clusters = {r["name"]: r for r in policy.envoy_resources() if r.get("type") == "STRICT_DNS"}
    endpoints = clusters["catalogdetail-v1"]["load_assignment"]["endpoints"]
    assert [(e["priority"], e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"].split(".")[0])
            for e in endpoints] == [(0, "catalogdetailv1"), (1, "catalogdetailv3"), (2, "catalogdetailv2")]  # fmt: skip


def test_drained_versions_take_no_traffic_unless_opted_in():
    drained = MeshService(weights={"v1": 100, "v2": 0})
    route = drained.route_configuration()["virtual_hosts"][0]["routes"][-1]["route"]
    assert route["weighted_clusters"]["clusters"] == [{"name": "catalogdetail-v1", "weight": 100}]
    assert drained.failover_order("v1") == ["v1"]
    assert "catalogdetailv2.workshop" not in json.dumps(drained.envoy_resources())
    opted_in = MeshService(weights={"v1": 100, "v2": 0}, failover_to_drained=True)
    assert opted_in.failover_order("v1") == ["v1", "v2"]


def test_durations_are_protobuf_durations():
    assert [duration(ms) for ms in (1, 999, 1000, 1500, 1234567, 10**9)] == [
        "0.001s", "0.999s", "1s", "1.500s", "1234.567s", "1000000s",
    ]  # fmt: skip


def test_uses_only_what_cilium_envoy_builds():
    text = json.dumps(MeshService.walkthrough().envoy_resources() + DEFAULT.envoy_resources())
    for absent in ("aggregate", "previous_hosts", "previous_priorities", "retry_host_predicate", "lua"):
        assert absent not in text


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"v1": -1, "v2": 1}, "non-negative integer"),
        ({"v1": 0}, "positive sum"),
        ({}, "at least one version"),
        ({"v1": True}, "non-negative integer"),
        ({"v1": MAX_TOTAL_WEIGHT, "v2": 1}, "at most 4294967295"),
        ({"V1": 1}, "DNS-1123"),
        ({"v" + "x" * 60: 1}, "DNS-1123"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(DeclarationError, match=message):
        MeshService(weights=weights)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout_ms", 0, "timeout_ms must be a positive integer"),
        ("connect_timeout_ms", -5, "connect_timeout_ms must be a positive integer"),
        ("pin_header", "X Version", "lower-case HTTP header"),
        ("service", "Catalog", "DNS-1123"),
        ("port", 70000, "port must be 1-65535"),
        ("timeout_ms", 10**9, "at most 86400000"),
        ("circuit_breakers", CircuitBreakers(max_retries=0), "circuit_breakers.max_retries must be an integer from 1"),
        ("circuit_breakers", CircuitBreakers(max_connections=True), "circuit_breakers.max_connections"),
    ],
)
def test_bad_settings_are_rejected(field, value, message):
    with pytest.raises(DeclarationError, match=message):
        MeshService(weights={"v1": 1}, **{field: value})


def test_every_cluster_sets_its_circuit_breakers():
    """Cilium fills its own, version-dependent limits only into clusters that set none."""
    for policy in (DEFAULT, MeshService.walkthrough()):
        clusters = [r for r in policy.envoy_resources() if r["@type"].endswith(".Cluster")]
        assert clusters and all(
            c["circuit_breakers"] == {"thresholds": [{"max_connections": 1024, "max_pending_requests": 1024,
                                                      "max_requests": 1024, "max_retries": 128}]}
            for c in clusters
        )  # fmt: skip


def test_a_version_needs_its_service():
    with pytest.raises(DeclarationError, match="no Service catalogdetailv3"):
        MeshService(weights={"v3": 1}).check_services({"catalogdetail", "catalogdetailv1", "catalogdetailv2"})


# --- cilium-envoy's Envoy -----------------------------------------------------------------------


def aggregate_cluster():
    return {
        "name": "catalogdetail-failover",
        "connect_timeout": "2s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": ["workshop/catalogdetailv1", "workshop/catalogdetailv2"],
            },
        },
    }


@pytest.mark.envoy
@pytest.mark.parametrize("tag", sorted(ENVOY_BUILDS))
def test_cilium_envoy_set_rejects_an_aggregate_cluster(tag):
    bootstrap = cilium_xds_bootstrap(DEFAULT)
    bootstrap["static_resources"]["clusters"].append(aggregate_cluster())
    result = validate_bootstrap(bootstrap, tag)
    assert result.returncode != 0
    assert "Didn't find a registered cluster factory implementation" in result.stderr + result.stdout


@pytest.mark.envoy
@pytest.mark.parametrize("tag", sorted(ENVOY_BUILDS))
def test_cilium_envoy_set_rejects_retry_predicates(tag):
    bootstrap = cilium_xds_bootstrap(DEFAULT)
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("rds")
    route = copy.deepcopy(DEFAULT.route_configuration())
    route.pop("@type")
    route["virtual_hosts"][0]["routes"][-1]["route"]["retry_policy"]["retry_host_predicate"] = [
        {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}
    ]  # fmt: skip
    hcm["route_config"] = qualify_like_cilium([{**route, "@type": "x.RouteConfiguration"}], "workshop", DEFAULT.cec_name)[0]
    hcm["route_config"].pop("@type")
    result = validate_bootstrap(bootstrap, tag)
    assert result.returncode != 0 and "previous_hosts" in result.stderr + result.stdout


@pytest.mark.envoy
@pytest.mark.parametrize("tag", sorted(ENVOY_BUILDS))
@pytest.mark.parametrize("policy", [DEFAULT, CANARY, MeshService.walkthrough()], ids=["default", "canary", "walkthrough"])
def test_cilium_envoy_accepts_the_resources_as_cilium_delivers_them(policy, tag):
    """Listener, EDS and failover clusters with Cilium's gRPC RDS/EDS sources, in every supported Cilium's build."""
    result = validate_bootstrap(cilium_xds_bootstrap(policy), tag)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_supported_cilium_release_maps_to_a_known_cilium_envoy_build():
    from cilium_mesh.versions import CILIUM_RELEASES

    tags = {build_for(f"{minor}.{patch}").tag for minor, patch in CILIUM_RELEASES.items()}
    assert tags == set(ENVOY_BUILDS)


@pytest.mark.envoy
def test_cilium_envoy_rejects_a_typo_in_a_deployed_cluster():
    bootstrap = cilium_xds_bootstrap(DEFAULT)
    dns = next(c for c in bootstrap["static_resources"]["clusters"] if c.get("type") == "STRICT_DNS")
    dns["outlier_detection"]["consecutive_5xxx"] = 5
    result = validate_bootstrap(bootstrap, TAG)
    assert result.returncode != 0 and "consecutive_5xxx" in result.stderr + result.stdout


@pytest.mark.envoy
def test_route_typo_is_rejected_when_served_over_rds(monkeypatch):
    """The route configuration reaches Envoy over RDS in the harness too: a typo there fails the run."""
    original = MeshService.route_configuration

    def with_typo(self):
        route = original(self)
        route["virtual_hosts"][0]["routes"][-1]["route"]["retry_policy"]["retry_onn"] = "5xx"
        return route

    monkeypatch.setattr(MeshService, "route_configuration", with_typo)
    with pytest.raises(RuntimeError):
        run(DEFAULT, TAG, 10)


def test_walkthrough_policy_is_the_walkthroughs_yaml():
    """Step 11's CiliumEnvoyConfig: 50/50, retry on 5xx three times with 1s per try, local-origin ejection after 2."""
    resources = MeshService.walkthrough().envoy_resources()
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


@pytest.mark.envoy
@pytest.mark.parametrize("policy", [DEFAULT, CANARY], ids=["50-50", "90-10"])
def test_split_follows_the_weights(policy):
    result = run(policy, TAG, SPLIT_REQUESTS)
    assert result.answered == SPLIT_REQUESTS
    assert_split(result, dict(policy.weights))


@pytest.mark.envoy
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_route_pins_every_request(version):
    result = run(CANARY, TAG, 200, headers={"x-catalog-version": version})
    assert result.versions == {version: 200}


# The fault runs, each its own Envoy and stand-ins on loopback, once per module. The walkthrough's runs
# spend their time in Envoy's retry back-off (idle), so they run in a thread beside the others; ours run
# one after another, since their retries and ejections depend on timing (all at once, a 'down' run on a
# loaded machine once answered only 99.2%).
FAULT_RUNS = {
    ("this policy", "5xx:0.3"): (DEFAULT, FAULT_REQUESTS, {"v2": Fault("errors", 0.3)}),
    ("this policy", "down"): (DEFAULT, FAULT_REQUESTS, {"v2": Fault("down")}),
    ("this policy", "empty"): (DEFAULT, FAULT_REQUESTS, {"v2": Fault("empty")}),
    ("drained", "down"): (MeshService(weights={"v1": 100, "v2": 0}), 15, {"v1": Fault("down")}),
    # 'down' backs off between its retries: fewer requests.
    ("walkthrough", "down"): (MeshService.walkthrough(), 120, {"v2": Fault("down")}),
    ("walkthrough", "empty"): (MeshService.walkthrough(), FAULT_REQUESTS, {"v2": Fault("empty")}),
}


@pytest.fixture(scope="module")
def fault_runs() -> dict:
    beside = [key for key in FAULT_RUNS if key[0] == "walkthrough"]

    def runs(keys):
        return {key: run(FAULT_RUNS[key][0], TAG, FAULT_RUNS[key][1], FAULT_RUNS[key][2]) for key in keys}

    with ThreadPoolExecutor(max_workers=1) as pool:
        walkthrough = pool.submit(runs, beside)
        results = runs([key for key in FAULT_RUNS if key not in beside])
        return {**results, **walkthrough.result()}


@pytest.mark.parametrize("fault", ["5xx:0.3", "down", "empty"])
def test_failover_keeps_answering_when_one_version_fails(fault_runs, fault):
    result = fault_runs["this policy", fault]
    assert result.answered_share >= 0.995, (result.statuses, result.retries)


def test_a_drained_version_takes_no_failover_traffic(fault_runs):
    """Every request fails and backs off between retries, so few suffice."""
    result = fault_runs["drained", "down"]
    assert result.versions.get("v2", 0) == 0 and result.answered == 0


@pytest.mark.parametrize("fault", ["down", "empty"])
def test_walkthrough_policy_loses_the_share_of_a_failing_version(fault_runs, fault):
    """The contrast the failover fixes, on the same harness."""
    result = fault_runs["walkthrough", fault]
    assert 0.35 <= result.answered_share <= 0.65


def test_preview_command_prints_the_table(preview_run):
    assert preview_run.returncode == 0, preview_run.stderr
    lines = preview_run.stdout.splitlines()
    assert any("cilium-envoy v1.36.9" in line for line in lines)
    answered = [line.split("answered ")[1].split("%")[0] for line in lines if "answered" in line]
    # 200 requests, half of them to the walkthrough's dead version: at most 65% answered is 4.2 standard
    # deviations above its expected 50%.
    assert float(answered[0]) >= 99.5 and float(answered[1]) <= 65
    assert preview_run.stdout.count("95%") == 1 and "walkthrough" in preview_run.stdout
    (recorded,) = [line for line in lines if line.startswith("Prometheus, this policy's rules")]
    assert "share v1 100.0%;" in recorded and "failover req/s v2->v1" in recorded, recorded


@pytest.mark.envoy
def test_a_version_that_goes_down_mid_run_fails_over():
    """What `preview --plot` does part-way: the stand-in stops accepting and ends its open connections."""
    with running(DEFAULT, TAG) as (envoy, _, stand_ins):
        before = send_and_collect(envoy, DEFAULT, {}, 200)
        stand_ins["2"].fail(Fault("down"))
        after = send_and_collect(envoy, DEFAULT, {}, 200)
    assert before.versions["v2"] > 50
    assert after.statuses == {200: 200} and after.versions == {"v1": 200}, (after.statuses, after.versions)


def test_preview_rejects_bad_flags_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "tools.preview", "--fault", "v2=sometimes"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("preview:")]
    assert errors == ["preview: fault 'sometimes': use 5xx:<ratio>, down or empty"]


# --- Cilium's verdicts in the Envoy run (checks/datapath.py) ------------------------------------


@pytest.mark.envoy
def test_the_harness_denies_what_cilium_would_deny():
    """With the version Services as ClusterIPs (main before headless Services), the model denies the
    failover clusters as world: split requests get Cilium's 403, pinned ones (EDS, pods) still answer."""
    from checks.datapath import Deployed, cec_statuses

    statuses = cec_statuses(Deployed.of("eni", DEFAULT).with_cluster_ip_version_services())
    split = run(DEFAULT, TAG, 50, statuses=statuses)
    assert split.statuses == {403: 50} and split.retries == 0
    pinned = run(DEFAULT, TAG, 20, headers={"x-catalog-version": "v2"}, statuses=statuses)
    assert pinned.versions == {"v2": 20}


@pytest.mark.envoy
def test_the_harness_drops_what_the_vpc_would_drop():
    """A dropped destination's connects time out; after two the host is ejected and failover carries
    its share (connect timeout 0.5 s here, below the 1 s per-try timeout, so every try ends as a connect
    failure and none is lost to the request timeout)."""
    policy = dataclasses.replace(DEFAULT, connect_timeout_ms=500)
    result = run(policy, TAG, 20, statuses={("dns", "v2"): "dropped"})
    assert result.versions.get("v2", 0) == 0 and result.ejections >= 1 and result.answered == 20, result.statuses


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_the_shipped_stack_has_every_verdict_delivered(datapath):
    from checks.envoy_harness import model_statuses

    assert set(model_statuses(DEFAULT, datapath).values()) == {"delivered"}
