"""Readiness of the deploy graph: what each waiting step needs exists by then, and admission lets every object in.

Input: the synthesized template and the provider dry run (checks/provider_dry_run.py),
which holds the commands the kubectl handler runs, the values it hands helm and
the real Cilium chart rendered with them.

* A chart that waits (``helm --wait``) succeeds only when each workload it
  renders becomes Ready. What a workload needs for that is derived from the
  rendered pod (tolerations, host network, DNS names in its configuration) by
  the rules in NEEDS; each need has a provider in the graph, which must be
  created before the chart or beside it, never after it.
* Every object the stack applies goes through the admission webhooks that
  charts registered before it. A webhook that fails closed and matches the
  object needs its serving pods Ready: only a chart that waits guarantees that.
* On destroy, the step that deletes the ``cilium-ingress`` Service (Cilium's
  ``helm uninstall --wait`` with chaining, a step of its own with eni) returns
  once the load balancer controller has deleted the NLB; everything the
  controller needs then must still exist, i.e. be deleted after that step.
* With datapath eni Cilium is installed before the nodes and cannot wait; the
  order its steps need is data (ENI_ORDER), each entry with its source.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass

from checks.deploy_graph import Graph, logical_id
from checks.kubectl_layer import layer_helm
from checks.provider_dry_run import find_step

CILIUM_TAINT = "node.cilium.io/agent-not-ready"
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")


@dataclass(frozen=True)
class Need:
    """Something a workload needs to become Ready, who provides it in the graph, and where that is written."""

    what: str
    provider: str  # a role of provider_ids()
    source: str


NEEDS = {
    "schedulable": Need(
        "nodes to run on",
        "nodes",
        "a pod is Ready only once scheduled (kube-scheduler)",
    ),
    "taint": Need(
        f"the {CILIUM_TAINT} taint lifted (pod does not tolerate it)",
        "cilium",
        "Cilium's operator removes the taint once the agent on that node is Ready "
        "(Cilium docs, 'Considerations on node pool taints and unmanaged pods')",
    ),
    "service_routing": Need(
        "the kubernetes Service routed (in-cluster client, no kube-proxy)",
        "cilium",
        "client-go in-cluster config uses KUBERNETES_SERVICE_HOST, the Service's ClusterIP; "
        "this cluster has no kube-proxy, Cilium's kube-proxy replacement routes it",
    ),
    "cluster_dns": Need(
        "cluster DNS (its configuration names *.svc.cluster.local)",
        "coredns",
        "hubble-relay dials hubble-peer.kube-system.svc.cluster.local and reports SERVING only "
        "with peers (cilium pkg/hubble/relay/server/health.go); any workload naming a cluster "
        "DNS name is treated alike",
    ),
    "load_balancer": Need(
        "a load balancer address for a Service of type LoadBalancer (helm 3 waits for it)",
        "load_balancer_controller",
        "helm v3 pkg/kube/ready.go: 'if s.Status.LoadBalancer.Ingress == nil { return false }'; "
        "helm 4's kstatus wait does not",
    ),
}

# What the load balancer controller needs while Cilium's uninstall waits for it to delete the NLB.
CONTROLLER_DESTROY_NEEDS = {
    "its pods": ("load_balancer_controller", "the controller's chart, still installed"),
    "nodes to run on": ("nodes", "the managed node group"),
    "AWS APIs through the NAT gateways": ("vpc", "the VPC with its NAT gateways and routes"),
    "the kubernetes Service routed": (
        "vpc",
        "Cilium's datapath stays in the kernel (bpffs pins) when its agents are deleted, "
        "as on every Cilium upgrade; it goes only with the nodes",
    ),
}

# Webhooks of the AWS Load Balancer Controller chart 3.2.2 (aws/eks-charts
# stable/aws-load-balancer-controller/templates/webhook.yaml) that can match
# what we apply, with the value that turns each off and its failure policy.
LOAD_BALANCER_CONTROLLER_WEBHOOKS = (
    {
        "name": "mservice.elbv2.k8s.aws",
        "kinds": {("", "Service"): ("CREATE",)},
        "enabled": lambda values: values.get("enableServiceMutatorWebhook", True),
        "fails_closed": lambda values: values.get("serviceMutatorWebhookConfig", {}).get("failurePolicy", "Fail") == "Fail",
        "namespace_label": None,
    },
    {
        "name": "vingress.elbv2.k8s.aws",
        "kinds": {("networking.k8s.io", "Ingress"): ("CREATE", "UPDATE")},
        "enabled": lambda values: not values.get("webhookConfig", {}).get("disableIngressValidation", False),
        "fails_closed": lambda values: values.get("webhookConfig", {}).get("ingressValdationFailurePolicy", "Fail") == "Fail",
        "namespace_label": None,
    },
    {
        "name": "mpod.elbv2.k8s.aws",
        "kinds": {("", "Pod"): ("CREATE",)},
        "enabled": lambda values: True,
        "fails_closed": lambda values: False,  # podMutatorWebhookConfig.failurePolicy: Ignore
        "namespace_label": ("elbv2.k8s.aws/pod-readiness-gate-inject", "enabled"),
    },
)


@dataclass(frozen=True)
class OrderNeed:
    """A step that must be created after another (and so deleted before it), and why."""

    step: str  # a role of provider_ids()
    provider: str
    source: str


ENI_ORDER = (
    OrderNeed(
        "cilium", "operator_identity",
        "EKS Pod Identity gives credentials only to pods created after the association exists (EKS docs, "
        "'Pod Identity'); without them the operator stops with 'Unable to start eni allocator' (cilium/cilium ENI docs)",
    ),
    OrderNeed(
        "nodes", "cilium",
        "a node turns Ready only once a CNI has written its configuration; without one the managed node group "
        "fails with NodeCreationFailure",
    ),
    OrderNeed(
        "cilium_ready", "nodes",
        "the operator and the agents run on the nodes (the chart's pods are Pending until then)",
    ),
    OrderNeed(
        "cilium_ready", "pod_identity_agent",
        "the operator fetches its credentials from the eks-pod-identity-agent on its node (169.254.170.23)",
    ),
    OrderNeed(
        "manifests", "cilium_ready",
        "CiliumNetworkPolicy and CiliumEnvoyConfig need the CRDs the operator registers at run time; app pods "
        "need the operator to hand out ENI addresses",
    ),
    OrderNeed("coredns", "nodes", "the coredns add-on turns ACTIVE only once its pods run on nodes"),
    OrderNeed(
        "eni_cleanup", "vpc",
        "deleted before the VPC: the detached ENIs it deletes would keep their subnets, and so the VPC, from going",
    ),
    OrderNeed(
        "nodes", "eni_cleanup",
        "deleted after the nodes: until then the operator runs and attached ENIs go with their instances "
        "(Cilium marks them DeleteOnTermination)",
    ),
)


@dataclass(frozen=True)
class Problem:
    step: str
    message: str

    def __str__(self) -> str:
        return f"{self.step}: {self.message}"


# What an existing cluster already runs before the stack and keeps after it: its nodes, cluster DNS,
# load balancer controller and VPC. Such a provider is before every step.
EXISTING = "<the existing cluster>"


def provider_ids(stack) -> dict[str, str]:
    """The logical ID of each role in the graph (for roles of several steps, one of them: see role_ids)."""
    return {role: ids[0] for role, ids in role_ids(stack).items()}


def role_ids(stack) -> dict[str, list[str]]:
    """The logical IDs of each role's steps in the graph."""
    mesh = stack.mesh
    roles = {
        "cilium": [mesh.cilium],
        "manifests": list(mesh.manifests.values()),
        "ingress_owner": [mesh.cilium],
    }
    if not stack.existing:
        roles |= {
            "nodes": [stack.nodes],
            "coredns": [stack.coredns],
            "load_balancer_controller": [stack.load_balancer_controller.node.find_child("Resource")],
            "vpc": [stack.vpc],
        }
    if stack.eni:
        roles |= {
            "operator_identity": [mesh.operator_identity.association],
            "pod_identity_agent": [mesh.operator_identity.agent],
            "cilium_ready": mesh.readiness,
            "eni_cleanup": [stack.eni_cleanup.resource],
            "ingress_owner": [mesh.ingress_teardown],
        }
    ids = {role: [logical_id(stack, c) for c in constructs] for role, constructs in roles.items()}
    if stack.existing:
        ids |= {role: [EXISTING] for role in ("nodes", "coredns", "load_balancer_controller", "vpc")}
    return ids


