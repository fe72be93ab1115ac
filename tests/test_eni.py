"""Datapath eni: Cilium as the only CNI. Its own order, no aws-node, the operator's permissions, ENI cleanup."""

import copy
import functools
import importlib.util
import json
import re
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from cilium_mesh.eni import (
    CLEANUP_HANDLER_DIR,
    CLUSTER_NAME_TAG,
    MANAGED_TAG,
    OPERATOR_CHANGE_ACTIONS,
    OPERATOR_EC2_ACTIONS,
)
from cilium_mesh.mesh import INGRESS_SERVICE, STEP_TIMEOUT
from conftest import CONTEXT
from checks.deploy_graph import Graph
from checks.kubectl_layer import kubectl_output
from checks.provider_dry_run import READY_OBJECTS, find_step
from checks.readiness import ENI_ORDER, check_admission, check_destroy, check_order, provider_ids, role_ids

KUBERNETES = CONTEXT["kubernetes_version"]

# Cilium docs, "AWS ENI" IPAM, Required Privileges (1.18 to 1.20): the base list. DescribeTags,
# UnassignPrivateIpAddresses and DescribeInstances are needed only for settings this stack leaves off.
DOCUMENTED_ACTIONS = {
    f"ec2:{action}"
    for action in (
        "DeleteNetworkInterface", "DescribeInstanceTypes", "DescribeNetworkInterfaces", "DescribeSubnets",
        "DescribeVpcs", "DescribeRouteTables", "DescribeSecurityGroups", "CreateNetworkInterface",
        "AttachNetworkInterface", "ModifyNetworkInterfaceAttribute", "AssignPrivateIpAddresses", "CreateTags",
    )
}  # fmt: skip


@pytest.fixture(scope="module")
def world(synth_eni, provider_steps_eni):
    return Graph(synth_eni.template), role_ids(synth_eni.stack), provider_steps_eni


def statements(synth, construct) -> list[dict]:
    return synth.resource(construct)["Properties"]["PolicyDocument"]["Statement"]


def actions(statement: dict) -> list[str]:
    """A statement's actions: CloudFormation holds one as a string, several as a list."""
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def test_cilium_is_installed_before_the_nodes_without_waiting(world, synth_eni):
    graph, roles, steps = world
    (cilium,), (nodes,) = roles["cilium"], roles["nodes"]
    assert cilium in graph.after(nodes) and nodes not in graph.after(cilium)
    install = find_step(steps, cilium).commands[1]
    assert install[:2] == ["helm", "upgrade"] and "--wait" not in install
    assert "Wait" not in synth_eni.resource(synth_eni.stack.mesh.cilium)["Properties"]


def test_cilium_chart_has_no_hooks_helm_would_wait_for_without_nodes(world):
    """helm runs hooks (a Job, say) and waits for them even without --wait; before the nodes none could run."""
    _, roles, steps = world
    rendered = find_step(steps, roles["cilium"][0]).rendered
    assert any(d["kind"] == "Job" for d in rendered)  # hubble's certificate Job: a plain Job, not a hook
    hooks = [d["metadata"]["name"] for d in rendered if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]
    assert hooks == []


def test_every_step_follows_what_it_needs(world):
    graph, roles, _ = world
    assert check_order(graph, roles, ENI_ORDER) == []
    assert all(len(need.source) > 40 for need in ENI_ORDER)


@pytest.mark.parametrize(
    ("later", "earlier", "expected"),
    [
        ("cilium", "nodes", "NodeCreationFailure"),  # the chaining order
        ("cilium", None, "Unable to start eni allocator"),  # association beside Cilium, not before
    ],
)
def test_order_defects_are_caught(world, later, earlier, expected):
    graph, roles, _ = world
    template = copy.deepcopy(graph.resources)
    (cilium,), (nodes,), (association,) = roles["cilium"], roles["nodes"], roles["operator_identity"]
    if earlier == "nodes":
        template[nodes]["DependsOn"] = [d for d in template[nodes]["DependsOn"] if d != cilium]
        template[cilium].setdefault("DependsOn", []).append(nodes)
    else:
        template[cilium]["DependsOn"] = [d for d in template[cilium]["DependsOn"] if d != association]
    problems = [str(p) for p in check_order(Graph({"Resources": template}), roles, ENI_ORDER)]
    assert any(expected in p for p in problems), problems


