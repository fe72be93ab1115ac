"""An existing cluster (`existing_cluster`): imported from the setting alone, reached through the stack's own
kubectl provider and access entry, with nothing of the user's created or changed beyond the collector's ports."""

from __future__ import annotations

import json

import pytest
from cilium_mesh.manifests import CILIUM_EXISTING_CLUSTER_FILE, load_documents
from cilium_mesh.metrics_files import METRICS_PORTS
from cilium_mesh.values import cilium_values
from conftest import CONTEXT, EXISTING_CLUSTER, NODE_SECURITY_GROUP, ROOT, manifest_documents, normalize_assets, update_requested
from stacks.config import ConfigError, load_config

from checks.cilium_chart import chart_values, dead_keys, render, supported_charts
from checks.deploy_graph import Graph
from checks.kubectl_layer import layer_helm
from checks.provider_dry_run import find_step, kubectl_step
from checks.readiness import EXISTING, check_admission, check_destroy, check_waits, helm_major, provider_ids
from checks.schemas import validate_object

ENDPOINT_HOST = EXISTING_CLUSTER["endpoint"].removeprefix("https://")
USERS_GROUP = EXISTING_CLUSTER["cluster_security_group_id"]
SNAPSHOTS = {"private": ROOT / "tests" / "snapshots" / "CiliumMeshEks.existing.template.json",
             "public": ROOT / "tests" / "snapshots" / "CiliumMeshEks.existing-public.template.json"}  # fmt: skip


@pytest.fixture(params=["private", "public"])
def existing(request):
    return request.getfixturevalue("synth_existing" if request.param == "private" else "synth_existing_public")


def test_nothing_of_the_users_cluster_is_created(existing):
    types = {r["Type"] for r in existing.template["Resources"].values()}
    for created in ("AWS::EC2::VPC", "AWS::EC2::Subnet", "AWS::EKS::Cluster", "AWS::EKS::Nodegroup", "AWS::EKS::Addon",
                    "AWS::EC2::NatGateway", "AWS::EC2::LaunchTemplate", "AWS::IAM::OIDCProvider"):  # fmt: skip
        assert created not in types, created
    charts = [r["Properties"]["Chart"] for r in existing.resources("Custom::AWSCDK-EKS-HelmChart").values()]
    assert charts == ["cilium"], "the cluster's own load balancer controller stays; only Cilium is installed"
    assert {"AWS::EKS::AccessEntry", "Custom::CiliumTrafficRollout", "AWS::APS::Scraper"} <= types


def test_the_provider_runs_where_it_reaches_the_endpoint(synth_existing, synth_existing_public):
    """Private access: in the private subnets with the cluster security group. Public only: outside the VPC."""
    def handler(synth):
        function = synth.stack.kubectl_provider.node.find_child("Handler")
        return synth.resource(function)["Properties"]

    vpc = handler(synth_existing)["VpcConfig"]
    assert vpc["SubnetIds"] == EXISTING_CLUSTER["private_subnet_ids"] and vpc["SecurityGroupIds"] == [USERS_GROUP]
    assert "VpcConfig" not in handler(synth_existing_public)


def test_the_access_entry_makes_the_providers_role_cluster_admin(existing):
    (entry,) = existing.resources("AWS::EKS::AccessEntry").values()
    role = existing.stack.kubectl_provider.role.node.default_child
    assert entry["Properties"]["ClusterName"] == EXISTING_CLUSTER["name"]
    assert entry["Properties"]["PrincipalArn"] == {"Fn::GetAtt": [existing.stack.get_logical_id(role), "Arn"]}
    (policy,) = entry["Properties"]["AccessPolicies"]
    assert policy["AccessScope"] == {"Type": "cluster"}
    assert policy["PolicyArn"]["Fn::Join"][1][-1] == ":eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"


def test_every_kubernetes_step_comes_after_the_access_entry_which_is_deleted_last(existing):
    """CloudFormation creates the access entry first and deletes it last: no kubectl call runs without access."""
    graph = Graph(existing.template)
    (entry,) = existing.resources("AWS::EKS::AccessEntry")
    steps = [name for name, r in existing.template["Resources"].items() if kubectl_step(r["Type"])]
    assert len(steps) >= 10
    for step in steps:
        assert entry in graph.after(step), step
    assert not set(steps) & graph.after(entry)


