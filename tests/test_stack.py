"""What one `cdk deploy` builds, asserted on the synthesized template."""

import json

import pytest
from aws_cdk.assertions import Match
from conftest import ROOT, TOKEN, helm_values, manifest_documents, normalize_assets, synth_of, update_requested
from cilium_mesh.traffic import MeshService

SNAPSHOTS = {
    "chaining": ROOT / "tests" / "snapshots" / "CiliumMeshEks.template.json",
    "eni": ROOT / "tests" / "snapshots" / "CiliumMeshEks.eni.template.json",
}


def test_ci_refuses_to_rewrite_the_snapshot(monkeypatch):
    monkeypatch.setenv("UPDATE_SNAPSHOTS", "1")
    monkeypatch.setenv("CI", "true")
    try:
        update_requested()
    except AssertionError as error:
        assert "UPDATE_SNAPSHOTS is set in CI" in str(error)
    else:
        raise AssertionError("UPDATE_SNAPSHOTS passed in CI")
    monkeypatch.delenv("CI")
    assert update_requested() is True


def kinds(documents):
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in documents)


def test_vpc_spans_three_zones_with_tagged_subnets_and_nat(synth):
    subnets = synth.resources("AWS::EC2::Subnet").values()
    zones = sorted({s["Properties"]["AvailabilityZone"] for s in subnets})
    assert zones == ["us-west-2a", "us-west-2b", "us-west-2c"]
    tags = [{t["Key"]: t["Value"] for t in s["Properties"]["Tags"]} for s in subnets]
    assert sum(t.get("kubernetes.io/role/elb") == "1" for t in tags) == 3
    # aws_eks_v2 tags every private subnet for internal load balancers; the stack tags the node subnets,
    # the only ones where Cilium's operator puts pods' ENIs (manifests/cilium/encryption-wireguard.yaml).
    assert sum(t.get("kubernetes.io/role/internal-elb") == "1" for t in tags) == 6
    node_subnets = [s["Properties"]["CidrBlock"] for s, t in zip(subnets, tags) if t.get("cilium-mesh.eks/pod-subnet") == "1"]
    assert sorted(node_subnets) == ["10.0.128.0/19", "10.0.160.0/19", "10.0.192.0/19"]
    synth.assertions.resource_count_is("AWS::EC2::NatGateway", 3)
    synth.assertions.has_resource_properties("AWS::EC2::FlowLog", {"TrafficType": "ALL"})


def test_cluster_is_native_eks_without_auto_mode_or_self_managed_addons(synth):
    synth.assertions.has_resource_properties(
        "AWS::EKS::Cluster",
        {
            "Name": "cilium-mesh",
            "Version": "1.35",
            "BootstrapSelfManagedAddons": False,
            "ComputeConfig": {"Enabled": False},
            "AccessConfig": {"AuthenticationMode": "API"},
            "Logging": {
                "ClusterLogging": {"EnabledTypes": [{"Type": "api"}, {"Type": "audit"}, {"Type": "authenticator"}]}
            },
            "ResourcesVpcConfig": Match.object_like(
                {"EndpointPrivateAccess": True, "EndpointPublicAccess": True, "PublicAccessCidrs": ["0.0.0.0/0"]}
            ),
            "EncryptionConfig": [{"Provider": {"KeyArn": Match.any_value()}, "Resources": ["secrets"]}],
        },
    )
    synth.assertions.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    synth.assertions.has_resource_properties(
        "AWS::Logs::LogGroup", {"LogGroupName": "/aws/eks/cilium-mesh/cluster", "RetentionInDays": 30}
    )


def test_kubectl_provider_uses_the_layer_of_the_cluster_version(synth):
    layers = synth.resources("AWS::Lambda::LayerVersion").values()
    descriptions = [layer["Properties"].get("Description", "") for layer in layers]
    assert any(d.startswith("/opt/kubectl/kubectl 1.35.") for d in descriptions), descriptions
    synth.assertions.resource_count_is("Custom::AWSCDK-EKS-HelmChart", 2)


def test_managed_node_group_is_x86_private_imdsv2_and_tainted_until_cilium(synth):
    nodegroup = synth.resource(synth.stack.nodes)["Properties"]
    assert nodegroup["AmiType"] == "AL2023_x86_64_STANDARD"
    assert nodegroup["InstanceTypes"] == ["m6i.large"]
    assert nodegroup["ScalingConfig"]["MinSize"] == 2
    private = {synth.stack.get_logical_id(s.node.default_child) for s in synth.stack.private_subnets}  # the node subnets
    assert {ref["Ref"] for ref in nodegroup["Subnets"]} == private
    assert nodegroup["Taints"] == [{"Effect": "NO_EXECUTE", "Key": "node.cilium.io/agent-not-ready", "Value": "true"}]
    synth.assertions.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {"MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}}
            )
        },
    )
    role = synth.resource(synth.stack.nodes.role)["Properties"]
    policies = sorted(p["Fn::Join"][1][-1].rsplit("/", 1)[-1] for p in role["ManagedPolicyArns"])
    assert policies == ["AmazonEC2ContainerRegistryReadOnly", "AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy"]