def test_readiness_is_proven_after_the_nodes_by_waiting_steps(world, synth_eni):
    graph, roles, steps = world
    waits = {}
    for step_id in roles["cilium_ready"]:
        (get,) = [argv for argv in find_step(steps, step_id).commands if "get" in argv]
        waits[tuple(get[get.index("get") + 1 :][2:4])] = get[-1]
        assert roles["nodes"][0] in graph.after(step_id)
        props = synth_eni.template["Resources"][step_id]["Properties"]
        assert int(props["TimeoutSeconds"]) == STEP_TIMEOUT.to_seconds()
    assert waits == {
        ("deployment", "cilium-operator"): "-o=jsonpath='{.status.readyReplicas}'",
        ("crd", "ciliumenvoyconfigs.cilium.io"): "-o=jsonpath='{.status.acceptedNames.kind}'",
        ("crd", "ciliumnetworkpolicies.cilium.io"): "-o=jsonpath='{.status.acceptedNames.kind}'",
    }


# The same objects before they are ready, as the API server returns them: a Deployment omits readyReplicas
# while it is 0 (omitempty); a CRD's acceptedNames stays empty until its names are accepted.
NOT_READY_STATUS = {
    "deployment": {"replicas": 2, "unavailableReplicas": 2},
    "crd": {"acceptedNames": {"kind": "", "plural": ""}},
}


def test_each_readiness_wait_ends_only_once_its_object_is_ready(world):
    """The handler waits while its jsonpath prints '' (it strips the quotes); the layer's kubectl prints it."""
    _, roles, steps = world
    for step_id in roles["cilium_ready"]:
        step = find_step(steps, step_id)
        (get,) = [argv for argv in step.commands if "get" in argv]
        object_type, name, output = get[-3:]
        assert step.result["Data"]["Value"] == kubectl_output(KUBERNETES, READY_OBJECTS[object_type, name], output)[1:-1] != ""
        not_ready = {**READY_OBJECTS[object_type, name], "status": NOT_READY_STATUS[object_type]}
        assert kubectl_output(KUBERNETES, not_ready, output) == "''", (object_type, name)


def test_no_vpc_cni_and_nothing_creates_aws_node(world, synth_eni):
    _, _, steps = world
    synth_eni.assertions.has_resource_properties("AWS::EKS::Cluster", {"BootstrapSelfManagedAddons": False})
    addons = sorted(a["Properties"]["AddonName"] for a in synth_eni.resources("AWS::EKS::Addon").values())
    assert addons == ["coredns", "eks-pod-identity-agent"]
    created = [d for s in steps if s.request_type == "Create" for d in (s.manifests or []) + (s.rendered or [])]
    assert len(created) > 50
    assert not [d for d in created if d["metadata"]["name"] == "aws-node"]
    assert "aws-node" not in json.dumps(synth_eni.template)


def test_node_role_has_no_cni_permissions(synth_eni):
    role = synth_eni.resource(synth_eni.stack.nodes.role)["Properties"]
    policies = sorted(p["Fn::Join"][1][-1].rsplit("/", 1)[-1] for p in role["ManagedPolicyArns"])
    assert policies == ["AmazonEC2ContainerRegistryReadOnly", "AmazonEKSWorkerNodePolicy"]
    assert "Policies" not in role


