"""Readiness of the deploy graph, from the provider dry run: waits can finish, admission lets objects in, destroy works."""

import copy

import pytest
from conftest import CONTEXT
from checks.deploy_graph import Graph
from checks.provider_dry_run import find_step
from checks.readiness import (
    NEEDS,
    chart_needs,
    check_admission,
    check_destroy,
    check_waits,
    helm_major,
    provider_ids,
)


@pytest.fixture(scope="module")
def world(synth, provider_steps):
    return Graph(synth.template), provider_ids(synth.stack), provider_steps


def cilium_create(world):
    _, ids, steps = world
    return find_step(steps, ids["cilium"])


def controller_create(world):
    _, ids, steps = world
    return find_step(steps, ids["load_balancer_controller"])


def test_every_need_names_its_source():
    for need in NEEDS.values():
        assert need.provider and len(need.source) > 40


def test_needs_are_derived_from_the_rendered_cilium_chart(world):
    needs = chart_needs(cilium_create(world).rendered, helm_major(CONTEXT["kubernetes_version"]))
    assert "cluster_dns" in needs["Deployment/hubble-relay"]
    assert "taint" in needs["Deployment/hubble-relay"] and "service_routing" in needs["Deployment/hubble-relay"]
    assert needs["DaemonSet/cilium"] == ["schedulable"]  # tolerates everything, reaches the API by its endpoint
    assert "taint" not in needs["Deployment/cilium-operator"]
    assert "cluster_dns" not in needs["DaemonSet/cilium-envoy"]


def test_every_waiting_chart_can_become_ready(world):
    graph, ids, steps = world
    assert check_waits(graph, ids, steps, helm_major(CONTEXT["kubernetes_version"])) == []


def test_helm_3_would_also_wait_for_the_nlb_which_the_controller_beside_cilium_provides(world):
    graph, ids, steps = world
    needs = chart_needs(cilium_create(world).rendered, 3)
    assert needs["Service/cilium-ingress"] == ["load_balancer"]
    assert check_waits(graph, ids, steps, 3) == []


def test_coredns_after_cilium_is_caught(world):
    """Defect: coredns created after the Cilium chart, whose wait needs cluster DNS for hubble-relay."""
    graph, ids, steps = world
    template = copy.deepcopy(graph.resources)
    template[ids["coredns"]].setdefault("DependsOn", []).append(ids["cilium"])
    problems = check_waits(Graph({"Resources": template}), ids, steps, 4)
    assert any("hubble-relay needs cluster DNS" in str(p) for p in problems), problems


def test_every_object_passes_admission(world):
    graph, ids, steps = world
    assert check_admission(graph, ids, steps) == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("webhookConfig", "Ingress/productappingress goes through vingress.elbv2.k8s.aws"),
        ("enableServiceMutatorWebhook", "Service/cilium-ingress goes through mservice.elbv2.k8s.aws"),
    ],
)
def test_controller_webhook_left_on_is_caught(world, setting, expected):
    """Defect: a controller webhook that fails closed and matches our objects, with pods nothing waits for."""
    graph, ids, steps = world
    steps = copy.deepcopy(steps)
    del find_step(steps, ids["load_balancer_controller"]).values[setting]
    problems = [str(p) for p in check_admission(graph, ids, steps)]
    assert any(expected in p for p in problems), problems


def test_controller_can_reach_aws_while_cilium_uninstalls(world):
    graph, ids, _ = world
    assert check_destroy(graph, ids, controller_create(world).values, "chaining") == []


def test_controller_on_cluster_dns_would_be_stranded_on_destroy(world):
    """Defect: with dnsPolicy ClusterFirst, coredns (beside Cilium) can go first and the NLB is stranded."""
    graph, ids, _ = world
    values = {**controller_create(world).values, "dnsPolicy": "ClusterFirst"}
    problems = [str(p) for p in check_destroy(graph, ids, values, "chaining")]
    assert any("cluster DNS" in p for p in problems), problems