@functools.cache
def helm_major(kubernetes_version: str) -> int:
    version = subprocess.run([str(layer_helm(kubernetes_version)), "version", "--short"],
                             capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    return int(version.strip().lstrip("v").split(".")[0])


def _mentions_cluster_dns(pod_spec: dict, config_maps: dict[str, str]) -> bool:
    text = json.dumps(pod_spec)
    for volume in pod_spec.get("volumes", []):
        name = volume.get("configMap", {}).get("name")
        if name:
            text += config_maps.get(name, "")
    return ".svc.cluster.local" in text


def _uses_cluster_dns(pod_spec: dict) -> bool:
    policy = pod_spec.get("dnsPolicy", "ClusterFirst")
    return policy == "ClusterFirstWithHostNet" or (policy == "ClusterFirst" and not pod_spec.get("hostNetwork"))


def workload_needs(document: dict, config_maps: dict[str, str]) -> list[str]:
    """The NEEDS keys of one rendered workload."""
    pod = document["spec"]["template"]["spec"]
    needs = ["schedulable"]
    tolerations = pod.get("tolerations", [])
    tolerated = any(
        t.get("operator") == "Exists" and t.get("key") in (None, CILIUM_TAINT) and t.get("effect") in (None, "NoExecute")
        for t in tolerations
    ) or any(t.get("key") == CILIUM_TAINT for t in tolerations)
    if not tolerated:
        needs.append("taint")
    env = {e["name"] for c in pod.get("containers", []) for e in c.get("env", [])}
    if "KUBERNETES_SERVICE_HOST" not in env:
        needs.append("service_routing")
    if _uses_cluster_dns(pod) and _mentions_cluster_dns(pod, config_maps):
        needs.append("cluster_dns")
    return needs


def chart_needs(rendered: list[dict], helm_major_version: int) -> dict[str, list[str]]:
    """Workload (kind/name) -> NEEDS keys, for every workload a waiting chart renders."""
    config_maps = {d["metadata"]["name"]: json.dumps(d.get("data", {})) for d in rendered if d["kind"] == "ConfigMap"}
    needs = {
        f"{d['kind']}/{d['metadata']['name']}": workload_needs(d, config_maps)
        for d in rendered
        if d["kind"] in WORKLOAD_KINDS
    }
    if helm_major_version < 4:
        for d in rendered:
            if d["kind"] == "Service" and d["spec"].get("type") == "LoadBalancer":
                needs[f"Service/{d['metadata']['name']}"] = ["load_balancer"]
    return needs


def _relation(graph: Graph, step: str, provider: str) -> str:
    if provider == EXISTING:
        return "before"
    if provider == step:
        return "itself"
    if provider in graph.after(step):
        return "before"
    if step in graph.after(provider):
        return "after"
    return "beside"


def check_waits(graph: Graph, ids: dict[str, str], steps, helm_major_version: int) -> list[Problem]:
    """Each waiting chart's workloads have what they need from steps created before or beside it."""
    problems = []
    for step in steps:
        if step.request_type != "Create" or not any("--wait" in argv for argv in step.commands):
            continue
        if step.rendered is None:
            problems.append(Problem(step.logical_id, "waits, but its chart was not rendered to check"))
            continue
        for workload, keys in chart_needs(step.rendered, helm_major_version).items():
            for key in keys:
                need = NEEDS[key]
                if _relation(graph, step.logical_id, ids[need.provider]) == "after":
                    problems.append(
                        Problem(step.logical_id, f"{workload} needs {need.what}, but {need.provider} "
                                f"({ids[need.provider]}) is created after it ({need.source})")  # fmt: skip
                    )
    return problems


def _matches(webhook: dict, document: dict, namespaces: dict[str, dict]) -> bool:
    group = document["apiVersion"].split("/")[0] if "/" in document["apiVersion"] else ""
    if (group, document["kind"]) not in webhook["kinds"]:
        return False
    label = webhook["namespace_label"]
    if label is None:
        return True
    namespace = document["metadata"].get("namespace", "")
    return namespaces.get(namespace, {}).get(label[0]) == label[1]


def check_admission(graph: Graph, ids: dict[str, str], steps) -> list[Problem]:
    """Objects created after (or beside) the controller chart pass its webhooks, whose pods may not run yet.

    The controller chart does not wait, so none of its webhooks that fail closed
    may match an object we create; the Cilium chart registers no webhooks (checked).
    """
    controller = ids["load_balancer_controller"]
    creates = [s for s in steps if s.request_type == "Create"]
    # An existing cluster's controller is running before the stack: its webhooks are served.
    controller_step = None if controller == EXISTING else find_step(steps, controller)
    controller_waits = controller_step is None or any("--wait" in argv for argv in controller_step.commands)
    values = (controller_step.values if controller_step else None) or {}
    namespaces = {
        d["metadata"]["name"]: d["metadata"].get("labels", {})
        for s in creates
        for d in (s.manifests or []) + (s.rendered or [])
        if d["kind"] == "Namespace"
    }
    problems = []
    for step in creates:
        objects = (step.manifests or []) + (step.rendered or [])
        if any(d["kind"].endswith("WebhookConfiguration") for d in step.rendered or []):
            problems.append(Problem(step.logical_id, "registers admission webhooks this check does not model"))
        if step.logical_id == controller or _relation(graph, step.logical_id, controller) == "after":
            continue
        for document in objects:
            for webhook in LOAD_BALANCER_CONTROLLER_WEBHOOKS:
                if not (webhook["enabled"](values) and webhook["fails_closed"](values)):
                    continue
                if _matches(webhook, document, namespaces) and not controller_waits:
                    problems.append(
                        Problem(step.logical_id, f"{document['kind']}/{document['metadata']['name']} goes through "
                                f"{webhook['name']} (fails closed), whose pods nothing waits for")  # fmt: skip
                    )
    return problems


def check_order(graph: Graph, roles: dict[str, list[str]], order: tuple[OrderNeed, ...]) -> list[Problem]:
    """Every step of each OrderNeed is created after every step of its provider (and deleted before)."""
    return [
        Problem(step, f"needs {need.provider} ({provider}) created before it: {need.source}")
        for need in order
        for step in roles[need.step]
        for provider in roles[need.provider]
        if provider not in graph.after(step)
    ]


def check_destroy(graph: Graph, ids: dict[str, str], controller_values: dict, datapath: str) -> list[Problem]:
    """While the ``cilium-ingress`` Service is deleted, the controller can still resolve and reach AWS."""
    needs = dict(CONTROLLER_DESTROY_NEEDS)
    if controller_values.get("dnsPolicy", "ClusterFirst") != "Default":
        needs["cluster DNS (dnsPolicy ClusterFirst) to resolve AWS endpoints"] = ("coredns", "coredns add-on")
    if datapath == "eni":
        needs["the kubernetes Service routed"] = ("cilium", "Cilium is the CNI: its agents route pod traffic")
    owner = ids["ingress_owner"]
    return [
        Problem(owner, f"on destroy the controller needs {what}, but {role} ({ids[role]}) is deleted before "
                "the cilium-ingress Service")  # fmt: skip
        for what, (role, _) in needs.items()
        if ids[role] != EXISTING and ids[role] not in graph.after(owner)
    ]