def test_operator_gets_exactly_the_documented_ec2_actions_through_pod_identity(world, synth_eni):
    _, roles, steps = world
    identity = synth_eni.stack.mesh.operator_identity
    granted = [s for s in statements(synth_eni, identity.policy) if s["Effect"] == "Allow"]
    assert {a for s in granted for a in actions(s)} == DOCUMENTED_ACTIONS == set(OPERATOR_EC2_ACTIONS)
    by_action = {a: s for s in granted for a in actions(s)}
    assert by_action["ec2:CreateTags"]["Condition"] == {"StringEquals": {"ec2:CreateAction": "CreateNetworkInterface"}}
    assert by_action["ec2:DeleteNetworkInterface"]["Condition"]["StringEquals"] == {
        f"ec2:ResourceTag/{MANAGED_TAG[0]}": MANAGED_TAG[1],
        f"ec2:ResourceTag/{CLUSTER_NAME_TAG}": CONTEXT["cluster_name"],
    }
    trust = synth_eni.resource(identity.role)["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust == [
        {"Action": ["sts:AssumeRole", "sts:TagSession"], "Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"}}
    ]
    association = synth_eni.resource(identity.association)["Properties"]
    rendered = find_step(steps, roles["cilium"][0]).rendered
    operator = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "cilium-operator")
    assert (association["Namespace"], association["ServiceAccount"]) == (
        operator["metadata"]["namespace"],
        operator["spec"]["template"]["spec"]["serviceAccountName"],
    )


# Action-level condition keys, which cfn-lint's copy of the Service Authorization Reference does not carry
# (the reference lists ec2:CreateAction under CreateTags).
ACTION_CONDITION_KEYS = {"ec2:createtags": {"ec2:CreateAction"}}


@functools.cache
def iam_reference() -> dict:
    """cfn-lint's copy of the Service Authorization Reference (read once: it is large)."""
    import cfnlint.data.AdditionalSpecs as specs

    return json.loads((Path(specs.__file__).parent / "Policies.json").read_text())


def unsupported_condition_keys(statement: dict) -> list[str]:
    """Condition keys that no resource type of the statement's actions supports, by the IAM reference
    data cfn-lint bundles (global aws:* keys apply everywhere)."""
    reference = iam_reference()
    unsupported = []
    for action in actions(statement):
        service, name = action.split(":")
        entry = reference[service]["Actions"][name.lower()]
        patterns = [
            re.escape(key).replace(re.escape("${TagKey}"), ".+")
            for resource_type in entry.get("Resources", [])
            for key in reference[service]["Resources"][resource_type].get("ConditionKeys", [])
        ]
        for key in (k for condition in statement.get("Condition", {}).values() for k in condition):
            allowed = key.startswith("aws:") or key in ACTION_CONDITION_KEYS.get(action.lower(), ())
            if not allowed and not any(re.fullmatch(p, key) for p in patterns):
                unsupported.append(f"{action} {key}")
    return unsupported


def test_every_condition_key_applies_to_its_actions(synth_eni):
    identity, cleanup = synth_eni.stack.mesh.operator_identity, synth_eni.stack.eni_cleanup
    found = [s for policy in (identity.policy, cleanup.handler.role.node.find_child("DefaultPolicy"))
             for s in statements(synth_eni, policy)]  # fmt: skip
    assert sum("Condition" in s for s in found) == 4
    assert [key for s in found for key in unsupported_condition_keys(s)] == []
    typo = {"Action": "ec2:DeleteNetworkInterface", "Condition": {"StringEquals": {"ec2:ResourceTagg/x": "y"}}}
    assert unsupported_condition_keys(typo) == ["ec2:DeleteNetworkInterface ec2:ResourceTagg/x"]


def test_no_other_role_may_touch_enis_beyond_the_cleanup(synth_eni):
    identity, cleanup = synth_eni.stack.mesh.operator_identity, synth_eni.stack.eni_cleanup
    allowed = {synth_eni.logical_id(identity.policy), synth_eni.logical_id(cleanup.handler.role.node.find_child("DefaultPolicy"))}
    for name, policy in synth_eni.resources("AWS::IAM::Policy").items():
        granted = {a for s in policy["Properties"]["PolicyDocument"]["Statement"] for a in actions(s)}
        if name not in allowed:
            assert not granted & {*OPERATOR_CHANGE_ACTIONS, "ec2:DeleteNetworkInterface"}, name


