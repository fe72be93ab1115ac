"""The EKS stack: network, cluster, nodes, add-ons, load balancer controller and CiliumMesh; or, with
``existing_cluster``, CiliumMesh on a cluster the user runs, through a kubectl provider of its own."""

from __future__ import annotations

import importlib

from aws_cdk import Acknowledgment, Annotations, CfnOutput, CfnResource, Duration, Environment, Fn, RemovalPolicy, Stack, Tags, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from cilium_mesh import CiliumMesh, CiliumMeshProps, MeshService
from cilium_mesh.declaration import sample_service
from cilium_mesh.eni import EniCleanup
from cilium_mesh.mesh import STEP_TIMEOUT
from cilium_mesh.metrics import MeshMetrics, MeshMetricsProps
from cilium_mesh.rollout import RolloutGate
from cilium_mesh.rollout_plan import RESOURCE_TYPE as ROLLOUT_RESOURCE_TYPE
from cilium_mesh.smoke import SmokeTest, SmokeTestProps
from constructs import Construct

from .config import MeshConfig
from .network import CONTROL_PLANE_SUBNETS, NODE_CIDR, NODE_SUBNET_TAG, NODE_SUBNETS, VPC_CIDR, WIREGUARD_PORT, covering_cidr
from .versions import KUBERNETES_RELEASES

LOAD_BALANCER_CONTROLLER_VERSION = eks.AlbControllerVersion.V3_2_2

LOG_RETENTION = logs.RetentionDays.ONE_MONTH
CILIUM_NOT_READY_TAINT = "node.cilium.io/agent-not-ready"
# Keys of the controller chart 3.2.2 (aws/eks-charts stable/aws-load-balancer-controller/values.yaml).
LOAD_BALANCER_CONTROLLER_VALUES = {
    "enableServiceMutatorWebhook": False,
    "webhookConfig": {"disableIngressValidation": True},
    "dnsPolicy": "Default",
}