def test_the_collector_opens_only_the_metrics_ports_and_the_api_on_the_users_groups(existing):
    """The user's groups get exactly two ingress rules, both from the collector's own group: the API (443) on
    the cluster security group, the metrics ports on the nodes' (their own group when the setting names one)."""
    scraper_group = existing.logical_id(existing.stack.metrics.scraper_security_group)
    nodes = existing.stack.config.existing_cluster.node_security_group_id or USERS_GROUP
    ingress = [r["Properties"] for r in existing.resources("AWS::EC2::SecurityGroupIngress").values()
               if r["Properties"]["GroupId"] in (USERS_GROUP, nodes)]  # fmt: skip
    assert sorted((r["GroupId"], r["FromPort"], r["ToPort"]) for r in ingress) == sorted([(USERS_GROUP, 443, 443), (nodes, *METRICS_PORTS)])
    assert all(r["SourceSecurityGroupId"] == {"Fn::GetAtt": [scraper_group, "GroupId"]} for r in ingress)
    egress = existing.resources("AWS::EC2::SecurityGroupEgress").values()
    assert not [r for r in egress if r["Properties"]["GroupId"] in (USERS_GROUP, nodes)]
    scraper = existing.resource(existing.stack.metrics.scraper)["Properties"]["Source"]["EksConfiguration"]
    assert scraper["SubnetIds"] == EXISTING_CLUSTER["private_subnet_ids"]


def test_cilium_gets_the_endpoint_and_removes_its_cni_configuration_when_uninstalled(existing):
    (chart,) = existing.resources("Custom::AWSCDK-EKS-HelmChart").values()
    values = json.loads(chart["Properties"]["Values"])
    assert values == cilium_values(ENDPOINT_HOST, "chaining", EXISTING_CLUSTER["name"], CONTEXT["cilium_version"], True)
    assert values["k8sServiceHost"] == ENDPOINT_HOST and values["cni"]["uninstall"] is True
    assert values["cni"]["chainingMode"] == "aws-cni"


@pytest.mark.helm
@pytest.mark.parametrize("chart", supported_charts(), ids=lambda c: c.name)
def test_the_existing_cluster_values_are_keys_of_every_chart_and_render_the_cni_uninstall(chart):
    own = load_documents(CILIUM_EXISTING_CLUSTER_FILE)[0]
    assert dead_keys(own, chart_values(chart)) == []
    version = chart.name.removeprefix("cilium-").removesuffix(".tgz")
    rendered = render(chart, layer_helm(), cilium_values(ENDPOINT_HOST, "chaining", "walkthrough", version, True))
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert 'cni-uninstall: "true"' in rendered.stdout


def test_the_app_and_its_policies_are_the_chaining_stacks_so_the_datapath_model_holds(synth_existing, synth):
    """The same manifests as the created cluster with datapath chaining: checks/datapath.py's chained paths
    (the VPC CNI's addresses, the same policies and identities) are the paths here, unchanged."""
    def applied(s):
        return {name: manifest_documents(s.resource(m)) for name, m in s.stack.mesh.manifests.items()}

    assert applied(synth_existing) == applied(synth)
    assert synth_existing.stack.config.datapath == "chaining"


def test_the_snapshot_is_reviewed(request, existing):
    kind = "private" if existing.stack.config.existing_cluster.provider_in_vpc else "public"
    current = normalize_assets(json.dumps(existing.template, indent=1, sort_keys=True)) + "\n"
    snapshot = SNAPSHOTS[kind]
    if update_requested():
        snapshot.write_text(current)
    assert current == snapshot.read_text(), "template changed: review, then UPDATE_SNAPSHOTS=1 pytest"


# --- the provider dry run: aws-cdk-lib's own handler on the imported cluster -------------------------


def test_every_call_logs_in_to_the_existing_cluster_first(provider_steps_existing):
    for step in provider_steps_existing:
        assert step.commands[0][:5] == ["aws", "eks", "update-kubeconfig", "--name", EXISTING_CLUSTER["name"]], step.logical_id


