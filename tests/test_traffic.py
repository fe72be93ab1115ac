"""A service's traffic policy: what it generates, what Cilium makes of it, and how cilium-envoy's Envoy behaves with it."""

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from cilium_mesh.declaration import sample_service
from cilium_mesh.traffic import (
    IDEMPOTENT_METHODS,
    LOAD_HEADER,
    MAX_TOTAL_WEIGHT,
    CircuitBreakers,
    DeclarationError,
    MeshService,
    Mirror,
    Retries,
    Route,
    cluster_references,
    duration,
    qualified_name,
    qualify_like_cilium,
)
from conftest import CONTEXT, ROOT
from checks.cilium_envoy import ENVOY_BUILDS, build_for
from checks.datapath import Deployed, cec_statuses
from checks.envoy_harness import (
    LOOPBACK,
    Fault,
    check_services_in_envoy,
    cilium_xds_bootstrap,
    declared_destination,
    model_statuses,
    run,
    running,
    send,
    send_and_collect,
    validate_bootstrap,
    wait_for_mirror,
    walkthrough,
)

SAMPLE = sample_service()
DEFAULT = dataclasses.replace(SAMPLE, weights={"v1": 50, "v2": 50})
CANARY = dataclasses.replace(SAMPLE, weights={"v1": 90, "v2": 10})
WALKTHROUGH = walkthrough(DEFAULT)
TAG = build_for(CONTEXT["cilium_version"]).tag
SPLIT_REQUESTS = 2000
FAULT_REQUESTS = 1000
# |share - weight| within 4.5 standard deviations: a correct split fails this about once in 150,000 runs.
SIGMAS = 4.5


def with_v3(weights):
    """The sample with a third version declared."""
    return dataclasses.replace(SAMPLE, versions={**SAMPLE.versions, "v3": {"app": "catalogdetail", "version": "v3"}}, weights=weights)


# A service that is not the sample: its own name, namespace, port and pod port, three versions (v3 drained),
# and routes before the split, in an order that matters.
PAYMENTS = MeshService(
    name="payments",
    namespace="shop",
    port=8080,
    target_port=9090,
    versions={v: {"app": "payments", "track": v} for v in ("v1", "v2", "v3")},
    weights={"v1": 1, "v2": 1},
    pin_header="x-payments-version",
    check_path="/health",
    routes=(
        Route(path="/exact", to="v3"),
        Route(path_prefix="/api/v2", to="v2"),
        Route(headers={"x-beta": "yes"}, to="v3"),
        Route(path_prefix="/api/open", to="split"),
        Route(path_prefix="/api", to="v1"),
        Route(methods=("POST", "PATCH"), to="v3"),
    ),
)


def defined_clusters(resources):
    return {r["name"] for r in resources if r["@type"].endswith(".Cluster")}


def retried_route(route_configuration: dict) -> dict:
    """The first route with a retry policy (the split's and pins' idempotent methods have one each)."""
    return next(r for r in route_configuration["virtual_hosts"][0]["routes"] if "retry_policy" in r["route"])


# --- what Cilium makes of the resources --------------------------------------------------------


def test_qualified_name_follows_cilium():
    assert qualified_name("workshop", "cec", "route") == "workshop/cec/route"
    assert qualified_name("workshop", "cec", "workshop/catalogdetailv1") == "workshop/catalogdetailv1"
    assert qualified_name("workshop", "cec", "other/x", force_namespace=True) == "workshop/cec/other/x"
    assert qualified_name("workshop", "cec", "workshop/x", force_namespace=True) == "workshop/x"
    assert qualified_name("workshop", "cec", "") == ""