def test_operator_reads_imds_from_the_host_network_so_hop_limit_1_holds(world, synth_eni):
    """The operator takes its region from IMDS (even with Pod Identity); from the host network that is one hop."""
    _, roles, steps = world
    rendered = find_step(steps, roles["cilium"][0]).rendered
    operator = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "cilium-operator")
    assert operator["spec"]["template"]["spec"]["hostNetwork"] is True
    synth_eni.assertions.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {"LaunchTemplateData": {"MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
                                "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"Encrypted": True, "VolumeSize": 50, "VolumeType": "gp3"}}]}},
    )  # fmt: skip


def test_cleanup_may_only_delete_this_clusters_cilium_enis(synth_eni):
    cleanup = synth_eni.stack.eni_cleanup
    policy = cleanup.handler.role.node.find_child("DefaultPolicy")
    granted = {tuple(actions(s)): s for s in statements(synth_eni, policy)}
    assert granted.keys() == {("ec2:DescribeNetworkInterfaces",), ("ec2:DeleteNetworkInterface",)}
    assert granted[("ec2:DeleteNetworkInterface",)]["Condition"]["StringEquals"] == {
        f"ec2:ResourceTag/{MANAGED_TAG[0]}": MANAGED_TAG[1],
        f"ec2:ResourceTag/{CLUSTER_NAME_TAG}": CONTEXT["cluster_name"],
    }
    resource = synth_eni.resource(cleanup.resource)
    assert resource["Type"] == "Custom::CiliumEniCleanup"
    assert resource["Properties"]["ClusterName"] == CONTEXT["cluster_name"]


def test_ingress_service_is_deleted_while_the_controller_nodes_and_cilium_run(world, synth_eni):
    graph, roles, steps = world
    ids = provider_ids(synth_eni.stack)
    (teardown,) = roles["ingress_owner"]
    delete = find_step(steps, teardown, "Delete")
    assert delete.commands[1][:2] == ["kubectl", "delete"]
    assert [{**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "labels"}} for d in delete.manifests] == [INGRESS_SERVICE]
    controller = find_step(steps, ids["load_balancer_controller"])
    assert check_destroy(graph, ids, controller.values, "eni") == []


def test_ingress_service_deleted_after_the_controller_is_caught(world, synth_eni):
    """Defect: the teardown step not depending on the controller, which then may go first."""
    graph, roles, steps = world
    ids = provider_ids(synth_eni.stack)
    template = copy.deepcopy(graph.resources)
    (teardown,) = roles["ingress_owner"]
    template[teardown]["DependsOn"] = [d for d in template[teardown]["DependsOn"] if d != ids["load_balancer_controller"]]
    controller = find_step(steps, ids["load_balancer_controller"])
    problems = [str(p) for p in check_destroy(Graph({"Resources": template}), ids, controller.values, "eni")]
    assert any("its pods" in p for p in problems), problems


def test_every_object_passes_admission(world, synth_eni):
    graph, _, steps = world
    assert check_admission(graph, provider_ids(synth_eni.stack), steps) == []


def test_the_traffic_policy_is_the_same_in_both_datapaths(synth, synth_eni):
    """So the Envoy figures (tests/test_traffic.py, tools.measure) hold for eni too."""
    def traffic(s):
        return s.resource(s.stack.traffic.resources["workshop/catalogdetail"])["Properties"]["Policy"]

    assert traffic(synth_eni) == traffic(synth)


# The cleanup handler, run against botocore's real EC2 model (Stubber checks every request and response shape).


