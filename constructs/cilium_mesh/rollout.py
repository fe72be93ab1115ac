"""TrafficRollouts: the one owner of each declared service's CiliumEnvoyConfig, which it applies at once
or as a gated canary, each service apart (its own custom resource, judged on its own series).

One custom resource per service, all on one aws-cdk-lib Provider framework (one pair of Lambdas
however many services): on_event applies the first step, and the
framework's waiter (a Step Functions state machine) calls is_complete every QUERY_INTERVAL_S until
the last step is applied, the gate stops the rollout, or the hour CloudFormation gives a custom
resource is over. Its Lambda (rollout_lambda.py) reaches the cluster only through the kubectl
provider's own handler, and AMP with SigV4. The steps and the gate are rollout_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aws_cdk import CustomResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import custom_resources as cr
from constructs import Construct, IConstruct

from .rollout_load import load_documents_of
from .rollout_plan import QUERY_INTERVAL_S, RESOURCE_TYPE, SERVICE_TIMEOUT_S, resource_properties
from .traffic import MeshService

PACKAGE_DIR = Path(__file__).resolve().parent
# What the Lambda's package holds: the handlers and the two modules they render and judge with.
LAMBDA_FILES = ("rollout_lambda.py", "rollout_plan.py", "traffic.py")
# One call: a kubectl get and an apply through the kubectl handler (each INVOKE_ATTEMPTS x
# INVOKE_READ_TIMEOUT_S at most) and the gate's queries (tests/test_rollout.py adds them up).
HANDLER_TIMEOUT = Duration.minutes(10)


@dataclass(frozen=True)
class RolloutGate:
    """What a gated rollout reads: the AMP workspace's ``api/v1/query`` URL, the workspace (for
    aps:QueryMetrics), and the rules it must come after (MeshMetrics.rules)."""

    query_url: str
    workspace_arn: str
    rules: IConstruct


@dataclass(frozen=True)
class TrafficRolloutsProps:
    """What TrafficRollouts needs.

    cluster:        the cluster, whose kubectl provider handler applies the CiliumEnvoyConfigs.
    services:       the declared services; each one's rollout settings say how its weights change.
    gate:           AMP, for the services with rollout settings (None: none may have them).
    network_policy: whether a rollout's load gets its own egress policy.
    """

    cluster: eks.ICluster
    services: tuple[MeshService, ...]
    gate: RolloutGate | None
    network_policy: bool = True


class TrafficRollouts(Construct):
    """Each service's CiliumEnvoyConfig, its weights stepped and gated on AMP when it has rollout settings."""

    def __init__(self, scope: Construct, id: str, props: TrafficRolloutsProps) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        gated = [s for s in props.services if s.rollout is not None]
        if gated and props.gate is None:
            raise ValueError(f"services[{gated[0].name}].rollout: needs the metrics (a RolloutGate on AMP) to judge its steps")
        kubectl_handler = props.cluster.kubectl_provider.node.find_child("Handler")
        code = lambda_.Code.from_asset(str(PACKAGE_DIR), exclude=["*", *(f"!{name}" for name in LAMBDA_FILES)])
        self.functions = {
            name: lambda_.Function(
                self,
                name,
                runtime=lambda_.Runtime.PYTHON_3_14,
                handler=f"rollout_lambda.{handler}",
                code=code,
                timeout=HANDLER_TIMEOUT,
                description=f"{description} of the mesh's CiliumEnvoyConfigs' rollouts",
                log_group=logs.LogGroup(
                    self, f"{name}Logs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
                ),
            )
            for name, handler, description in (
                ("OnEvent", "on_event", "Plans and starts each change"),
                ("IsComplete", "is_complete", "Gates and steps each change"),
            )
        }
        for function in self.functions.values():
            function.add_to_role_policy(
                iam.PolicyStatement(actions=["lambda:InvokeFunction"], resources=[kubectl_handler.function_arn])
            )
        self.functions["OnEvent"].add_to_role_policy(
            iam.PolicyStatement(actions=["cloudformation:DescribeStacks"], resources=[stack.stack_id])
        )
        if gated:
            self.functions["IsComplete"].add_to_role_policy(
                iam.PolicyStatement(actions=["aps:QueryMetrics"], resources=[props.gate.workspace_arn])
            )
        self.provider = cr.Provider(
            self,
            "Provider",
            on_event_handler=self.functions["OnEvent"],
            is_complete_handler=self.functions["IsComplete"],
            query_interval=Duration.seconds(QUERY_INTERVAL_S),
            total_timeout=Duration.seconds(SERVICE_TIMEOUT_S),
            disable_waiter_state_machine_logging=False,
            waiter_state_machine_log_options=cr.LogOptions(
                destination=logs.LogGroup(
                    self, "WaiterLogs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
                ),
                level=sfn.LogLevel.ALL,
            ),
        )
        self.resources = {}
        for service in props.services:
            properties = resource_properties(
                props.cluster.cluster_name,
                kubectl_handler.function_arn,
                service.to_json(),
                service.rollout,
                props.gate.query_url if service.rollout else None,
                load_documents_of(service, props.network_policy),
            )
            resource = CustomResource(
                self,
                f"{service.namespace}-{service.name}",
                service_token=self.provider.service_token,
                resource_type=RESOURCE_TYPE,
                properties=properties,
                service_timeout=Duration.seconds(SERVICE_TIMEOUT_S),
            )
            if service.rollout:
                resource.node.add_dependency(props.gate.rules)
            self.resources[service.key] = resource
