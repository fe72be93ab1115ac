"""Deploy and destroy order, read from the synthesized dependency graph.

CloudFormation creates a resource after everything it depends on (DependsOn,
Ref, Fn::GetAtt) and deletes it before them, so one graph proves both orders.
"""

import pytest
from checks.deploy_graph import Graph
from conftest import synth_of
from cilium_mesh.rollout_plan import RESOURCE_TYPE as ROLLOUT_RESOURCE_TYPE

# Every resource whose requests run kubectl (the rollout's through the kubectl provider's handler).
KUBERNETES_STEP = ("Custom::AWSCDK-EKS-HelmChart", "Custom::AWSCDK-EKS-KubernetesResource", "Custom::AWSCDK-EKS-KubernetesObjectValue",
                   ROLLOUT_RESOURCE_TYPE)  # fmt: skip


@pytest.fixture(scope="module")
def graph(synth):
    return Graph(synth.template)


@pytest.fixture(scope="module")
def ids(synth):
    stack, mesh = synth.stack, synth.stack.mesh
    return {
        "vpc": synth.logical_id(stack.vpc),
        "cluster": synth.logical_id(stack.cluster),
        "vpc_cni": synth.logical_id(stack.vpc_cni),
        "nodes": synth.logical_id(stack.nodes),
        "lbc": synth.logical_id(stack.load_balancer_controller.node.find_child("Resource")),
        "namespace": synth.logical_id(mesh.namespace),
        "cilium": synth.logical_id(mesh.cilium),
        "ingress": synth.logical_id(mesh.manifests["Ingress"]),
        "traffic": synth.logical_id(stack.traffic.resources["workshop/catalogdetail"]),
        "policy": synth.logical_id(mesh.manifests["NetworkPolicy"]),
        "app": synth.logical_id(mesh.manifests["App"]),
        "hostname": synth.logical_id(mesh.ingress_hostname),
        "coredns": synth.logical_id(stack.coredns),
    }


# (later, earlier): `later` is created after `earlier` and deleted before it.
EDGES = [
    ("nodes", "vpc_cni"),  # pods need the CNI Cilium chains onto
    ("lbc", "nodes"),  # destroy: the controller goes before the nodes
    ("cilium", "nodes"),  # the chart waits for its pods
    ("cilium", "lbc"),  # destroy: the controller deletes the NLB of cilium-ingress
    ("app", "cilium"),  # pods start under Cilium
    ("ingress", "cilium"),
    ("traffic", "cilium"),  # CiliumEnvoyConfig CRD is registered by a ready Cilium
    ("policy", "cilium"),  # CiliumNetworkPolicy CRD likewise
    ("app", "namespace"),
    ("ingress", "namespace"),
    ("traffic", "namespace"),
    ("traffic", "app"),  # the weights shift to Deployments that exist
    ("policy", "namespace"),
    ("hostname", "cilium"),
    ("coredns", "nodes"),  # its pods need nodes (and Cilium beside it, see below)
    ("cluster", "vpc"),
    ("nodes", "cluster"),
]


@pytest.mark.parametrize(("later", "earlier"), EDGES, ids=[f"{a}-after-{b}" for a, b in EDGES])
def test_edge(graph, ids, later, earlier):
    assert ids[earlier] in graph.after(ids[later])
    assert ids[later] not in graph.after(ids[earlier])


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_the_smoke_test_comes_after_every_manifest_it_checks(request, datapath):
    """Its checks each pass once: the app, the Ingress, the network policies and the traffic policy are
    all in force before the Job starts (the split must be proven under the policy, not before it)."""
    synth = synth_of(request, datapath)
    graph = Graph(synth.template)
    job = synth.logical_id(synth.stack.smoke_test.job)
    checked = [*synth.stack.mesh.manifests.values(), synth.stack.traffic.resources["workshop/catalogdetail"]]
    assert "NetworkPolicy" in synth.stack.mesh.manifests and "Ingress" in synth.stack.mesh.manifests
    for construct in checked:
        assert synth.logical_id(construct) in graph.after(job), construct.node.path


def test_coredns_is_beside_cilium(graph, ids):
    """Cilium's wait needs cluster DNS (hubble-relay), and coredns needs Cilium: neither may follow the other."""
    assert ids["cilium"] not in graph.after(ids["coredns"])
    assert ids["coredns"] not in graph.after(ids["cilium"])


def test_destroy_order_app_and_routing_then_cilium_then_controller_then_nodes_cluster_vpc(graph, ids):
    """Delete order is the reverse of creation: each group goes before everything it depends on."""
    order = [["app", "policy", "ingress", "traffic"], ["cilium"], ["lbc"], ["nodes"], ["cluster"], ["vpc"]]
    for earlier_group, later_group in zip(order, order[1:]):
        for deleted_first in earlier_group:
            for deleted_after in later_group:
                assert ids[deleted_after] in graph.after(ids[deleted_first]), (deleted_first, deleted_after)


def test_controller_service_account_does_not_wait_for_nodes(synth, graph, ids):
    """Only the controller's chart waits for nodes; its IAM role and service account come up alongside them."""
    account = synth.logical_id(synth.stack.load_balancer_controller.node.find_child("alb-sa").node.find_child("manifest-alb-saServiceAccountResource"))
    assert ids["nodes"] not in graph.after(account)


def kubernetes_chain(synth, graph: Graph) -> list[str]:
    """The longest chain of Kubernetes steps after the node group."""
    nodes = synth.logical_id(synth.stack.nodes)
    steps = {name for name, res in graph.resources.items() if res["Type"] in KUBERNETES_STEP and nodes in graph.after(name)}
    return graph.longest_chain(steps)


def test_at_most_seven_kubernetes_steps_after_the_node_group(synth, graph, ids):
    """The controller, Cilium, the app's (or a service's) manifests, the CiliumEnvoyConfig's rollout (at
    once, or stepped), the smoke test's Job (after the rollout: it checks the final weights), the wait for
    its verdict (the one long step the smoke test adds), and the quick apply of that verdict."""
    chain = kubernetes_chain(synth, graph)
    smoke = synth.stack.smoke_test
    manifests = {ids["app"], synth.logical_id(synth.stack.mesh.manifests["Service-workshop-catalogdetail"])}
    assert chain[:4] == [synth.logical_id(s) for s in (smoke.result, smoke.verdict, smoke.job)] + [ids["traffic"]], chain
    assert chain[4] in manifests and chain[5:] == [ids["cilium"], ids["lbc"]], chain


def test_the_chain_does_not_grow_with_the_services(synth_eni, synth_services):
    """Each service's manifest and rollout run beside the others': two services of the user's own (and no
    sample) give the same steps as the sample alone, in the same datapath (eni: six)."""
    services_chain = kubernetes_chain(synth_services, Graph(synth_services.template))
    assert len(services_chain) == len(kubernetes_chain(synth_eni, Graph(synth_eni.template))) == 6, services_chain
    mesh = synth_services.stack.mesh
    for key in ("shop/payments", "shop/inventory"):
        rollout = synth_services.logical_id(mesh.traffic.resources[key])
        (namespace, name) = key.split("/")
        assert synth_services.logical_id(mesh.manifests[f"Service-{namespace}-{name}"]) in Graph(synth_services.template).after(rollout)