@pytest.fixture()
def handler():
    spec = importlib.util.spec_from_file_location("eni_cleanup_handler", CLEANUP_HANDLER_DIR / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def ec2():
    client = boto3.client("ec2", region_name="us-west-2", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


# The Lambda asset cannot import cilium_mesh, so it has its own copy of the tags: built from the
# construct's here, Stubber fails the handler tests if the two drift apart.
FILTERS = [
    {"Name": f"tag:{MANAGED_TAG[0]}", "Values": [MANAGED_TAG[1]]},
    {"Name": f"tag:{CLUSTER_NAME_TAG}", "Values": ["cilium-mesh"]},
]


def listing(*enis):
    return {"NetworkInterfaces": [{"NetworkInterfaceId": eni, "Status": status} for eni, status in enis]}


def test_cleanup_deletes_detached_enis_and_waits_for_attached_ones(handler, ec2):
    client, stubber = ec2
    stubber.add_response("describe_network_interfaces", listing(("eni-1", "available"), ("eni-2", "detaching")), {"Filters": FILTERS})
    stubber.add_response("delete_network_interface", {}, {"NetworkInterfaceId": "eni-1"})
    stubber.add_response("describe_network_interfaces", listing(("eni-2", "available")), {"Filters": FILTERS})
    stubber.add_response("delete_network_interface", {}, {"NetworkInterfaceId": "eni-2"})
    sleeps = []
    deleted = handler.delete_detached(client, "cilium-mesh", deadline=1000, clock=lambda: 0, sleep=sleeps.append)
    assert deleted == ["eni-1", "eni-2"] and sleeps == [handler.POLL_SECONDS]


def test_cleanup_tolerates_an_eni_already_gone(handler, ec2):
    client, stubber = ec2
    stubber.add_response("describe_network_interfaces", listing(("eni-1", "available")), {"Filters": FILTERS})
    stubber.add_client_error("delete_network_interface", "InvalidNetworkInterfaceID.NotFound", expected_params={"NetworkInterfaceId": "eni-1"})
    assert handler.delete_detached(client, "cilium-mesh", deadline=1000, clock=lambda: 0) == ["eni-1"]


def test_cleanup_fails_naming_enis_still_attached_at_its_deadline(handler, ec2):
    client, stubber = ec2
    stubber.add_response("describe_network_interfaces", listing(("eni-9", "in-use")), {"Filters": FILTERS})
    with pytest.raises(RuntimeError, match="still attached: eni-9"):
        handler.delete_detached(client, "cilium-mesh", deadline=5, clock=lambda: 0, sleep=lambda _: None)


def test_cleanup_raises_other_ec2_errors(handler, ec2):
    client, stubber = ec2
    stubber.add_response("describe_network_interfaces", listing(("eni-1", "available")), {"Filters": FILTERS})
    stubber.add_client_error("delete_network_interface", "UnauthorizedOperation", expected_params={"NetworkInterfaceId": "eni-1"})
    with pytest.raises(Exception, match="UnauthorizedOperation"):
        handler.delete_detached(client, "cilium-mesh", deadline=1000, clock=lambda: 0)


@pytest.mark.parametrize("request_type", ["Create", "Update"])
def test_cleanup_does_nothing_on_create_and_update(handler, monkeypatch, request_type):
    monkeypatch.setattr(handler.boto3, "client", lambda *_: pytest.fail("no EC2 call on " + request_type))
    event = {"RequestType": request_type, "ResourceProperties": {"ClusterName": "cilium-mesh"}}
    assert handler.on_event(event, None) == {"PhysicalResourceId": "cilium-eni-cleanup-cilium-mesh"}


def test_cleanup_on_delete_uses_the_lambdas_remaining_time(handler, ec2, monkeypatch):
    client, stubber = ec2
    stubber.add_response("describe_network_interfaces", listing(("eni-1", "available")), {"Filters": FILTERS})
    stubber.add_response("delete_network_interface", {}, {"NetworkInterfaceId": "eni-1"})
    monkeypatch.setattr(handler.boto3, "client", lambda service: client)

    class Context:
        @staticmethod
        def get_remaining_time_in_millis():
            return 900_000

    event = {"RequestType": "Delete", "ResourceProperties": {"ClusterName": "cilium-mesh"}}
    assert handler.on_event(event, Context())["PhysicalResourceId"] == "cilium-eni-cleanup-cilium-mesh"