@pytest.mark.parametrize("policy", [DEFAULT, CANARY, with_v3({"v1": 1, "v2": 0, "v3": 2}), PAYMENTS], ids=["default", "canary", "v3", "payments"])
def test_every_cluster_reference_resolves_after_cilium_qualifies_names(policy):
    resources = qualify_like_cilium(policy.envoy_resources(), policy.namespace, policy.cec_name)
    eds = {policy.eds_cluster(v) for v in policy.versions}
    assert cluster_references(resources) <= defined_clusters(resources)
    assert eds <= defined_clusters(resources)
    listener = next(r for r in resources if r["@type"].endswith("Listener"))
    route = next(r for r in resources if r["@type"].endswith("RouteConfiguration"))
    rds = listener["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"]
    assert rds == route["name"] == f"{policy.namespace}/{policy.cec_name}/route"


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
    policy = with_v3({"v1": 10, "v2": 30, "v3": 60})
    clusters = {r["name"]: r for r in policy.envoy_resources() if r.get("type") == "STRICT_DNS"}
    endpoints = clusters["catalogdetail-v1"]["load_assignment"]["endpoints"]
    assert [(e["priority"], e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"].split(".")[0])
            for e in endpoints] == [(0, "catalogdetailv1"), (1, "catalogdetailv3"), (2, "catalogdetailv2")]  # fmt: skip


def test_drained_versions_take_no_traffic_unless_opted_in():
    drained = dataclasses.replace(SAMPLE, weights={"v1": 100, "v2": 0})
    route = drained.route_configuration()["virtual_hosts"][0]["routes"][-1]["route"]
    assert [(c["name"], c["weight"]) for c in route["weighted_clusters"]["clusters"]] == [("catalogdetail-v1", 100)]
    assert drained.failover_order("v1") == ["v1"]
    assert "catalogdetailv2.workshop" not in json.dumps(drained.envoy_resources())
    opted_in = dataclasses.replace(drained, failover_to_drained=True)
    assert opted_in.failover_order("v1") == ["v1", "v2"]


def test_durations_are_protobuf_durations():
    assert [duration(ms) for ms in (1, 999, 1000, 1500, 1234567, 10**9)] == [
        "0.001s", "0.999s", "1s", "1.500s", "1234.567s", "1000000s",
    ]  # fmt: skip


def test_uses_only_what_cilium_envoy_builds():
    text = json.dumps(WALKTHROUGH.envoy_resources() + DEFAULT.envoy_resources() + PAYMENTS.envoy_resources())
    for absent in ("aggregate", "previous_hosts", "previous_priorities", "retry_host_predicate", "lua"):
        assert absent not in text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights": {"v1": -1, "v2": 1}}, "services[catalogdetail].weights.v1: must be a non-negative integer (got -1)"),
        ({"weights": {"v1": 0}}, "services[catalogdetail].weights: must have a positive sum (got all zero)"),
        ({"versions": {}}, "services[catalogdetail].versions: declare at least one version and its pods' labels"),
        ({"weights": {"v1": True}}, "services[catalogdetail].weights.v1: must be a non-negative integer (got True)"),
        ({"weights": {"v1": MAX_TOTAL_WEIGHT, "v2": 1}},
         "services[catalogdetail].weights: must sum to at most 4294967295 (Envoy's uint32; got 4294967296)"),
        ({"weights": {"V1": 1}}, "services[catalogdetail].weights.V1: version V1 is not declared (versions: v1, v2)"),
        ({"versions": {"V1": {"app": "x"}}, "weights": None},
         "services[catalogdetail].versions.V1: must make a DNS label Service name 'catalogdetail<version>' (a-z, 0-9, '-', at most 63)"),
        ({"versions": {"v" + "x" * 60: {"app": "x"}}, "weights": None},
         f"services[catalogdetail].versions.v{'x' * 60}: must make a DNS label Service name 'catalogdetail<version>' (a-z, 0-9, '-', at most 63)"),
    ],
)  # fmt: skip
def test_bad_weights_are_rejected(changes, message):
    with pytest.raises(DeclarationError) as error:
        dataclasses.replace(SAMPLE, **changes)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout_ms", 0, "services[catalogdetail].timeout_ms: must be a whole number from 1 to 86400000 (got 0)"),
        ("connect_timeout_ms", -5, "services[catalogdetail].connect_timeout_ms: must be a whole number from 1 to 86400000 (got -5)"),
        ("pin_header", "X Version",
         "services[catalogdetail].pin_header: 'X Version' is not an HTTP header name in lower case (an RFC 9110 token)"),
        ("name", "Catalog", "services['Catalog'].name: 'Catalog' is not a DNS label (a-z, 0-9, '-', at most 63)"),
        ("port", 70000, "services[catalogdetail].port: must be 1-65535 (got 70000)"),
        ("timeout_ms", 10**9, "services[catalogdetail].timeout_ms: must be a whole number from 1 to 86400000 (got 1000000000)"),
        ("circuit_breakers", CircuitBreakers(max_retries=0),
         "services[catalogdetail].circuit_breakers.max_retries: must be a whole number from 1 to 4294967295 (got 0)"),
        ("circuit_breakers", CircuitBreakers(max_connections=True),
         "services[catalogdetail].circuit_breakers.max_connections: must be a whole number from 1 to 4294967295 (got True)"),
        ("retries", Retries(methods=("GET", "POST")),
         "services[catalogdetail].retries.methods: POST are not idempotent: a retry may repeat their effect;"
         " set retries.non_idempotent true to retry them anyway"),
    ],
)  # fmt: skip
def test_bad_settings_are_rejected(field, value, message):
    with pytest.raises(DeclarationError) as error:
        dataclasses.replace(SAMPLE, **{field: value})
    assert str(error.value) == message


