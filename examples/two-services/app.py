"""Two services of your own on your own EKS cluster, with the construct library (no sample app).

    pip install /path/to/this/repository    # the cilium_mesh library (pyproject.toml)
    cdk synth                                # then cdk deploy, as any CDK app

``payments`` runs three versions: most requests split v1/v2, beta testers (a header) reach v3, /admin
stays on v1, and v3 gets a 5% copy of the split's traffic to warm up. ``inventory`` fails over from its
canary to stable first, rolls weight changes out on AMP's metrics with a synthetic load (it is quiet),
and its namespace denies everything it does not declare.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_eks_v2 as eks
from aws_cdk.lambda_layer_kubectl_v35 import KubectlV35Layer
from cilium_mesh import Caller, CiliumMesh, CiliumMeshProps, MeshService, Mirror, Route
from cilium_mesh.metrics import MeshMetrics, MeshMetricsProps
from cilium_mesh.rollout import RolloutGate
from cilium_mesh.rollout_plan import RolloutLoad, RolloutSettings

CILIUM_VERSION = "1.19.6"

SERVICES = (
    MeshService(
        name="payments",
        namespace="shop",
        port=80,
        target_port=8080,
        versions={v: {"app": "payments", "version": v} for v in ("v1", "v2", "v3")},
        weights={"v1": 80, "v2": 20},
        routes=(Route(headers={"x-beta": "true"}, to="v3"), Route(path_prefix="/admin", to="v1")),
        mirror=Mirror(version="v3", percent=5),
        callers=(Caller(namespace="storefront", labels={"app": "checkout"}),),
        check_path="/healthz",
    ),
    MeshService(
        name="inventory",
        namespace="shop",
        port=8080,
        versions={"stable": {"app": "inventory", "track": "stable"}, "canary": {"app": "inventory", "track": "canary"}},
        weights={"stable": 90, "canary": 10},
        failover=("stable", "canary"),
        rollout=RolloutSettings(steps=(25, 100), pause_s=300, load=RolloutLoad(rate_per_s=2, path="/healthz")),
        callers=(Caller(labels={"app": "payments"}),),
        namespace_default_deny=True,
        check_path="/healthz",
    ),
)


class ShopStack(cdk.Stack):
    """A VPC, an EKS cluster with a managed node group (not Auto Mode: Cilium needs its own nodes), and the mesh."""

    def __init__(self, scope, construct_id: str, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        vpc = ec2.Vpc(self, "Vpc", max_azs=2)
        cluster = eks.Cluster(
            self,
            "Cluster",
            version=eks.KubernetesVersion.of("1.35"),
            vpc=vpc,
            default_capacity_type=eks.DefaultCapacityType.NODEGROUP,
            default_capacity=0,
            kubectl_provider_options=eks.KubectlProviderOptions(kubectl_layer=KubectlV35Layer(self, "KubectlLayer")),
        )
        vpc_cni = eks.Addon(self, "VpcCni", cluster=cluster, addon_name="vpc-cni")
        nodes = cluster.add_nodegroup_capacity("Nodes", instance_types=[ec2.InstanceType("m6i.large")], desired_size=2)
        nodes.node.add_dependency(vpc_cni)
        metrics = MeshMetrics(self, "Metrics", MeshMetricsProps(cluster=cluster, private_subnets=vpc.private_subnets,
                                                                services=SERVICES))  # fmt: skip
        workspace = metrics.workspace
        CiliumMesh(
            self,
            "Mesh",
            CiliumMeshProps(
                cluster=cluster,
                nodes=nodes,
                load_balancer_controller=None,
                cilium_version=CILIUM_VERSION,
                cluster_name="shop",
                services=SERVICES,
                rollout_gate=RolloutGate(query_url=cdk.Fn.join("", [workspace.attr_prometheus_endpoint, "api/v1/query"]),
                                         workspace_arn=workspace.attr_arn, rules=metrics.rules),
                datapath="chaining",
            ),
        )  # fmt: skip


if __name__ == "__main__":
    app = cdk.App()
    ShopStack(app, "Shop", env=cdk.Environment(region="us-west-2"))
    app.synth()