def test_every_object_the_handler_would_create_is_valid_for_the_clusters_version(provider_steps_existing):
    objects = [d for s in provider_steps_existing if s.request_type == "Create" for d in (s.manifests or [])]
    assert len(objects) > 20
    for document in objects:
        validate_object(document, EXISTING_CLUSTER["kubernetes_version"])


def test_the_charts_wait_workloads_and_admission_are_ready_on_the_running_cluster(synth_existing, provider_steps_existing):
    """Its nodes, cluster DNS and load balancer controller run before the stack (and after it)."""
    graph, ids = Graph(synth_existing.template), provider_ids(synth_existing.stack)
    assert {ids[role] for role in ("nodes", "coredns", "load_balancer_controller")} == {EXISTING}
    cilium = find_step(provider_steps_existing, ids["cilium"])
    assert any("--wait" in argv for argv in cilium.commands) and cilium.rendered
    assert check_waits(graph, ids, provider_steps_existing, helm_major(EXISTING_CLUSTER["kubernetes_version"])) == []
    assert check_admission(graph, ids, provider_steps_existing) == []
    assert check_destroy(graph, ids, {}, "chaining") == []


# --- bad settings: one line each, naming the key ------------------------------------------------------

BAD_EXISTING = [
    ({"datapath": "eni"}, {}, "existing_cluster: needs datapath chaining (or null, which is chaining here), not 'eni': eni needs nodes"),
    ({}, {"node_security_group_id": "nodes"}, "existing_cluster.node_security_group_id: 'nodes' is not a sg ID"),
    ({}, {"public_access_cidrs": None}, "existing_cluster.public_access_cidrs: missing; with public access"),
    ({}, {"authentication_mode": "CONFIG_MAP"}, "existing_cluster.authentication_mode: CONFIG_MAP has no access entries"),
    ({}, {"authentication_mode": "IAM"}, "existing_cluster.authentication_mode: 'IAM' must be one of API, API_AND_CONFIG_MAP"),
    ({}, {"vpc_id": None}, "existing_cluster.vpc_id: missing; its VPC"),
    ({}, {"endpoint": None}, "existing_cluster.endpoint: missing; its API server endpoint"),
    ({}, {"vpc": "vpc-0123456789abcdef0"}, "existing_cluster.vpc: not a key of existing_cluster"),
    ({}, {"kubernetes_version": "1.31"}, "existing_cluster.kubernetes_version: 1.31 is retired on EKS"),
    ({}, {"kubernetes_version": "1.37"}, "existing_cluster.kubernetes_version: '1.37' is not an EKS version with a kubectl layer"),
    ({}, {"kubernetes_version": 1.33}, "existing_cluster.kubernetes_version: 1.33 must be a string"),
    ({}, {"endpoint_access": "public", "public_access_cidrs": ["203.0.113.0/24"]},
     "existing_cluster.endpoint_access: public, limited to 203.0.113.0/24: the kubectl provider's Lambda has no fixed address"),
    ({}, {"endpoint_access": "internal"}, "existing_cluster.endpoint_access: 'internal' must be one of public, private"),
    ({}, {"endpoint": "https://example.com"}, "existing_cluster.endpoint: 'https://example.com' is not an EKS API server endpoint"),
    ({}, {"endpoint": EXISTING_CLUSTER["endpoint"].replace("us-west-2", "eu-west-1")}, "existing_cluster.endpoint: 'https://0123456789ABCDEF0123456789ABCDEF.gr7.eu-west-1.e... is not an EKS API server endpoint of us-west-2"),
    ({}, {"private_subnet_ids": ["subnet-0a1b2c3d4e5f60718"]}, "existing_cluster.private_subnet_ids: ['subnet-0a1b2c3d4e5f60718'] must be a list of 2 to 16"),
    ({}, {"private_subnet_ids": ["subnet-0a1b2c3d4e5f60718", "subnet-xyz"]}, "existing_cluster.private_subnet_ids: 'subnet-xyz' is not a subnet ID"),
    ({}, {"cluster_security_group_id": "sg-123"}, "existing_cluster.cluster_security_group_id: 'sg-123' is not a sg ID"),
    ({}, {"vpc_cni_version": "v1.10.4-eksbuild.1"}, "existing_cluster.vpc_cni_version: v1.10.4-eksbuild.1 is older than v1.11.2"),
    ({}, {"vpc_cni_version": "latest"}, "existing_cluster.vpc_cni_version: 'latest' is not a VPC CNI version"),
    ({}, {"name": "1st"}, "existing_cluster.name: '1st' is not an EKS cluster name"),
    ({"admin_principal_arn": "arn:aws:iam::123456789012:role/Admin"}, {}, "admin_principal_arn: an existing cluster keeps the access it has"),
]  # fmt: skip