def test_every_cluster_sets_its_circuit_breakers():
    """Cilium fills its own, version-dependent limits only into clusters that set none."""
    for policy in (DEFAULT, WALKTHROUGH, PAYMENTS):
        clusters = [r for r in policy.envoy_resources() if r["@type"].endswith(".Cluster")]
        assert clusters and all(
            c["circuit_breakers"] == {"thresholds": [{"max_connections": 1024, "max_pending_requests": 1024,
                                                      "max_requests": 1024, "max_retries": 128}]}
            for c in clusters
        )  # fmt: skip


def test_a_version_needs_its_service():
    with pytest.raises(DeclarationError, match="no Service catalogdetailv3"):
        with_v3({"v3": 1}).check_services({"catalogdetail", "catalogdetailv1", "catalogdetailv2"})


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
    retried_route(route)["route"]["retry_policy"]["retry_host_predicate"] = [
        {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}
    ]  # fmt: skip
    hcm["route_config"] = qualify_like_cilium([{**route, "@type": "x.RouteConfiguration"}], "workshop", DEFAULT.cec_name)[0]
    hcm["route_config"].pop("@type")
    result = validate_bootstrap(bootstrap, tag)
    assert result.returncode != 0 and "previous_hosts" in result.stderr + result.stdout


# Every feature a declaration can render at once: routes, a mirror, a failover order, non-idempotent retries.
FEATURED = dataclasses.replace(
    PAYMENTS,
    weights={"v1": 2, "v2": 1, "v3": 1},
    mirror=Mirror("v3", 12.5),
    failover=("v3", "v1", "v2"),
    retries=Retries(methods=(*IDEMPOTENT_METHODS, "POST"), non_idempotent=True),
)


@pytest.mark.envoy
@pytest.mark.parametrize("tag", sorted(ENVOY_BUILDS))
@pytest.mark.parametrize("policy", [DEFAULT, CANARY, WALKTHROUGH, FEATURED], ids=["default", "canary", "walkthrough", "featured"])
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
        retried_route(route)["route"]["retry_policy"]["retry_onn"] = "5xx"
        return route

    monkeypatch.setattr(MeshService, "route_configuration", with_typo)
    with pytest.raises(RuntimeError):
        run(DEFAULT, TAG, 10)


