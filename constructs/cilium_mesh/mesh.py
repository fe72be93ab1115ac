"""CiliumMesh: installs Cilium, then meshes each declared service (and, with the sample app, applies it).

For each declared service: one manifest of its version Services and network policies, and its
CiliumEnvoyConfig, whose one owner is its rollout (rollout.py, TrafficRollouts), after that manifest
(and the sample's workloads). All services' steps run beside each other: the chain of steps after
Cilium does not grow with their number.

Deploy order for datapath chaining (destroy runs it backwards):

    namespace ──────────────────────────────────────┐
    nodes ─> LB controller chart ─> Cilium chart ───┼─> app workloads
      └──> coredns (beside Cilium)                  ├─> network policy, Ingress
                                                    └─> ingress hostname (output)

Cilium waits for its agents, operator, Envoy and Hubble (chart ``wait``), so
its CRDs exist before the CiliumNetworkPolicies (and, after them, the
CiliumEnvoyConfig) are applied, and every app pod starts under Cilium. hubble-relay needs cluster
DNS to become Ready, so coredns is created beside Cilium, not after it. On
destroy the CiliumEnvoyConfig, app, policies and Ingress go first, then
Cilium: its ``helm uninstall --wait`` returns once the ``cilium-ingress``
Service is gone, which the load balancer controller, still running, allows
only after deleting the NLB.

Deploy order for datapath eni, where Cilium is the CNI the nodes wait for:

    operator identity ─> Cilium chart ─> nodes ─┬─> LB controller chart ──┬─> ingress Service teardown
                                                ├─> coredns               └─> ingress hostname (output)
                                                └─> operator ready, CRDs ─> app, policies, Ingress

Without a CNI nodes never become Ready, so Cilium comes first and cannot wait
(no nodes yet); readiness is proven after the nodes, by waiting for the
operator and for the CRDs the manifests use. Cilium's chart, installed before
the nodes, is deleted after them, so on destroy a separate step deletes the
``cilium-ingress`` Service (and with it the NLB) while the nodes, Cilium and
the controller still run. What each step needs, and from where, is data in
checks/readiness.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, Fn
from aws_cdk import aws_eks_v2 as eks
from constructs import Construct, IConstruct

from .declaration import check_list
from .eni import CiliumOperatorIdentity
from .manifests import (
    INGRESS_FILE,
    MESH_NAMESPACE_FILE,
    NAMESPACE_FILE,
    NETWORK_POLICY_DATAPATH_FILES,
    NETWORK_POLICY_FILE,
    WORKLOAD_FILES,
    load_documents,
    replaced_by_name,
)
from .policy import service_policies
from .rollout import RolloutGate, TrafficRollouts, TrafficRolloutsProps
from .traffic import MeshService
from .values import cilium_values
from .versions import CILIUM_HELM_REPOSITORY

# The kubectl provider's Lambda stops at 15 minutes; a step that waits gives up
# 5 minutes earlier, so helm (or kubectl) reports why instead of being killed
# (aws update-kubeconfig and the chart download come before the wait).
PROVIDER_LAMBDA_TIMEOUT = Duration.minutes(15)
STEP_TIMEOUT = Duration.minutes(10)

# The Service Cilium's chart creates for its shared Ingress, which the load balancer controller backs with the NLB.
INGRESS_SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cilium-ingress", "namespace": "kube-system"}}


@dataclass(frozen=True)
class CiliumMeshProps:
    """What CiliumMesh needs.

    cluster:                  cluster with a kubectl provider.
    nodes:                    the node group: after Cilium with datapath eni, before it with chaining;
                              None for a cluster whose nodes already run (chaining only).
    load_balancer_controller: must outlive the ``cilium-ingress`` Service on destroy; None where the
                              cluster already runs one (it outlives the stack).
    cilium_version:           Cilium chart version, one of versions.CILIUM_RELEASES.
    services:                 the services to mesh (MeshService); default none.
    sample_app:               apply the Product Catalog sample (manifests/app/; its catalogdetail must be among
                              ``services``, declaration.sample_service()); default False.
    rollout_gate:             AMP, for services with rollout settings (MeshMetrics); default None.
    network_policy:           apply the services' policies and the sample's manifests/policy/ (default True).
    datapath:                 "eni" (Cilium as the only CNI) or "chaining" (onto the VPC CNI, the walkthrough's).
    cluster_name:             the EKS cluster's name; with eni also Cilium's cluster.name (ENI tags).
    existing_cluster:         the cluster runs without the stack (default False): Cilium's uninstall must
                              leave it working on the VPC CNI alone (manifests/cilium/existing-cluster.yaml).
    encryption:               "wireguard" (datapath eni only) or "none" (default).
    strict_mode_cidr:         with wireguard, the CIDR that holds every node and pod and nothing else:
                              unencrypted pod traffic to it is dropped; None (default): no strict mode.
    """

    cluster: eks.ICluster
    nodes: IConstruct | None
    load_balancer_controller: IConstruct | None
    cilium_version: str
    cluster_name: str
    services: tuple[MeshService, ...] = ()
    sample_app: bool = False
    rollout_gate: RolloutGate | None = None
    network_policy: bool = True
    datapath: str = "eni"
    existing_cluster: bool = False
    encryption: str = "none"
    strict_mode_cidr: str | None = None


class CiliumMesh(Construct):
    """Cilium (Helm), each declared service's version Services, policies and CiliumEnvoyConfig, and the
    Product Catalog sample with its Ingress and policies (kubectl)."""

    def __init__(self, scope: Construct, id: str, props: CiliumMeshProps) -> None:
        super().__init__(scope, id)
        check_list(props.services)
        if props.encryption == "wireguard" and props.datapath != "eni":
            raise ValueError("encryption wireguard needs datapath eni: Cilium does not support transparent encryption"
                             " while it chains onto another CNI (cilium/cilium#15596)")  # fmt: skip
        cluster = props.cluster
        api_server_host = Fn.select(1, Fn.split("//", cluster.cluster_endpoint))

        namespaces = load_documents(MESH_NAMESPACE_FILE, *([NAMESPACE_FILE] if props.sample_app else []))
        self.namespace = eks.KubernetesManifest(self, "Namespace", cluster=cluster, manifest=namespaces)

        eni = props.datapath == "eni"
        if eni:
            self.operator_identity = CiliumOperatorIdentity(
                self, "OperatorIdentity", cluster=cluster, cluster_name=props.cluster_name
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
            values=cilium_values(api_server_host, props.datapath, props.cluster_name, props.cilium_version,
                                 props.existing_cluster, props.encryption, props.strict_mode_cidr),
            wait=not eni,  # no nodes yet with eni (aws-cdk-lib leaves the property out when false)
            timeout=STEP_TIMEOUT,
        )
        if eni:
            self.cilium.node.add_dependency(self.operator_identity.association, self.operator_identity.agent)
            props.nodes.node.add_dependency(self.cilium)
            self.readiness = self._eni_readiness(props)
            ready = self.readiness
            self.ingress_teardown = eks.KubernetesManifest(
                self, "IngressServiceTeardown", cluster=cluster, manifest=[INGRESS_SERVICE], overwrite=True
            )
            self.ingress_teardown.node.add_dependency(self.cilium, props.nodes, props.load_balancer_controller)
        else:
            self.cilium.node.add_dependency(*(c for c in (props.nodes, props.load_balancer_controller) if c is not None))
            ready = [self.cilium]

        manifests = {}
        if props.sample_app:
            manifests = {"App": load_documents(*WORKLOAD_FILES), "Ingress": load_documents(INGRESS_FILE)}
            if props.network_policy:
                manifests["NetworkPolicy"] = replaced_by_name(
                    load_documents(NETWORK_POLICY_FILE), load_documents(NETWORK_POLICY_DATAPATH_FILES[props.datapath])
                )
        service_manifests = {
            service.key: (f"Service-{service.namespace}-{service.name}",
                          [*service.version_services(), *(service_policies(service, props.datapath) if props.network_policy else [])])
            for service in props.services
        }  # fmt: skip
        manifests |= dict(service_manifests.values())
        # A service's manifest is applied, not created: its version Services may exist already (written by
        # hand, as the walkthrough did, or by an earlier version of this stack in the sample's manifest),
        # and the stack takes them over rather than fail on "already exists".
        applied = {name for name, _ in service_manifests.values()}
        self.manifests = {
            name: eks.KubernetesManifest(self, name, cluster=cluster, manifest=documents, overwrite=(name in applied) or None)
            for name, documents in manifests.items()
        }
        self.manifests_after = (*ready, self.namespace)
        for manifest in self.manifests.values():
            manifest.node.add_dependency(*self.manifests_after)

        self.traffic = TrafficRollouts(
            self,
            "Traffic",
            TrafficRolloutsProps(cluster=cluster, services=props.services, gate=props.rollout_gate,
                                 network_policy=props.network_policy),
        )  # fmt: skip
        for service in props.services:
            # After its version Services (the CiliumEnvoyConfig's backends) and, with the sample, the app.
            before = [self.manifests[service_manifests[service.key][0]], *self.manifests_after]
            if "App" in self.manifests:
                before.append(self.manifests["App"])
            self.traffic.resources[service.key].node.add_dependency(*before)

        if props.sample_app:
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
            self.ingress_hostname.node.add_dependency(*(c for c in (self.cilium, props.load_balancer_controller) if c is not None))

    def _eni_readiness(self, props: CiliumMeshProps) -> list[eks.KubernetesObjectValue]:
        """Steps after the nodes that return once Cilium is Ready: its operator (ENI IPAM running with
        its AWS permissions) and the CRDs it registers that the manifests use. Each polls until its
        field has a value: ``readyReplicas`` is omitted while 0, ``acceptedNames`` until registered."""
        waits = {
            "OperatorReady": ("deployment", "cilium-operator", "kube-system", ".status.readyReplicas"),
            "EnvoyConfigCrd": ("crd", "ciliumenvoyconfigs.cilium.io", "default", ".status.acceptedNames.kind"),
        }
        if props.network_policy:
            waits["NetworkPolicyCrd"] = ("crd", "ciliumnetworkpolicies.cilium.io", "default", ".status.acceptedNames.kind")
        steps = []
        for name, (object_type, object_name, namespace, json_path) in waits.items():
            step = eks.KubernetesObjectValue(
                self,
                name,
                cluster=props.cluster,
                object_type=object_type,
                object_name=object_name,
                object_namespace=namespace,
                json_path=json_path,
                timeout=STEP_TIMEOUT,
            )
            step.node.add_dependency(self.cilium, props.nodes)
            steps.append(step)
        return steps
