"""What Cilium as the only CNI (datapath eni) needs from AWS: EC2 permissions for its operator, and ENI cleanup on destroy.

Cilium's operator creates ENIs, attaches them to nodes and assigns pod addresses
from them. It tags each ENI it creates with ``io.cilium/cilium-managed=true``
and ``io.cilium/cluster-name=<cluster.name>`` and, while it runs, deletes the
ones left detached. Once the nodes are gone nothing runs it, and a detached ENI
keeps its subnet, and so the VPC, from being deleted.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import CustomResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import custom_resources as cr
from constructs import Construct

OPERATOR_NAMESPACE = "kube-system"
OPERATOR_SERVICE_ACCOUNT = "cilium-operator"
MANAGED_TAG = ("io.cilium/cilium-managed", "true")
CLUSTER_NAME_TAG = "io.cilium/cluster-name"

# Cilium docs, "AWS ENI" IPAM, "Required Privileges" (1.18 to 1.20). Not needed here:
# DescribeTags (cluster.name is set, so the operator does not look up the EKS cluster
# tag), UnassignPrivateIpAddresses (eni.awsReleaseExcessIPs is off), DescribeInstances
# (no eni.instanceTagsFilter).
OPERATOR_DESCRIBE_ACTIONS = (
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcs",
)
OPERATOR_CHANGE_ACTIONS = (
    "ec2:AssignPrivateIpAddresses",
    "ec2:AttachNetworkInterface",
    "ec2:CreateNetworkInterface",
    "ec2:ModifyNetworkInterfaceAttribute",
)
OPERATOR_EC2_ACTIONS = (
    *OPERATOR_DESCRIBE_ACTIONS, *OPERATOR_CHANGE_ACTIONS, "ec2:CreateTags", "ec2:DeleteNetworkInterface",
)  # fmt: skip

CLEANUP_HANDLER_DIR = Path(__file__).resolve().parent / "eni_cleanup"
CLEANUP_TIMEOUT = Duration.minutes(15)


def _own_enis(stack: Stack) -> str:
    return f"arn:{stack.partition}:ec2:{stack.region}:{stack.account}:network-interface/*"


def _tagged_by_cilium(cluster_name: str) -> dict:
    """Matches only the ENIs Cilium created for this cluster."""
    return {
        "StringEquals": {
            f"ec2:ResourceTag/{MANAGED_TAG[0]}": MANAGED_TAG[1],
            f"ec2:ResourceTag/{CLUSTER_NAME_TAG}": cluster_name,
        }
    }


class CiliumOperatorIdentity(Construct):
    """The cilium-operator's AWS permissions, through EKS Pod Identity: a role only its service account gets.

    The association must exist before Cilium's chart creates the operator pod: EKS
    injects the credentials into pods created after it. The nodes' role gets none
    of these permissions.
    """

    def __init__(self, scope: Construct, id: str, *, cluster: eks.Cluster, cluster_name: str) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        in_region = {"StringEquals": {"aws:RequestedRegion": stack.region}}
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.SessionTagsPrincipal(iam.ServicePrincipal("pods.eks.amazonaws.com")),
            description=f"cilium-operator of EKS cluster {cluster_name}: ENI IPAM (Cilium docs, Required Privileges)",
        )
        statements = [
            iam.PolicyStatement(
                actions=[*OPERATOR_DESCRIBE_ACTIONS, *OPERATOR_CHANGE_ACTIONS], resources=["*"], conditions=in_region
            ),
            iam.PolicyStatement(
                actions=["ec2:CreateTags"],
                resources=[_own_enis(stack)],
                conditions={"StringEquals": {"ec2:CreateAction": "CreateNetworkInterface"}},
            ),
            iam.PolicyStatement(
                actions=["ec2:DeleteNetworkInterface"], resources=[_own_enis(stack)], conditions=_tagged_by_cilium(cluster_name)
            ),
        ]
        self.policy = iam.Policy(self, "Policy", statements=statements)
        self.policy.attach_to_role(self.role)
        self.association = eks.CfnPodIdentityAssociation(
            self,
            "Association",
            cluster_name=cluster.cluster_name,
            namespace=OPERATOR_NAMESPACE,
            service_account=OPERATOR_SERVICE_ACCOUNT,
            role_arn=self.role.role_arn,
        )
        self.association.node.add_dependency(self.policy)
        self.agent = cluster.eks_pod_identity_agent


class EniCleanup(Construct):
    """On destroy, after the nodes and before the VPC: deletes the detached ENIs Cilium created for this cluster.

    Create and Update do nothing. The Lambda may only describe ENIs, and delete
    those tagged as Cilium's for this cluster.
    """

    def __init__(self, scope: Construct, id: str, *, cluster_name: str) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        self.handler = lambda_.Function(
            self,
            "Handler",
            runtime=lambda_.Runtime.PYTHON_3_14,
            handler="handler.on_event",
            code=lambda_.Code.from_asset(str(CLEANUP_HANDLER_DIR), exclude=["__pycache__"]),
            timeout=CLEANUP_TIMEOUT,
            description=f"Deletes detached ENIs Cilium created for EKS cluster {cluster_name}",
            log_group=logs.LogGroup(
                self, "Logs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
            ),
        )
        self.handler.add_to_role_policy(iam.PolicyStatement(actions=["ec2:DescribeNetworkInterfaces"], resources=["*"]))
        self.handler.add_to_role_policy(
            iam.PolicyStatement(
                actions=["ec2:DeleteNetworkInterface"], resources=[_own_enis(stack)], conditions=_tagged_by_cilium(cluster_name)
            )
        )
        self.provider = cr.Provider(self, "Provider", on_event_handler=self.handler)
        self.resource = CustomResource(
            self,
            "Resource",
            service_token=self.provider.service_token,
            resource_type="Custom::CiliumEniCleanup",
            properties={"ClusterName": cluster_name},
        )
