"""CiliumMesh: installs Cilium and applies the app, Ingress, traffic and network policy in order.

Deploy order (destroy runs it backwards):

    namespace ──────────────────────────────────────┐
    nodes ─> LB controller chart ─> Cilium chart ───┼─> app workloads
      └──> coredns (beside Cilium)                  ├─> network policy, Ingress, CiliumEnvoyConfig
                                                    └─> ingress hostname (output)

Cilium waits for its agents, operator, Envoy and Hubble (chart ``wait``), so
its CRDs exist before the CiliumEnvoyConfig and CiliumNetworkPolicies are
applied, and every app pod starts under Cilium. hubble-relay needs cluster
DNS to become Ready, so coredns is created beside Cilium, not after it. On
destroy the app, policies, Ingress and CiliumEnvoyConfig go first, then
Cilium: its ``helm uninstall --wait`` returns once the ``cilium-ingress``
Service is gone, which the load balancer controller, still running, allows
only after deleting the NLB. What each step needs, and from where, is data in
tools/readiness.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, Fn
from aws_cdk import aws_eks_v2 as eks
from constructs import Construct, IConstruct

from .manifests import (
    INGRESS_FILE,
    NAMESPACE_FILE,
    NETWORK_POLICY_FILE,
    WORKLOAD_FILES,
    load_documents,
)
from .traffic import TrafficPolicy
from .values import cilium_values
from .versions import CILIUM_HELM_REPOSITORY

# The kubectl provider's Lambda stops at 15 minutes; a step that waits gives up
# 5 minutes earlier, so helm (or kubectl) reports why instead of being killed
# (aws update-kubeconfig and the chart download come before the wait).
PROVIDER_LAMBDA_TIMEOUT = Duration.minutes(15)
STEP_TIMEOUT = Duration.minutes(10)


@dataclass(frozen=True)
class CiliumMeshProps:
    """What CiliumMesh needs.

    cluster:                  cluster with a kubectl provider.
    nodes:                    the node group; Cilium's chart waits for pods, so it needs nodes.
    load_balancer_controller: must outlive the ``cilium-ingress`` Service on destroy.
    cilium_version:           Cilium chart version, one of versions.CILIUM_RELEASES.
    traffic_policy:           L7 policy for catalogdetail.
    network_policy:           apply manifests/policy/ (default True: default-deny plus the app's call graph).
    """

    cluster: eks.Cluster
    nodes: IConstruct
    load_balancer_controller: IConstruct
    cilium_version: str
    traffic_policy: TrafficPolicy
    network_policy: bool = True


class CiliumMesh(Construct):
    """Cilium (Helm) and the Product Catalog app with its Ingress and policies (kubectl)."""

    def __init__(self, scope: Construct, id: str, props: CiliumMeshProps) -> None:
        super().__init__(scope, id)
        cluster = props.cluster
        api_server_host = Fn.select(1, Fn.split("//", cluster.cluster_endpoint))

        self.namespace = eks.KubernetesManifest(
            self, "Namespace", cluster=cluster, manifest=load_documents(NAMESPACE_FILE)
        )

        self.cilium = eks.HelmChart(
            self,
            "Cilium",
            cluster=cluster,
            chart="cilium",
            release="cilium",
            repository=CILIUM_HELM_REPOSITORY,
            version=props.cilium_version,
            namespace="kube-system",
            values=cilium_values(api_server_host),
            wait=True,
            timeout=STEP_TIMEOUT,
        )
        self.cilium.node.add_dependency(props.nodes, props.load_balancer_controller)

        manifests = {
            "App": load_documents(*WORKLOAD_FILES),
            "Ingress": load_documents(INGRESS_FILE),
            "TrafficPolicy": [props.traffic_policy.cilium_envoy_config()],
        }
        if props.network_policy:
            manifests["NetworkPolicy"] = load_documents(NETWORK_POLICY_FILE)
        self.manifests = {
            name: eks.KubernetesManifest(self, name, cluster=cluster, manifest=documents)
            for name, documents in manifests.items()
        }
        for manifest in self.manifests.values():
            manifest.node.add_dependency(self.cilium, self.namespace)

        self.ingress_hostname = eks.KubernetesObjectValue(
            self,
            "IngressHostname",
            cluster=cluster,
            object_type="service",
            object_name="cilium-ingress",
            object_namespace="kube-system",
            json_path=".status.loadBalancer.ingress[0].hostname",
            timeout=STEP_TIMEOUT,
        )
        self.ingress_hostname.node.add_dependency(self.cilium)