class CiliumEksStack(Stack):
    """Everything one `cdk deploy` builds; `cdk destroy` removes it in dependency order."""

    def __init__(self, scope: Construct, construct_id: str, *, config: MeshConfig, **kwargs) -> None:
        super().__init__(scope, construct_id, env=Environment(region=config.region), **kwargs)
        self.config = config

        self.eni = config.datapath == "eni"
        self.existing = config.existing_cluster
        if self.existing:
            # The user's VPC, nodes, add-ons and load balancer controller are theirs: nothing of them is created.
            self.vpc, self.private_subnets, self.cluster = self._imported_cluster()
            self.nodes = self.load_balancer_controller = None
        else:
            self.vpc = self._network()
            self.private_subnets = self.vpc.select_subnets(subnet_group_name=NODE_SUBNETS).subnets
            self.cluster = self._cluster()
            self.nodes = self._nodes()
            self.load_balancer_controller = self._load_balancer_controller()
        if config.metrics:
            self.metrics = MeshMetrics(
                self,
                "Metrics",
                MeshMetricsProps(cluster=self.cluster, private_subnets=self.private_subnets, services=config.services,
                                 alert_email=config.alert_email, encryption=config.encryption,
                                 node_security_group=self._node_security_group()),
            )  # fmt: skip
        self.mesh = CiliumMesh(
            self,
            "CiliumMesh",
            CiliumMeshProps(
                cluster=self.cluster,
                nodes=self.nodes,
                load_balancer_controller=self.load_balancer_controller,
                cilium_version=config.cilium_version,
                cluster_name=config.cluster_name,
                services=config.services,
                sample_app=config.sample_app,
                rollout_gate=self._rollout_gate(),
                network_policy=config.network_policy,
                datapath=config.datapath,
                existing_cluster=self.existing is not None,
                encryption=config.encryption,
                strict_mode_cidr=NODE_CIDR if config.encryption == "wireguard" else None,
            ),
        )
        self.traffic = self.mesh.traffic
        if config.encryption == "wireguard":
            nodes = self.cluster.cluster_security_group
            nodes.add_ingress_rule(nodes, ec2.Port.udp(WIREGUARD_PORT), "WireGuard between the nodes (Cilium)")
        if self.eni:
            self.eni_cleanup = EniCleanup(self, "CiliumEniCleanup", cluster_name=config.cluster_name)
            self.eni_cleanup.node.add_dependency(self.vpc)
            self.nodes.node.add_dependency(self.eni_cleanup)
        if not self.existing:
            self.coredns = self._cluster_dns()
        if config.smoke_test:
            self.smoke_test = SmokeTest(
                self,
                "SmokeTest",
                SmokeTestProps(
                    cluster=self.cluster,
                    services=config.services,
                    datapath=config.datapath,
                    network_policy=config.network_policy,
                    sample_app=config.sample_app,
                    encryption=config.encryption,
                    # Every manifest it checks: the services', the sample's, and every CiliumEnvoyConfig.
                    after=(*self.mesh.manifests_after, *self.mesh.manifests.values(), *self.traffic.resources.values()),
                ),
            )
        if self.existing:
            self._kubernetes_steps_after_the_access_entry()
        self._outputs()
        self._acknowledge_findings()

    def _rollout_gate(self) -> RolloutGate | None:
        """AMP for the services' gated rollouts: the workspace's query API, after the rules the gate reads."""
        if not self.config.metrics or self.metrics.rules is None:
            return None
        workspace = self.metrics.workspace
        return RolloutGate(query_url=Fn.join("", [workspace.attr_prometheus_endpoint, "api/v1/query"]),
                           workspace_arn=workspace.attr_arn, rules=self.metrics.rules)  # fmt: skip

    def _network(self) -> ec2.Vpc:
        flow_log_group = logs.LogGroup(
            self, "VpcFlowLogs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(VPC_CIDR),
            availability_zones=list(self.config.availability_zones),
            nat_gateways=len(self.config.availability_zones),
            # In this order, allocated one after the other: the public subnets (NAT gateways, the NLB, and
            # the VPC's resolver at .2), small subnets for the control plane's ENIs (and the kubectl
            # provider), space held free, and the nodes' and pods' subnets last, together one CIDR
            # (NODE_CIDR) that holds nothing else: WireGuard's strict mode drops unencrypted pod traffic
            # to it, so the resolver and the API server must lie outside it (docs/encryption.md).
            subnet_configuration=[
                ec2.SubnetConfiguration(name="Public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=22),
                ec2.SubnetConfiguration(name=CONTROL_PLANE_SUBNETS, subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=26),
                ec2.SubnetConfiguration(name="Spare", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=19, reserved=True),
                ec2.SubnetConfiguration(name=NODE_SUBNETS, subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=19),
            ],
            flow_logs={
                "All": ec2.FlowLogOptions(destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_log_group))
            },
        )
        for subnet in vpc.public_subnets:
            Tags.of(subnet).add("kubernetes.io/role/elb", "1")
        nodes = vpc.select_subnets(subnet_group_name=NODE_SUBNETS).subnets
        for subnet in nodes:
            Tags.of(subnet).add(NODE_SUBNET_TAG[0], NODE_SUBNET_TAG[1])
        if covering_cidr(subnet.ipv4_cidr_block for subnet in nodes) != NODE_CIDR:
            raise AssertionError(f"the node subnets are not {NODE_CIDR}: {[s.ipv4_cidr_block for s in nodes]}")
        return vpc

    def _cluster(self) -> eks.Cluster:
        config = self.config
        release = KUBERNETES_RELEASES[config.kubernetes_version]
        layer_class = getattr(importlib.import_module(release.layer_module), release.layer_class)
        control_plane_logs = logs.LogGroup(
            self,
            "ControlPlaneLogs",
            log_group_name=f"/aws/eks/{config.cluster_name}/cluster",
            retention=LOG_RETENTION,
            removal_policy=RemovalPolicy.DESTROY,
        )
        secrets_key = kms.Key(
            self,
            "SecretsKey",
            description=f"EKS secrets envelope encryption for {config.cluster_name}",
            enable_key_rotation=True,
            pending_window=Duration.days(7),
            removal_policy=RemovalPolicy.DESTROY,
        )
        cluster = eks.Cluster(
            self,
            "Cluster",
            cluster_name=config.cluster_name,
            version=eks.KubernetesVersion.of(config.kubernetes_version),
            vpc=self.vpc,
            vpc_subnets=[ec2.SubnetSelection(subnet_group_name=CONTROL_PLANE_SUBNETS)],
            default_capacity_type=eks.DefaultCapacityType.NODEGROUP,
            default_capacity=0,
            bootstrap_self_managed_addons=False,
            bootstrap_cluster_creator_admin_permissions=True,
            endpoint_access=eks.EndpointAccess.PUBLIC_AND_PRIVATE.only_from(*config.endpoint_public_cidrs),
            cluster_logging=[
                eks.ClusterLoggingTypes.API,
                eks.ClusterLoggingTypes.AUDIT,
                eks.ClusterLoggingTypes.AUTHENTICATOR,
            ],
            secrets_encryption_key=secrets_key,
            kubectl_provider_options=eks.KubectlProviderOptions(kubectl_layer=layer_class(self, "KubectlLayer")),
            output_config_command=False,
        )
        cluster.node.add_dependency(control_plane_logs)
        if config.admin_principal_arn:
            cluster.grant_cluster_admin("AdminPrincipalAccess", config.admin_principal_arn)

        if not self.eni:
            self.vpc_cni = eks.Addon(self, "VpcCni", cluster=cluster, addon_name="vpc-cni", preserve_on_delete=False)
        return cluster

    def _imported_cluster(self) -> tuple[ec2.IVpc, list[ec2.ISubnet], eks.ICluster]:
        """The user's cluster, imported from the setting alone (synth looks nothing up), with a kubectl provider
        of the stack's own and an access entry that lets that provider's role administer the cluster.

        ``Cluster.from_cluster_attributes`` reads ``kubectl_provider`` and ignores ``kubectl_provider_options``
        (aws-cdk-lib 2.275 aws-eks-v2 cluster.js, ImportedCluster), and a KubectlProvider needs a cluster: so
        the cluster is imported once for the provider, then again with it. The provider's Lambda runs
        ``aws eks update-kubeconfig`` as its own role; with private access it runs in the private subnets
        with the cluster security group (KubectlProvider's default for it).
        """
        existing = self.existing
        release = KUBERNETES_RELEASES[existing.kubernetes_version]
        layer_class = getattr(importlib.import_module(release.layer_module), release.layer_class)
        # Zones only for the VPC's interface: every subnet is named by ID.
        vpc = ec2.Vpc.from_vpc_attributes(self, "Vpc", vpc_id=existing.vpc_id, availability_zones=list(self.config.availability_zones))
        subnets = [ec2.Subnet.from_subnet_id(self, f"PrivateSubnet{i}", subnet) for i, subnet in enumerate(existing.private_subnet_ids)]
        for subnet in subnets:
            # Nothing here reads a route table: the subnets only place the collector and the provider's Lambda.
            Annotations.of(subnet).acknowledge_warning("@aws-cdk/aws-ec2:noSubnetRouteTableId", "no route table is read")
        attributes = {"cluster_name": existing.name, "vpc": vpc, "cluster_security_group_id": existing.cluster_security_group_id,
                      "cluster_endpoint": existing.endpoint}  # fmt: skip
        reference = eks.Cluster.from_cluster_attributes(self, "ClusterReference", **attributes)
        self.kubectl_provider = eks.KubectlProvider(
            self,
            "KubectlProvider",
            cluster=reference,
            kubectl_layer=layer_class(self, "KubectlLayer"),
            private_subnets=subnets if existing.provider_in_vpc else None,
        )
        cluster = eks.Cluster.from_cluster_attributes(self, "Cluster", **attributes, kubectl_provider=self.kubectl_provider)
        self.kubectl_access = eks.AccessEntry(
            self,
            "KubectlProviderAccess",
            cluster=cluster,
            principal=self.kubectl_provider.role.role_arn,
            access_policies=[
                eks.AccessPolicy.from_access_policy_name(
                    "AmazonEKSClusterAdminPolicy", access_scope_type=eks.AccessScopeType.CLUSTER
                )
            ],
        )
        return vpc, subnets, cluster

    def _node_security_group(self) -> ec2.ISecurityGroup | None:
        """An existing cluster's nodes' own security group, when the setting names one (else the cluster's)."""
        group = self.existing and self.existing.node_security_group_id
        return ec2.SecurityGroup.from_security_group_id(self, "NodeSecurityGroup", group) if group else None

    def _kubernetes_steps_after_the_access_entry(self) -> None:
        """Every resource whose requests run kubectl (the chart, manifests, object values, and the rollout,
        whose Lambda calls the provider) comes after the access entry, and so is deleted before it: a
        created cluster's kubectl barrier does that for a created cluster, an imported one has none."""
        for construct in self.node.find_all():
            if isinstance(construct, CfnResource) and (
                construct.cfn_resource_type.startswith("Custom::AWSCDK-EKS-") or construct.cfn_resource_type == ROLLOUT_RESOURCE_TYPE
            ):
                construct.node.add_dependency(self.kubectl_access)

    def _nodes(self) -> eks.Nodegroup:
        config = self.config
        launch_template = ec2.LaunchTemplate(
            self,
            "NodeLaunchTemplate",
            require_imdsv2=True,
            http_put_response_hop_limit=1,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(50, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3),
                )
            ],
        )
        node_role = iam.Role(
            self,
            "NodeRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(name) for name in self._node_policies()],
        )
        nodes = self.cluster.add_nodegroup_capacity(
            "Nodes",
            instance_types=[ec2.InstanceType(config.node_instance_type)],
            ami_type=eks.NodegroupAmiType.AL2023_X86_64_STANDARD,
            min_size=config.node_count,
            desired_size=config.node_count,
            max_size=config.node_count * 2,
            subnets=ec2.SubnetSelection(subnet_group_name=NODE_SUBNETS),
            node_role=node_role,
            launch_template_spec=eks.LaunchTemplateSpec(
                id=launch_template.launch_template_id, version=launch_template.latest_version_number
            ),
            taints=[eks.TaintSpec(effect=eks.TaintEffect.NO_EXECUTE, key=CILIUM_NOT_READY_TAINT, value="true")],
        )
        if not self.eni:
            nodes.node.add_dependency(self.vpc_cni)
        return nodes

    def _node_policies(self) -> tuple[str, ...]:
        """What a node needs: join the cluster and pull images; with chaining also the VPC CNI's ENI rights
        (aws-node runs with the node's role). With eni only Cilium's operator, by its own role, has those."""
        cni = () if self.eni else ("AmazonEKS_CNI_Policy",)
        return ("AmazonEKSWorkerNodePolicy", *cni, "AmazonEC2ContainerRegistryReadOnly")

    def _cluster_dns(self) -> eks.Addon:
        """coredns, created beside Cilium (both after the nodes, neither waiting for the other).

        Cilium's chart waits for hubble-relay, which is Ready only once it finds its
        peers through cluster DNS; coredns in turn needs Cilium to route the
        ``kubernetes`` Service and to lift the agent-not-ready taint. So neither may
        come after the other (checks/readiness.py checks it).
        """
        coredns = eks.Addon(self, "CoreDns", cluster=self.cluster, addon_name="coredns", preserve_on_delete=False)
        coredns.node.add_dependency(self.nodes)
        return coredns

    def _load_balancer_controller(self) -> eks.AlbController:
        """AWS Load Balancer Controller, for the `cilium-ingress` NLB.

        Its pods cannot schedule before Cilium lifts the agent-not-ready taint,
        and Cilium comes after it, so its chart must not wait: the ``Wait``
        property is removed (CloudFormation hands the Lambda ``"false"``, which
        the kubectl handler reads as true). Its webhooks that would judge our
        objects while its pods are not serving yet are off: the Service mutator
        (every Service) and Ingress validation (every Ingress, whatever its class;
        we use no ALB Ingress). It resolves AWS endpoints with the node's resolver
        (``dnsPolicy: Default``), so on destroy it can delete the NLB whether or
        not coredns is still there. Cilium depends on it: on destroy the
        controller outlives ``cilium-ingress``. The chart (not its service account
        and IAM role, which need no nodes) comes after the nodes.
        """
        controller = eks.AlbController(
            self,
            "LoadBalancerController",
            cluster=self.cluster,
            version=LOAD_BALANCER_CONTROLLER_VERSION,
            additional_helm_chart_values=LOAD_BALANCER_CONTROLLER_VALUES,
        )
        chart = controller.node.find_child("Resource")
        chart_resource = chart.node.default_child.node.default_child
        chart_resource.add_property_deletion_override("Wait")
        chart_resource.add_property_override("Timeout", f"{STEP_TIMEOUT.to_seconds()}s")
        chart.node.add_dependency(self.nodes)
        return controller

    def _outputs(self) -> None:
        config = self.config
        if config.sample_app:
            CfnOutput(self, "AppUrl", value=f"http://{self.mesh.ingress_hostname.value}")
        CfnOutput(
            self,
            "UpdateKubeconfig",
            value=f"aws eks update-kubeconfig --region {config.region} --name {config.cluster_name}",
        )
        CfnOutput(
            self,
            "HubbleUi",
            value="kubectl -n kube-system port-forward svc/hubble-ui 12000:80  # then open http://localhost:12000",
        )
        if config.sample_app:
            CfnOutput(self, "CheckTrafficSplit", value=_traffic_check_command(config.service(sample_service().key)))
        if config.metrics:
            CfnOutput(self, "PrometheusEndpoint", value=self.metrics.workspace.attr_prometheus_endpoint)
            CfnOutput(self, "AlertsTopic", value=self.metrics.alerts_topic.topic_arn)

    def _acknowledge_findings(self) -> None:
        """cdk-nag AwsSolutions findings that are accepted, each on its construct, with its concrete cause."""
        kubectl_provider = self.cluster.kubectl_provider
        handler = kubectl_provider.node.find_child("Handler")
        framework = kubectl_provider.node.find_child("Provider").node.find_child("framework-onEvent")
        in_vpc = not self.existing or self.existing.provider_in_vpc
        lambda_basic = ["service-role/AWSLambdaBasicExecutionRole"]
        lambda_runs = [*lambda_basic, "service-role/AWSLambdaVPCAccessExecutionRole"] if in_vpc else lambda_basic
        where = "in the VPC " if in_vpc else ""
        ecr_public = (
            f'{{"Fn::If":["{self.get_logical_id(handler.node.find_child("HasEcrPublic"))}",{{"Fn::Join":["",["arn:",'
            '{"Ref":"AWS::Partition"},":iam::aws:policy/AmazonElasticContainerRegistryPublicReadOnly"]]},'
            '{"Ref":"AWS::NoValue"}]}'
        )
        handler_id = self.get_logical_id(handler.node.default_child)
        acknowledgements = [
            (
                handler.role,
                [_managed_policy(name) for name in (*lambda_runs, "AmazonEC2ContainerRegistryReadOnly")]
                + [f"AwsSolutions-IAM4[Policy::{ecr_public}]"],
                f"The kubectl provider's Lambda (aws_eks_v2.KubectlProvider) runs {where}with "
                f"{' and '.join(name.split('/')[-1] for name in lambda_runs)}, and reads its image layers "
                "with the ECR read-only policies.",
            ),
            (
                handler,
                ["AwsSolutions-L1"],
                "aws-cdk-lib pins the kubectl provider's runtime to the one its kubectl and helm layer supports.",
            ),
            (
                framework.role,
                [_managed_policy(name) for name in lambda_runs],
                f"The CDK custom-resource framework Lambda behind the kubectl provider runs {where}with "
                f"{' and '.join(name.split('/')[-1] for name in lambda_runs)}.",
            ),
            (
                framework.role,
                [f"AwsSolutions-IAM5[Resource::<{handler_id}.Arn>:*]"],
                "The custom-resource framework invokes every version (':*') of the kubectl provider's own handler.",
            ),
        ]
        if not self.existing:
            acknowledgements += self._created_cluster_acknowledgements()
        if self.eni:
            acknowledgements += self._eni_acknowledgements()
        traffic = self.traffic
        acknowledgements += self._provider_acknowledgements(
            traffic.provider, list(traffic.functions.values()), "the traffic rollout"
        )
        for construct, findings, reason in acknowledgements:
            Validations.of(construct).acknowledge(*(Acknowledgment(id=f, reason=reason) for f in findings))


    def _created_cluster_acknowledgements(self) -> list[tuple]:
        controller_role = self.load_balancer_controller.node.find_child("alb-sa").node.find_child("Role")
        elb = "arn:<AWS::Partition>:elasticloadbalancing:*:*:"
        return [
            (
                self.cluster.role,
                [_managed_policy("AmazonEKSClusterPolicy")],
                "EKS requires the AWS managed AmazonEKSClusterPolicy on the cluster service role.",
            ),
            (
                self.nodes.role,
                [_managed_policy(name) for name in self._node_policies()],
                "Nodes need exactly AmazonEKSWorkerNodePolicy (join the cluster), AmazonEC2ContainerRegistryReadOnly "
                "(pull images) and, with the VPC CNI (datapath chaining), AmazonEKS_CNI_Policy (it assigns pod IPs).",
            ),
            (
                controller_role,
                [
                    f"AwsSolutions-IAM5[Resource::{resource}]"
                    for resource in (
                        "*",
                        "arn:<AWS::Partition>:ec2:*:*:security-group/*",
                        f"{elb}targetgroup/*/*",
                        f"{elb}loadbalancer/net/*/*",
                        f"{elb}loadbalancer/app/*/*",
                        f"{elb}listener/net/*/*/*",
                        f"{elb}listener/app/*/*/*",
                        f"{elb}listener-rule/net/*/*/*",
                        f"{elb}listener-rule/app/*/*/*",
                    )
                ],
                "The AWS Load Balancer Controller's published IAM policy (v3.2.2, bundled by aws-cdk-lib) "
                "manages load balancers, target groups and security groups whose names it picks at run time.",
            ),
        ]

    def _eni_acknowledgements(self) -> list[tuple]:
        identity = self.mesh.operator_identity
        cleanup = self.eni_cleanup
        own_enis = f"AwsSolutions-IAM5[Resource::arn:aws:ec2:{self.config.region}:<AWS::AccountId>:network-interface/*]"
        return [
            (
                identity.policy,
                ["AwsSolutions-IAM5[Resource::*]", own_enis],
                "Cilium's operator (ENI IPAM) needs the EC2 actions Cilium's docs list: the Describe actions "
                "have no resource-level permissions; it creates ENIs in subnets and security groups it picks at "
                "run time, attaches them to the node group's instances and assigns addresses on every ENI of a "
                "node, so those are limited to this region; CreateTags only while creating an ENI, and "
                "DeleteNetworkInterface only on ENIs tagged as Cilium's for this cluster.",
            ),
            (
                cleanup.handler,
                ["AwsSolutions-IAM5[Resource::*]", own_enis],
                "The ENI cleanup lists ENIs (DescribeNetworkInterfaces has no resource-level permissions) and may "
                "delete only ENIs tagged as Cilium's for this cluster.",
            ),
        ] + self._provider_acknowledgements(cleanup.provider, [cleanup.handler], "the ENI cleanup")

    def _provider_acknowledgements(self, provider, handlers: list, what: str) -> list[tuple]:
        """The findings every aws-cdk-lib Provider framework has: its Lambdas' managed logging policy and
        their invoking every version (':*') of the functions they call; with a waiter, its state machine's."""
        basic_execution = [_managed_policy("service-role/AWSLambdaBasicExecutionRole")]
        framework_names = [n for n in ("framework-onEvent", "framework-isComplete", "framework-onTimeout") if provider.node.try_find_child(n)]
        frameworks = [provider.node.find_child(n) for n in framework_names]
        handler_ids = [self.get_logical_id(h.node.default_child) for h in handlers]
        acknowledgements = [
            (handler, basic_execution, f"The Lambda of {what} writes its logs with AWSLambdaBasicExecutionRole.")
            for handler in handlers
        ]
        for framework in frameworks:
            acknowledgements += [
                (
                    framework,
                    basic_execution,
                    f"The CDK custom-resource framework Lambda behind {what} writes its logs with "
                    "AWSLambdaBasicExecutionRole.",
                ),
                (
                    framework,
                    [f"AwsSolutions-IAM5[Resource::<{i}.Arn>:*]" for i in handler_ids],
                    f"The CDK custom-resource framework invokes every version (':*') of the AWS Lambda handlers of {what}.",
                ),
            ]
        waiter = provider.node.try_find_child("waiter-state-machine")
        if waiter is not None:
            framework_ids = [self.get_logical_id(f.node.default_child) for f in frameworks[1:]]
            acknowledgements += [
                (
                    waiter,
                    [f"AwsSolutions-IAM5[Resource::<{i}.Arn>:*]" for i in framework_ids],
                    f"The CDK custom-resource framework's AWS Step Functions waiter invokes every version (':*') of its isComplete and "
                    f"onTimeout Lambdas for {what}.",
                ),
                (
                    waiter,
                    ["AwsSolutions-IAM5[Resource::*]"],
                    "AWS Step Functions' delivery of its execution logs to CloudWatch Logs (logs:CreateLogDelivery and the "
                    "other log-delivery actions) supports no resource-level permissions.",
                ),
                (
                    waiter,
                    ["AwsSolutions-SF2"],
                    "aws-cdk-lib's Provider framework offers no AWS X-Ray tracing for its waiter state machine; it logs ALL events.",
                ),
            ]
        return acknowledgements