@pytest.mark.parametrize(("context", "attributes", "line"), BAD_EXISTING, ids=[b[2].split(":")[0] + f"-{i}" for i, b in enumerate(BAD_EXISTING)])
def test_a_bad_existing_cluster_setting_is_one_line_naming_it(context, attributes, line):
    settings = {**CONTEXT, "datapath": "chaining", **context, "existing_cluster": {**EXISTING_CLUSTER, **attributes}}
    with pytest.raises(ConfigError) as raised:
        load_config(settings)
    assert str(raised.value).startswith(line), str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_one_key_is_enough_the_datapath_following_it():
    """cdk.json's datapath null is eni for a created cluster and chaining, the only one it can take, for an
    existing one: `cdk deploy -c existing_cluster=...` needs no other flag; a private endpoint no public CIDRs."""
    assert CONTEXT["datapath"] is None and load_config(CONTEXT).datapath == "eni"
    private = {k: v for k, v in EXISTING_CLUSTER.items() if k != "public_access_cidrs"} | {"endpoint_access": "private"}
    config = load_config({**CONTEXT, "existing_cluster": json.dumps(private)})
    assert (config.datapath, config.encryption, config.existing_cluster.public_access_cidrs) == ("chaining", "none", ())


def test_the_nodes_own_security_group_gets_the_metrics_ports(synth_existing):
    """terraform-aws-eks puts node groups in a group of their own: the collector must reach the nodes there."""
    rules = [r["Properties"] for r in synth_existing.resources("AWS::EC2::SecurityGroupIngress").values()
             if r["Properties"]["GroupId"] == NODE_SECURITY_GROUP]  # fmt: skip
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [METRICS_PORTS]


def test_the_existing_clusters_name_and_version_are_the_stacks():
    config = load_config({**CONTEXT, "datapath": "chaining", "existing_cluster": json.dumps(EXISTING_CLUSTER)})
    assert (config.cluster_name, config.kubernetes_version) == (EXISTING_CLUSTER["name"], EXISTING_CLUSTER["kubernetes_version"])
    assert config.existing_cluster.provider_in_vpc and config.existing_cluster.private_subnet_ids == tuple(EXISTING_CLUSTER["private_subnet_ids"])


def test_the_datapath_model_holds_on_what_the_imported_stack_applies(synth_existing):
    """checks/datapath.py run on the imported stack's own template: its manifests' workloads, Services and
    policies, and the chart values it installs. Every chained path delivers, every must-deny request is
    refused, and the paths are the created chaining stack's."""
    from checks.datapath import Deployed, evaluate_all, must_deny, paths
    from checks.template import json_property

    applied = [d for r in synth_existing.resources("Custom::AWSCDK-EKS-KubernetesResource").values() for d in manifest_documents(r)]
    policy_kinds = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")
    (chart,) = synth_existing.resources("Custom::AWSCDK-EKS-HelmChart").values()
    config = synth_existing.stack.config
    model = Deployed.of(config.datapath, config.services, True, config.cilium_version,
                        documents=[d for d in applied if d["kind"] not in policy_kinds],
                        policies=[d for d in applied if d["kind"] in policy_kinds], values=json_property(chart, "Values"))  # fmt: skip
    assert [o.line() for o in evaluate_all(model) if not o.delivered] == []
    assert [o.line() for o in evaluate_all(model, must_deny(model)) if o.delivered] == []
    created = Deployed.of("chaining", config.services, True, config.cilium_version)
    assert sorted(h.name for h in paths(model)) == sorted(h.name for h in paths(created))
