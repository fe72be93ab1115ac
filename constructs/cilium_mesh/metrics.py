"""MeshMetrics: the mesh's metrics stored in Amazon Managed Service for Prometheus (AMP), with rules and alerts.

AMP's managed collector (AWS::APS::Scraper) scrapes Cilium's agent, operator,
cilium-envoy and Hubble from inside the VPC with manifests/metrics/prometheus/scrape-config.yaml,
so no Prometheus runs in the cluster. The workspace evaluates the rule file rendered from the declared
services (metrics_files.rule_file: one group per service from service-rules.yaml, one over their
namespaces from namespace-rules.yaml; one rule groups namespace), and its alert manager sends alerts
to an encrypted SNS topic.

Every AMP document goes into its property as its own text, not base64: ConfigurationBlob,
AlertManagerDefinition and the rule groups' Data are all blobs in the AMP API, and the SDK
base64-encodes a blob on the wire. ConfigurationBlob's one-line description says "base 64
encoded", but CloudFormation's own example for AWS::APS::Scraper passes the YAML as it is; the
published handlers of the other two (aws-cloudformation/aws-cloudformation-resource-providers-aps,
aws-aps-workspace and aws-aps-rulegroupsnamespace cmd/resource/resource.go) hand the string to the
SDK as ``[]byte(*model.Data)``; Terraform's aws_prometheus_scraper does the same with its
scrape_configuration (internal/service/amp/scraper.go, ``Value: []byte(...)``). A base64 text
there would reach the collector as a document that is one string (promtool: "cannot unmarshal !!str").
checks/amp_api.py takes each property to what AMP receives, and the tests check that with promtool and amtool.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import yaml
from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_aps as aps
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

from .manifests import load_documents
from .metrics_files import METRICS_PORTS, RULES_NAMESPACE, SCRAPE_CONFIG_FILE, SCRAPER_RBAC_FILE, rule_file
from .traffic import MeshService


def alert_manager_definition(topic_arn: str, region: str) -> str:
    """AMP's alert manager: every alert to the SNS topic, grouped per alert, service and version."""
    config = {
        "route": {
            "receiver": "sns",
            "group_by": ["alertname", "namespace", "service", "destination", "version"],
            "group_wait": "30s",
            "repeat_interval": "4h",
        },
        "receivers": [
            {
                "name": "sns",
                "sns_configs": [
                    {
                        "topic_arn": topic_arn,
                        "sigv4": {"region": region},
                        "subject": "[{{ .Status }}] {{ .CommonLabels.alertname }}",
                        "attributes": {"severity": "{{ .CommonLabels.severity }}"},
                    }
                ],
            }
        ],
    }
    # AMP's format: Alertmanager's own configuration as a block under alertmanager_config.
    return "alertmanager_config: |\n" + textwrap.indent(yaml.safe_dump(config, sort_keys=False), "  ")


@dataclass(frozen=True)
class MeshMetricsProps:
    """What MeshMetrics needs.

    cluster:         the cluster whose Cilium pods are scraped (its VPC and cluster security group).
    private_subnets: the nodes' private subnets, where the collector runs.
    services:        the declared services: one rule group each (their split, failover, errors, alerts).
    alert_email:     an address subscribed to the alerts topic; None (default): no subscription.
    encryption:      "wireguard" adds its rule group (manifests/metrics/prometheus/encryption-rules.yaml);
                     default "none".
    node_security_group: the nodes' security group, opened to the collector on the metrics ports only;
                     None (default): the cluster security group, which EKS managed node groups use.
    """

    cluster: eks.ICluster
    private_subnets: Sequence[ec2.ISubnet]
    services: tuple[MeshService, ...]
    alert_email: str | None = None
    encryption: str = "none"
    node_security_group: ec2.ISecurityGroup | None = None