def test_addons_are_managed_and_there_is_no_kube_proxy(synth):
    names = sorted(a["Properties"]["AddonName"] for a in synth.resources("AWS::EKS::Addon").values())
    assert names == ["coredns", "vpc-cni"]


def test_load_balancer_controller_installs_without_waiting_or_service_webhook(synth):
    chart = synth.resource(synth.stack.load_balancer_controller.node.find_child("Resource"))
    assert chart["Properties"]["Chart"] == "aws-load-balancer-controller"
    assert "Wait" not in chart["Properties"], "CloudFormation would hand the handler 'false', which it reads as true"
    values = helm_values(chart)
    assert values["enableServiceMutatorWebhook"] is False
    assert values["webhookConfig"] == {"disableIngressValidation": True}
    assert values["dnsPolicy"] == "Default"
    assert values["clusterName"] == TOKEN and values["vpcId"] == TOKEN and values["region"] == "us-west-2"
    assert values["image"]["tag"] == "v3.2.2"


def test_cilium_chart_has_the_walkthrough_intent_for_a_supported_release(synth):
    chart = synth.resource(synth.stack.mesh.cilium)["Properties"]
    assert chart["Repository"] == "https://helm.cilium.io/"
    assert chart["Version"] == "1.19.6"
    assert chart["Namespace"] == "kube-system"
    assert chart["Wait"] is True
    values = helm_values(synth.resource(synth.stack.mesh.cilium))
    assert values["cni"] == {"chainingMode": "aws-cni", "exclusive": False}
    assert values["routingMode"] == "native"
    # Only Cilium's own pool (its Ingress, router and health addresses) is masqueraded, by iptables.
    assert values["enableIPv4Masquerade"] is True and values["bpf"]["masquerade"] is False
    assert values["ipv4NativeRoutingCIDR"] == values["ipam"]["operator"]["clusterPoolIPv4PodCIDRList"][0]
    assert values["kubeProxyReplacement"] is True
    assert values["k8sServiceHost"] == TOKEN and values["k8sServicePort"] == 443
    hubble = values["hubble"]
    assert hubble["relay"]["enabled"] and hubble["ui"]["enabled"] and hubble["tls"]["auto"]["enabled"]
    assert hubble["metrics"]["enabled"] == [
        "dns",
        "drop:labelsContext=source_namespace,source_app,destination_namespace,destination_app",
        "tcp",
        "flow",
        "icmp",
        "httpV2:labelsContext=source_namespace,source_workload,destination_namespace,destination_workload,traffic_direction",
    ]
    assert values["prometheus"]["enabled"] and values["operator"]["prometheus"]["enabled"]
    assert values["envoy"]["prometheus"]["enabled"]
    ingress = values["ingressController"]
    assert ingress["enabled"] and ingress["loadbalancerMode"] == "shared"
    assert ingress["service"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"] == "instance"
    assert ingress["service"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internet-facing"
    assert "encryption" not in values  # chaining: the chart's default, off (cilium/cilium#15596)
    assert values["envoyConfig"]["enabled"] is True
    assert values["envoy"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "endpointRoutes" not in values
    assert "strict" not in json.dumps(values)


def test_cilium_cluster_pool_overlaps_neither_the_vpc_nor_the_service_range(synth):
    import ipaddress

    values = helm_values(synth.resource(synth.stack.mesh.cilium))
    pools = [ipaddress.ip_network(c) for c in values["ipam"]["operator"]["clusterPoolIPv4PodCIDRList"]]
    vpc = ipaddress.ip_network(synth.resources("AWS::EC2::VPC").popitem()[1]["Properties"]["CidrBlock"])
    services = ipaddress.ip_network("172.20.0.0/16")  # EKS's default for a 10.x VPC
    assert pools and not any(p.overlaps(vpc) or p.overlaps(services) for p in pools)


def test_cilium_reads_the_api_server_endpoint_without_scheme(synth):
    values = synth.resource(synth.stack.mesh.cilium)["Properties"]["Values"]
    host = json.dumps(values)
    assert '"Fn::Select": [1, {"Fn::Split": ["//", {"Fn::GetAtt": [' in host and '"Endpoint"]' in host


def test_manifests_are_applied_as_written(synth):
    mesh = synth.stack.mesh
    assert kinds(manifest_documents(synth.resource(mesh.namespace))) == ["Namespace/cilium-mesh", "Namespace/workshop"]
    assert sorted(mesh.manifests) == ["App", "Ingress", "NetworkPolicy", "Service-workshop-catalogdetail"]
    app = manifest_documents(synth.resource(mesh.manifests["App"]))
    assert kinds(app) == sorted(
        [f"Deployment/{n}" for n in ("frontend", "productcatalog", "catalogdetail", "catalogdetail2")]
        + [f"Service/{n}" for n in ("frontend", "productcatalog", "catalogdetail")]
        + [f"ServiceAccount/{n}" for n in ("frontend", "productcatalog", "catalogdetail")]
    )
    # catalogdetail is a declaration: its version Services and policies come from it, in a manifest of its own.
    meshed = manifest_documents(synth.resource(mesh.manifests["Service-workshop-catalogdetail"]))
    assert kinds(meshed) == sorted(["Service/catalogdetailv1", "Service/catalogdetailv2",
                                    "CiliumNetworkPolicy/mesh-catalogdetail-v1", "CiliumNetworkPolicy/mesh-catalogdetail-v2"])  # fmt: skip
    def kinds_of(name):
        return {d["kind"] for d in manifest_documents(synth.resource(mesh.manifests[name]))}

    assert kinds_of("Ingress") == {"Ingress"}
    assert kinds_of("NetworkPolicy") == {"CiliumNetworkPolicy"}


def test_network_policy_switch_and_weights_from_configuration(synth_variant):
    mesh = synth_variant.stack.mesh
    assert "NetworkPolicy" not in mesh.manifests
    documents = [d for r in mesh.manifests.values() for d in manifest_documents(synth_variant.resource(r))]
    assert not [d for d in documents if d["kind"] == "CiliumNetworkPolicy"]
    assert not [d for d in documents if d["kind"] == "CiliumEnvoyConfig"]
    policy = MeshService.from_json(synth_variant.resource(synth_variant.stack.traffic.resources["workshop/catalogdetail"])["Properties"]["Policy"])
    cec = policy.cilium_envoy_config()
    route = next(r for r in cec["spec"]["resources"] if r["@type"].endswith("RouteConfiguration"))
    split = route["virtual_hosts"][0]["routes"][-1]["route"]["weighted_clusters"]["clusters"]
    assert [c["weight"] for c in split] == [90, 10]


def test_admin_principal_gets_a_cluster_admin_access_entry(synth, synth_variant):
    arn = "arn:aws:iam::123456789012:role/PlatformAdmin"
    entries = [e["Properties"] for e in synth_variant.resources("AWS::EKS::AccessEntry").values()]
    admin = [e for e in entries if e["PrincipalArn"] == arn]
    assert len(admin) == 1 and "AmazonEKSClusterAdminPolicy" in json.dumps(admin[0]["AccessPolicies"])
    assert arn not in json.dumps(synth.template)
    cluster = next(iter(synth.resources("AWS::EKS::Cluster").values()))["Properties"]
    assert cluster["AccessConfig"]["BootstrapClusterCreatorAdminPermissions"] is True


def test_outputs_tell_how_to_reach_and_check_the_mesh(synth):
    outputs = synth.template["Outputs"]
    app_url = json.dumps(outputs["AppUrl"]["Value"])
    assert "http://" in app_url and synth.logical_id(synth.stack.mesh.ingress_hostname) in app_url
    hostname = synth.resource(synth.stack.mesh.ingress_hostname)["Properties"]
    assert hostname["ObjectName"] == "cilium-ingress" and hostname["ObjectNamespace"] == "kube-system"
    assert hostname["JsonPath"] == ".status.loadBalancer.ingress[0].hostname"
    assert outputs["UpdateKubeconfig"]["Value"] == "aws eks update-kubeconfig --region us-west-2 --name cilium-mesh"
    assert "hubble-ui" in outputs["HubbleUi"]["Value"]
    # From a pod of the sample's caller, to the path its declaration checks.
    check = outputs["CheckTrafficSplit"]["Value"]
    assert check.startswith('kubectl -n workshop exec "$(kubectl -n workshop get pod -l app=productcatalog -o name | head -n 1)" --')
    assert "curl -s catalogdetail:3000/catalogDetail" in check


def test_traffic_check_shows_the_split_beside_the_weights_and_pinned_requests(synth, tmp_path):
    """Run the output's script with a stand-in curl: quoting, counting and the pinned part all work."""
    import shlex
    import subprocess

    words = shlex.split(synth.template["Outputs"]["CheckTrafficSplit"]["Value"])
    script = words[words.index("-c") + 1]
    curl = tmp_path / "curl"
    curl.write_text(
        '#!/bin/sh\nv=1\nwhile [ $# -gt 0 ]; do [ "$1" = -H ] && v=${2##*: v}; shift; done\n'
        'printf \'{"version":"%s","vendors":["ABC.com"]}\' "$v"\n'
    )
    curl.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == "configured weights: v1=50 v2=50"
    assert lines[lines.index("pinned to v2:") + 1] == '20 "version":"2"'
    assert lines[lines.index("pinned to v1:") + 1] == '20 "version":"1"'


@pytest.mark.parametrize("datapath", SNAPSHOTS)
def test_template_matches_the_reviewed_snapshot(request, datapath):
    synth = synth_of(request, datapath)
    current = normalize_assets(json.dumps(synth.template, indent=1, sort_keys=True)) + "\n"
    snapshot = SNAPSHOTS[datapath]
    if update_requested():
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(current)
    assert current == snapshot.read_text(), "template changed: review, then UPDATE_SNAPSHOTS=1 pytest"