def test_walkthrough_policy_is_the_walkthroughs_yaml():
    """Step 11's CiliumEnvoyConfig: 50/50, retry on 5xx three times with 1s per try, local-origin ejection after 2."""
    resources = WALKTHROUGH.envoy_resources()
    route = next(r for r in resources if r["@type"].endswith("RouteConfiguration"))
    (split,) = route["virtual_hosts"][0]["routes"]
    assert [(c["name"], c["weight"]) for c in split["route"]["weighted_clusters"]["clusters"]] == [
        ("workshop/catalogdetailv1", 50),
        ("workshop/catalogdetailv2", 50),
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
    """And every answer says, in x-cilium-mesh-destination, the version that answered it."""
    result = run(policy, TAG, SPLIT_REQUESTS)
    assert result.answered == SPLIT_REQUESTS
    assert_split(result, dict(policy.weights))
    assert result.routed == {(v, v): n for v, n in result.versions.items()}


@pytest.mark.envoy
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_route_pins_every_request(version):
    result = run(CANARY, TAG, 200, headers={"x-catalog-version": version})
    assert result.versions == {version: 200} and result.routed == {(version, version): 200}


# (method, path, headers) -> where PAYMENTS's routes send it: the first route that matches, else the split.
ROUTED_REQUESTS = [
    ("GET", "/exact", {}, "v3"),
    ("GET", "/exact/more", {}, "split"),  # path is exact, not a prefix
    ("GET", "/api/v2/items", {}, "v2"),  # also under /api: the earlier route wins
    ("GET", "/api/v2/items", {"x-beta": "yes"}, "v2"),
    ("GET", "/api/items", {"x-beta": "yes"}, "v3"),  # the header route comes before /api
    ("GET", "/api/items", {"x-beta": "no"}, "v1"),  # headers match exactly
    ("GET", "/api/open/items", {}, "split"),  # a route to the split before /api
    ("GET", "/api/items", {}, "v1"),
    ("POST", "/orders", {}, "v3"),
    ("PATCH", "/api/items", {}, "v1"),  # /api comes before the methods route
    ("DELETE", "/orders", {}, "split"),
    ("GET", "/orders", {}, "split"),
    ("GET", "/api/items", {"x-payments-version": "v2"}, "v2"),  # the pin header comes before every route
]
ROUTED_PER_CASE = 40


@pytest.fixture(scope="module")
def routed_answers():
    """Each of ROUTED_REQUESTS, ROUTED_PER_CASE times, through PAYMENTS's CiliumEnvoyConfig."""
    with running(PAYMENTS, TAG) as (envoy, _, _):
        return {(m, p, json.dumps(h)): send((LOOPBACK, envoy.port), ROUTED_PER_CASE, h, p, m)[0] for m, p, h, _ in ROUTED_REQUESTS}


@pytest.mark.envoy
@pytest.mark.parametrize(("method", "path", "headers", "expected"), ROUTED_REQUESTS,
                         ids=[f"{m} {p} {h or ''} -> {e}" for m, p, h, e in ROUTED_REQUESTS])  # fmt: skip
def test_declared_routes_send_each_request_to_its_version(routed_answers, method, path, headers, expected):
    """A service with its own name, namespace, port and pod port: its ordered routes (exact path, prefix,
    header, methods) send each request to one version, every answer naming it in x-cilium-mesh-destination;
    what no route matches goes to the split (v1 and v2 by weight, never the drained v3)."""
    answers = routed_answers[method, path, json.dumps(headers)]
    assert declared_destination(PAYMENTS, method, path, headers) == expected
    assert all(a.status == 200 and a.version == a.destination for a in answers), answers
    versions = {a.version for a in answers}
    assert versions == ({"v1", "v2"} if expected == "split" else {expected}), versions


@pytest.mark.envoy
def test_a_mirror_copies_its_share_and_drops_the_answers():
    """20% of the split's requests are copied to v2, which answers every copy 503: every request still
    answers 200 from v1; pinned requests are not copied."""
    mirrored = dataclasses.replace(SAMPLE, weights={"v1": 1, "v2": 0}, mirror=Mirror("v2", 20))
    requests = 1000
    with running(mirrored, TAG, {"v2": Fault("errors", 1.0)}) as (envoy, _, stand_ins):
        result = send_and_collect(envoy, mirrored, {}, requests)
        wait_for_mirror(envoy, mirrored)
        copies = stand_ins["v2"].mirrored
        pinned, _, _ = send((LOOPBACK, envoy.port), 100, {"x-catalog-version": "v1"}, mirrored.check_path)
        wait_for_mirror(envoy, mirrored)
        after_pinned = stand_ins["v2"].mirrored
    assert result.statuses == {200: requests} and result.routed == {("v1", "v1"): requests}
    assert abs(copies - 0.2 * requests) <= SIGMAS * math.sqrt(requests * 0.2 * 0.8), copies
    assert stand_ins["v2"].asked == {} and after_pinned == copies
    assert {a.version for a in pinned} == {"v1"}


# A version that answers every request 503; ejection set out of reach, so each try is counted exactly.
FAILING = dataclasses.replace(
    SAMPLE,
    outlier_detection=dataclasses.replace(SAMPLE.outlier_detection, consecutive_5xx=1000, failure_percentage_threshold=None),
    routes=(Route(path_prefix="/orders", methods=("GET", "POST"), to="v2"),),
)
RETRY_CASES = [  # (retries, method, path, headers, tries per request)
    (Retries(), "GET", "/catalogDetail", {"x-catalog-version": "v2"}, 4),
    (Retries(), "PUT", "/catalogDetail", {"x-catalog-version": "v2"}, 4),
    (Retries(), "DELETE", "/catalogDetail", {"x-catalog-version": "v2"}, 4),
    (Retries(), "POST", "/catalogDetail", {"x-catalog-version": "v2"}, 1),
    (Retries(), "PATCH", "/catalogDetail", {"x-catalog-version": "v2"}, 1),
    (Retries(), "GET", "/orders", {}, 4),  # a route with methods: its idempotent ones are retried
    (Retries(), "POST", "/orders", {}, 1),
    (Retries(methods=(*IDEMPOTENT_METHODS, "POST"), non_idempotent=True), "POST", "/catalogDetail", {"x-catalog-version": "v2"}, 4),
    (Retries(methods=(*IDEMPOTENT_METHODS, "POST"), non_idempotent=True), "POST", "/orders", {}, 4),
    (Retries(methods=(*IDEMPOTENT_METHODS, "POST"), non_idempotent=True), "PATCH", "/catalogDetail", {"x-catalog-version": "v2"}, 1),
]  # fmt: skip


@pytest.mark.envoy
@pytest.mark.parametrize(("retries", "method", "path", "headers", "tries"), RETRY_CASES,
                         ids=[f"{'opt-in' if r.non_idempotent else 'default'} {m} {p}" for r, m, p, _, _ in RETRY_CASES])  # fmt: skip
def test_only_idempotent_methods_are_retried_unless_opted_in(retries, method, path, headers, tries):
    """A failing version gets 1 + attempts tries of an idempotent request and one of a POST or PATCH (a
    retry might repeat its effect), unless retries.non_idempotent and retries.methods take them in."""
    service = dataclasses.replace(FAILING, retries=retries)
    requests = 5
    with running(service, TAG, {"v2": Fault("errors", 1.0)}) as (envoy, _, stand_ins):
        answers, _, _ = send((LOOPBACK, envoy.port), requests, headers, path, method)
        retried = envoy.counters().get(f"cluster.{service.eds_cluster('v2')}.upstream_rq_retry", 0)
    assert {(a.status, a.version, a.destination) for a in answers} == {(503, "v2", "v2")}
    assert stand_ins["v2"].asked == {method: requests * tries} and retried == requests * (tries - 1)


# Three versions; v2's share fails over to v3 first (the declared order), not to the heavier v1 (the default).
PRIORITIES = MeshService(
    name="ledger",
    namespace="bank",
    port=7000,
    versions={v: {"app": "ledger", "version": v} for v in ("v1", "v2", "v3")},
    weights={"v1": 2, "v2": 1, "v3": 1},
    failover=("v3", "v1", "v2"),
)


@pytest.mark.envoy
@pytest.mark.parametrize(("down", "takes_over"), [("v2", "v3"), ("v3", "v1"), ("v1", "v3")])
def test_failover_follows_the_declared_priority_order(down, takes_over):
    """With ``down``'s pods gone its destination's share goes to the next version in ``failover``, and every
    answer still names the destination the route chose."""
    assert PRIORITIES.failover_order(down)[1] == takes_over
    result = run(PRIORITIES, TAG, FAULT_REQUESTS, {down: Fault("down")})
    assert result.answered_share >= 0.995, result.statuses
    assert {answered for destination, answered in result.routed if destination == down} == {takes_over}
    assert all(destination == answered for destination, answered in result.routed if destination != down)
    total = sum(PRIORITIES.weights.values())
    expected = {v: w / total for v, w in PRIORITIES.weights.items() if v != down}
    expected[takes_over] += PRIORITIES.weights[down] / total
    assert_split(result, expected)


@pytest.mark.envoy
def test_the_load_is_counted_in_its_own_virtual_cluster():
    """Requests with x-cilium-mesh-load are counted apart in Envoy's vhost stats (the rollout gate reads them)."""
    with running(PAYMENTS, TAG) as (envoy, _, _):
        send((LOOPBACK, envoy.port), 30, {LOAD_HEADER: "1"}, PAYMENTS.check_path)
        send((LOOPBACK, envoy.port), 50, {}, PAYMENTS.check_path)
        counters = envoy.counters()
    (route,) = qualify_like_cilium([PAYMENTS.route_configuration()], PAYMENTS.namespace, PAYMENTS.cec_name)
    vhost = f"vhost.{route['virtual_hosts'][0]['name']}.vcluster"
    assert vhost == "vhost.shop/payments-traffic/payments.vcluster"
    assert (counters[f"{vhost}.load.upstream_rq_total"], counters[f"{vhost}.other.upstream_rq_total"]) == (30, 50)


@pytest.mark.envoy
def test_check_services_in_envoy_runs_every_route_of_every_service():
    """The sample, a service with routes and a mirror, and one with a failover order: every pin, route, the
    split, the mirror and each weighted version's failover, as declared."""
    mirrored = dataclasses.replace(PAYMENTS, mirror=Mirror("v3", 50))
    results = check_services_in_envoy([SAMPLE, mirrored, PRIORITIES], TAG, sample_app=True)

    def checked(key):
        return [(d.label.split(" (")[0], d.expected) for d in results[key]]

    assert checked("workshop/catalogdetail") == [
        ("pin v1 GET /catalogDetail [x-catalog-version: v1]", "v1"), ("pin v2 GET /catalogDetail [x-catalog-version: v2]", "v2"),
        ("split GET /catalogDetail", "split"),
        ("failover v1 down GET /catalogDetail", "v2"), ("failover v2 down GET /catalogDetail", "v1"),
    ]  # fmt: skip
    assert checked("shop/payments")[3:10] == [
        ("routes[0] GET /exact", "v3"), ("routes[1] GET /api/v2", "v2"), ("routes[2] GET / [x-beta: yes]", "v3"),
        ("routes[3] GET /api/open", "split"), ("routes[4] GET /api", "v1"), ("routes[5] POST /", "v3"), ("split GET /health", "split"),
    ]  # fmt: skip
    payments = {label: d for (label, _), d in zip(checked("shop/payments"), results["shop/payments"])}
    assert payments["routes[2] GET / [x-beta: yes]"].versions == {"v3": 20}
    assert set(payments["split GET /health"].versions) == {"v1", "v2"} and payments["split GET /health"].versions.total() == 200
    assert payments["mirror 50% of 320 requests"].expected == "v3"
    assert checked("bank/ledger")[1:] == [("failover v1 down GET /", "v3"), ("failover v2 down GET /", "v3"), ("failover v3 down GET /", "v1")]
    assert set(results["bank/ledger"][2].versions) == {"v1", "v3"}  # v2 down: its share to v3, v1 keeps its own


@pytest.mark.envoy
def test_check_services_in_envoy_names_a_route_that_reaches_the_wrong_version(monkeypatch):
    original = MeshService.route_configuration

    def crossed(self):
        config = original(self)
        for route in config["virtual_hosts"][0]["routes"]:
            if route["name"] == "route-1-retried-get":
                route["route"]["cluster"] = self.eds_cluster("v1")
        return config

    monkeypatch.setattr(MeshService, "route_configuration", crossed)
    with pytest.raises(AssertionError) as error:
        check_services_in_envoy([PAYMENTS], TAG)
    assert str(error.value) == "shop/payments routes[1] GET /api/v2 -> v2: v1 20; 20 of 20 not answered by the version declared"


# The fault runs, each its own Envoy and stand-ins on loopback, once per module. The walkthrough's runs
# spend their time in Envoy's retry back-off (idle), so they run in a thread beside the others; ours run
# one after another, since their retries and ejections depend on timing (all at once, a 'down' run on a
# loaded machine once answered only 99.2%).
FAULT_RUNS = {
    ("this policy", "5xx:0.3"): (DEFAULT, FAULT_REQUESTS, {"v2": Fault("errors", 0.3)}),
    ("this policy", "down"): (DEFAULT, FAULT_REQUESTS, {"v2": Fault("down")}),
    ("this policy", "empty"): (DEFAULT, FAULT_REQUESTS, {"v2": Fault("empty")}),
    ("drained", "down"): (dataclasses.replace(SAMPLE, weights={"v1": 100, "v2": 0}), 15, {"v1": Fault("down")}),
    # 'down' backs off between its retries: fewer requests.
    ("walkthrough", "down"): (WALKTHROUGH, 120, {"v2": Fault("down")}),
    ("walkthrough", "empty"): (WALKTHROUGH, FAULT_REQUESTS, {"v2": Fault("empty")}),
}


@pytest.fixture(scope="module")
def fault_runs() -> dict:
    beside = [key for key in FAULT_RUNS if key[0] == "walkthrough"]

    def runs(keys):
        return {key: run(FAULT_RUNS[key][0], TAG, FAULT_RUNS[key][1], FAULT_RUNS[key][2]) for key in keys}

    with ThreadPoolExecutor(max_workers=1) as pool:
        walkthrough_runs = pool.submit(runs, beside)
        results = runs([key for key in FAULT_RUNS if key not in beside])
        return {**results, **walkthrough_runs.result()}


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
    assert lines[0].startswith("catalogdetail-traffic: 200 requests to catalogdetail.workshop:3000/catalogDetail in Envoy")
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
        stand_ins["v2"].fail(Fault("down"))
        after = send_and_collect(envoy, DEFAULT, {}, 200)
    assert before.versions["v2"] > 50
    assert after.statuses == {200: 200} and after.versions == {"v1": 200}, (after.statuses, after.versions)


@pytest.mark.parametrize(
    ("tool", "arguments", "line"),
    [
        ("preview", ["--fault", "v2=sometimes"], "preview: fault 'sometimes': use 5xx:<ratio>, down or empty"),
        ("preview", ["--service", "shop/payments"], "preview: --service shop/payments is not declared; declared: workshop/catalogdetail"),
        ("preview", ["--weights", "v1=90,v3=10"],
         "preview: services[catalogdetail].weights.v3: version v3 is not declared (versions: v1, v2)"),
        ("measure", ["--service", "catalogdetail"], "measure: --service catalogdetail is not declared; declared: workshop/catalogdetail"),
    ],
)  # fmt: skip
def test_tools_reject_bad_flags_in_one_line(tool, arguments, line):
    result = subprocess.run(
        [sys.executable, "-m", f"tools.{tool}", *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert [text for text in result.stderr.splitlines() if text.startswith(f"{tool}:")] == [line]


# PRIORITIES as cdk.json's services declares it.
LEDGER_DECLARED = {
    "name": "ledger", "namespace": "bank", "port": 7000,
    "versions": {v: {"app": "ledger", "version": v} for v in ("v1", "v2", "v3")},
    "weights": {"v1": 2, "v2": 1, "v3": 1}, "failover": ["v3", "v1", "v2"],
}  # fmt: skip


def test_the_tools_choose_among_the_declared_services():
    from stacks.config import load_config
    from tools.preview import chosen_service

    config = load_config({**CONTEXT, "services": [LEDGER_DECLARED]})
    assert chosen_service(config, "bank/ledger") == PRIORITIES
    assert chosen_service(config, None).key == "workshop/catalogdetail"
    with pytest.raises(ValueError) as error:
        chosen_service(config, "bank/accounts")
    assert str(error.value) == "--service bank/accounts is not declared; declared: workshop/catalogdetail, bank/ledger"


@pytest.mark.envoy
@pytest.mark.prometheus
def test_preview_runs_a_declared_service(monkeypatch, capsys):
    """``--service`` previews any declared service: its port and check path, its versions, its failover order."""
    import tools.preview

    monkeypatch.setattr(tools.preview, "cdk_json_context", lambda: {**CONTEXT, "services": [LEDGER_DECLARED]})
    assert tools.preview.main(["--service", "bank/ledger", "--requests", "400", "--fault", "v2=down"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ledger-traffic: 400 requests to ledger.bank:7000/ in Envoy")
    rows = [re.match(r"(?:this policy)?\s+(v\d)\s+[\d.]+%\s+([\d.]+)%\s+\[", line) for line in lines]
    shares = {row[1]: float(row[2]) for row in rows if row}
    # v2's 25% goes to v3 (the declared order), not to the heavier v1: 50/0/50 within 4.5 standard errors.
    assert abs(shares["v1"] - 50) <= 12 and shares["v2"] == 0 and abs(shares["v3"] - 50) <= 12, shares


# --- Cilium's verdicts in the Envoy run (checks/datapath.py) ------------------------------------


@pytest.mark.envoy
def test_the_harness_denies_what_cilium_would_deny():
    """With the version Services as ClusterIPs (main before headless Services), the model denies the
    failover clusters as world: split requests get Cilium's 403, pinned ones (EDS, pods) still answer."""
    statuses = cec_statuses(Deployed.of("eni", (DEFAULT,)).with_cluster_ip_version_services(), DEFAULT)
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
    from stacks import cdk_json_context
    from stacks.config import load_config

    config = load_config(cdk_json_context())
    deployed = Deployed.of(datapath, config.services, config.sample_app, config.cilium_version)
    for service in config.services:
        assert set(model_statuses(service, datapath, deployed).values()) == {"delivered"}, service.key
        assert set(model_statuses(service, datapath).values()) == {"delivered"}, service.key