class MeshMetrics(Construct):
    """An AMP workspace with the mesh's rules, its managed collector for the cluster, and the alerts topic."""

    def __init__(self, scope: Construct, id: str, props: MeshMetricsProps) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        cluster = props.cluster

        key = kms.Key(
            self,
            "AlertsKey",
            description="Encrypts the mesh's alerts topic",
            enable_key_rotation=True,
            pending_window=Duration.days(7),
            removal_policy=RemovalPolicy.DESTROY,
        )
        # AMP's alert manager publishes to the encrypted topic (AMP user guide, "Allow Amazon Managed
        # Service for Prometheus to send alert messages to your Amazon SNS topic").
        key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("aps.amazonaws.com")],
                actions=["kms:GenerateDataKey*", "kms:Decrypt"],
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": stack.account}},
            )
        )
        self.alerts_topic = sns.Topic(self, "Alerts", master_key=key, enforce_ssl=True)
        if props.alert_email:
            from aws_cdk import aws_sns_subscriptions  # only then: each aws-cdk-lib module costs synth time

            self.alerts_topic.add_subscription(aws_sns_subscriptions.EmailSubscription(props.alert_email))

        log_group = logs.LogGroup(
            self, "Logs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
        )
        self.workspace = aps.CfnWorkspace(
            self,
            "Workspace",
            alias=f"{cluster.cluster_name}-mesh",
            alert_manager_definition=alert_manager_definition(self.alerts_topic.topic_arn, stack.region),
            logging_configuration=aps.CfnWorkspace.LoggingConfigurationProperty(log_group_arn=log_group.log_group_arn),
        )
        self.alerts_topic.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("aps.amazonaws.com")],
                actions=["sns:Publish", "sns:GetTopicAttributes"],
                resources=[self.alerts_topic.topic_arn],
                conditions={
                    "ArnEquals": {"aws:SourceArn": self.workspace.attr_arn},
                    "StringEquals": {"aws:SourceAccount": stack.account},
                },
            )
        )
        # Without services or encryption there is nothing to record (an empty rule groups namespace is not made).
        self.rules = aps.CfnRuleGroupsNamespace(
            self, "Rules", name=RULES_NAMESPACE, workspace=self.workspace.attr_arn, data=rule_file(props.services, props.encryption)
        ) if props.services or props.encryption == "wireguard" else None

        self.scraper_security_group = ec2.SecurityGroup(
            self,
            "ScraperSecurityGroup",
            vpc=cluster.vpc,
            description="AMP managed collector: the API server and the Cilium metrics ports on the nodes",
            allow_all_outbound=False,
        )
        # The API server's ENIs are in the cluster security group; the nodes in theirs (often the same one).
        nodes = props.node_security_group or cluster.cluster_security_group
        for group, port, purpose in (
            (nodes, ec2.Port.tcp_range(*METRICS_PORTS), "Cilium metrics"),
            (cluster.cluster_security_group, ec2.Port.tcp(443), "the Kubernetes API (pod discovery)"),
        ):
            self.scraper_security_group.add_egress_rule(group, port, f"AMP collector to {purpose}")
            group.add_ingress_rule(self.scraper_security_group, port, f"{purpose} from the AMP collector")

        # The collector lists pods through the API server as `aps-collector-user`, whose access entry
        # AMP creates for its service-linked role; this is all that user may do.
        self.scraper_rbac = eks.KubernetesManifest(
            self, "ScraperRbac", cluster=cluster, manifest=load_documents(SCRAPER_RBAC_FILE)
        )
        self.scraper = aps.CfnScraper(
            self,
            "Scraper",
            alias=f"{cluster.cluster_name}-cilium",
            source=aps.CfnScraper.SourceProperty(
                eks_configuration=aps.CfnScraper.EksConfigurationProperty(
                    cluster_arn=cluster.cluster_arn,
                    subnet_ids=[subnet.subnet_id for subnet in props.private_subnets],
                    security_group_ids=[self.scraper_security_group.security_group_id],
                )
            ),
            scrape_configuration=aps.CfnScraper.ScrapeConfigurationProperty(
                configuration_blob=SCRAPE_CONFIG_FILE.read_text()
            ),
            destination=aps.CfnScraper.DestinationProperty(
                amp_configuration=aps.CfnScraper.AmpConfigurationProperty(workspace_arn=self.workspace.attr_arn)
            ),
            # Discovery, scrape and write errors, beside the workspace's rule and alert manager errors.
            scraper_logging_configuration=aps.CfnScraper.ScraperLoggingConfigurationProperty(
                logging_destination=aps.CfnScraper.ScraperLoggingDestinationProperty(
                    cloud_watch_logs=aps.CfnScraper.CloudWatchLogDestinationProperty(log_group_arn=log_group.log_group_arn)
                ),
                scraper_components=[
                    aps.CfnScraper.ScraperComponentProperty(type=component)
                    for component in ("SERVICE_DISCOVERY", "COLLECTOR", "EXPORTER")
                ],
            ),
        )
        self.scraper.node.add_dependency(self.scraper_rbac)