def _managed_policy(name: str) -> str:
    return f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{name}]"


def _traffic_check_command(policy: MeshService) -> str:
    """Shows the sample's policy at work, which the plain Service cannot imitate: the split next to the
    configured weights, and requests pinned by header going only to their version, sent from a pod of
    its first caller (the sample's answers name their version)."""
    url = f"{policy.name}:{policy.port}{policy.check_path}"
    count = 'grep -o "\\"version\\":\\"[0-9]*\\"" | sort | uniq -c'
    weights = " ".join(f"{v}={w}" for v, w in policy.weights.items())
    script = f'echo "configured weights: {weights}"; for i in $(seq 200); do curl -s {url}; echo; done | {count}'
    if policy.pin_header:
        script += (
            f"; for v in {' '.join(policy.versions)}; do echo \"pinned to $v:\"; for i in $(seq 20); do "
            f"curl -s -H \"{policy.pin_header}: $v\" {url}; echo; done | {count}; done"
        )
    caller = policy.callers[0]
    namespace = caller.namespace or policy.namespace
    selector = ",".join(f"{key}={value}" for key, value in caller.labels.items())
    pod = f'"$(kubectl -n {namespace} get pod -l {selector} -o name | head -n 1)"'
    return f"kubectl -n {namespace} exec {pod} -- sh -c '{script}'"

