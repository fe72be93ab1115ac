"""What the kubectl provider would run on `cdk deploy` and `cdk destroy`: aws-cdk-lib's own handler, dry.

checks/provider_dry_run.py calls the kubectl-handler shipped in the installed
aws-cdk-lib with the properties CloudFormation would send (strings), and
records every command instead of running it; the Cilium chart is rendered
with the kubectl layer's real helm and the values file the handler wrote.
"""

import copy
import json
import subprocess
from pathlib import Path
from unittest.mock import ANY

import pytest
from stacks.network import NODE_CIDR
from cilium_mesh.mesh import PROVIDER_LAMBDA_TIMEOUT, STEP_TIMEOUT
from cilium_mesh.values import cilium_values
from cilium_mesh.versions import CILIUM_HELM_REPOSITORY
from conftest import provider_steps_of, synth_of
from stacks.cilium_eks_stack import LOAD_BALANCER_CONTROLLER_VERSION
from checks.deploy_graph import Graph, creation_order
from checks.kubectl_layer import layer_kubectl
from checks.provider_dry_run import without_option, CLUSTER_ENDPOINT, INGRESS_HOSTNAME, UnknownCommand, dry_run, find_step, kubectl_step
from checks.schemas import validate_object

# A step that waits must give up this long before the provider's Lambda is killed,
# leaving time for update-kubeconfig and the chart download (constructs/cilium_mesh/mesh.py).
MARGIN_S = 300
API_SERVER_HOST = CLUSTER_ENDPOINT.removeprefix("https://")


def files_by_name(argv: list[str]) -> list[str]:
    """argv with the handler's work files (kubeconfig, values.yaml, manifest.yaml) by name, not temp path."""
    return [Path(arg).name if arg.startswith("/") else arg for arg in argv]


@pytest.fixture(scope="module")
def steps(provider_steps):
    return provider_steps


@pytest.fixture(scope="module")
def ids(synth):
    mesh = synth.stack.mesh
    return {
        "lbc": synth.logical_id(synth.stack.load_balancer_controller.node.find_child("Resource")),
        "cilium": synth.logical_id(mesh.cilium),
        "namespace": synth.logical_id(mesh.namespace),
        "hostname": synth.logical_id(mesh.ingress_hostname),
        **{name: synth.logical_id(manifest) for name, manifest in mesh.manifests.items()},
        "MeshService": synth.logical_id(synth.stack.traffic.resources["workshop/catalogdetail"]),
    }


def position(steps, logical_id: str, request_type: str) -> int:
    return steps.index(find_step(steps, logical_id, request_type))


def test_creation_order_puts_every_resource_after_its_dependencies(synth):
    graph = Graph(synth.template)
    order = creation_order(synth.template)
    assert sorted(order) == sorted(synth.template["Resources"])
    for index, name in enumerate(order):
        assert graph.direct[name] <= set(order[:index]), name
    reordered = {"Resources": dict(reversed(synth.template["Resources"].items()))}
    assert creation_order(reordered) == order  # ties go by logical ID, not by template order


@pytest.mark.helm
@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_every_provider_resource_is_created_then_deleted(request, datapath):
    synth, steps = synth_of(request, datapath), provider_steps_of(request, datapath)
    resources = {k for k, r in synth.template["Resources"].items() if kubectl_step(r["Type"])}
    assert synth.logical_id(synth.stack.traffic.resources["workshop/catalogdetail"]) in resources
    created = [s.logical_id for s in steps if s.request_type == "Create"]
    deleted = [s.logical_id for s in steps if s.request_type == "Delete"]
    assert resources and sorted(created) == sorted(deleted) == sorted(resources)


@pytest.mark.helm
@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_every_call_logs_in_to_the_configured_cluster_first(request, datapath):
    synth, steps = synth_of(request, datapath), provider_steps_of(request, datapath)
    login = ["aws", "eks", "update-kubeconfig", "--name", synth.stack.config.cluster_name, "--kubeconfig", "kubeconfig"]
    for s in steps:
        assert files_by_name(s.commands[0]) == login, (s.logical_id, s.request_type)


def test_load_balancer_controller_chart_installs_without_waiting(steps, ids):
    """Its pods cannot run before Cilium, which comes after it: a waiting install would time out."""
    create = find_step(steps, ids["lbc"], "Create")
    assert files_by_name(create.commands[1]) == [
        "helm", "upgrade", "aws-load-balancer-controller", "aws-load-balancer-controller", "--install",
        "--create-namespace", "--repo", "https://aws.github.io/eks-charts", "--values", "values.yaml",
        "--version", LOAD_BALANCER_CONTROLLER_VERSION.helm_chart_version, "--namespace", "kube-system",
        "--timeout", ANY, "--kubeconfig", "kubeconfig",
    ]  # fmt: skip
    assert len(create.commands) == 2
    delete = find_step(steps, ids["lbc"], "Delete")
    assert files_by_name(delete.commands[1]) == [
        "helm", "uninstall", "aws-load-balancer-controller", "--namespace", "kube-system",
        "--timeout", ANY, "--kubeconfig", "kubeconfig",
    ]  # fmt: skip


def test_cilium_chart_waits_on_install_and_uninstall(synth, steps, ids):
    """Install waits so Cilium's CRDs exist for what follows; uninstall waits until cilium-ingress (its NLB) is gone."""
    timeout = f"{int(STEP_TIMEOUT.to_seconds())}s"
    assert timeout == "600s"
    create = find_step(steps, ids["cilium"], "Create")
    assert files_by_name(create.commands[1]) == [
        "helm", "upgrade", "cilium", "cilium", "--install", "--create-namespace",
        "--repo", CILIUM_HELM_REPOSITORY, "--values", "values.yaml", "--version", synth.stack.config.cilium_version,
        "--namespace", "kube-system", "--wait", "--timeout", timeout, "--kubeconfig", "kubeconfig",
    ]  # fmt: skip
    delete = find_step(steps, ids["cilium"], "Delete")
    assert files_by_name(delete.commands[1]) == [
        "helm", "uninstall", "cilium", "--namespace", "kube-system", "--wait", "--timeout", timeout,
        "--kubeconfig", "kubeconfig",
    ]  # fmt: skip


@pytest.mark.helm
@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_every_wait_ends_well_before_the_provider_lambda_does(request, datapath):
    synth, steps = synth_of(request, datapath), provider_steps_of(request, datapath)
    handler = synth.stack.cluster.node.find_child("KubectlProvider").node.find_child("Handler")
    lambda_timeout = synth.resource(handler)["Properties"]["Timeout"]
    assert lambda_timeout == PROVIDER_LAMBDA_TIMEOUT.to_seconds() == 900
    limit = lambda_timeout - MARGIN_S
    timeouts = {
        (s.logical_id, s.request_type): command[command.index("--timeout") + 1]
        for s in steps
        for command in s.commands
        if "--timeout" in command
    }
    assert len(timeouts) == 4  # both charts, install and uninstall
    for where, timeout in timeouts.items():
        assert timeout.endswith("s") and 0 < int(timeout[:-1]) <= limit, (where, timeout)
    object_values = synth.resources("Custom::AWSCDK-EKS-KubernetesObjectValue").values()
    assert object_values
    for resource in object_values:
        assert 0 < resource["Properties"]["TimeoutSeconds"] <= limit


def test_manifests_are_created_with_save_config_and_deleted(steps, ids):
    manifests = [s for s in steps if s.resource_type == "Custom::AWSCDK-EKS-KubernetesResource"]
    assert {ids[name] for name in ("namespace", "App", "Ingress", "NetworkPolicy")} <= {
        s.logical_id for s in manifests
    }
    for s in manifests:
        # A service's manifest is applied (Overwrite), which saves its configuration itself; the others created.
        overwrite = s.logical_id.startswith("CiliumMeshService")
        verb = {"Create": ["apply" if overwrite else "create"], "Delete": ["delete"]}[s.request_type]
        options = ["--save-config"] if s.request_type == "Create" and not overwrite else []
        assert [files_by_name(c) for c in s.commands[1:]] == [
            ["kubectl", *verb, "--kubeconfig", "kubeconfig", "-f", "manifest.yaml", *options]
        ], (s.logical_id, s.request_type)
        assert s.manifests == find_step(steps, s.logical_id, "Create").manifests


def test_destroy_runs_deploy_backwards(steps, ids):
    """Deletes run in the reverse of creation: app and routing, then Cilium, then the controller."""
    created = [s.logical_id for s in steps if s.request_type == "Create"]
    deleted = [s.logical_id for s in steps if s.request_type == "Delete"]
    assert [s.request_type for s in steps] == ["Create"] * len(created) + ["Delete"] * len(deleted)
    assert deleted == created[::-1]
    assert position(steps, ids["lbc"], "Create") < position(steps, ids["cilium"], "Create")
    assert position(steps, ids["cilium"], "Delete") < position(steps, ids["lbc"], "Delete")
    for name in ("App", "Ingress", "MeshService", "NetworkPolicy", "hostname"):
        assert position(steps, ids["cilium"], "Create") < position(steps, ids[name], "Create")
        assert position(steps, ids[name], "Delete") < position(steps, ids["cilium"], "Delete")


def test_each_namespace_exists_before_its_objects_and_outlives_them(steps):
    created_namespaces = {"kube-system"}
    for s in (s for s in steps if s.request_type == "Create"):
        for document in s.manifests or []:
            namespace = document["metadata"].get("namespace")
            assert namespace is None or namespace in created_namespaces, (s.logical_id, document["metadata"])
        created_namespaces |= {d["metadata"]["name"] for d in s.manifests or [] if d["kind"] == "Namespace"}
    assert "workshop" in created_namespaces
    deleted_namespaces = set()
    for s in (s for s in steps if s.request_type == "Delete"):
        for document in s.manifests or []:
            assert document["metadata"].get("namespace") not in deleted_namespaces
        deleted_namespaces |= {d["metadata"]["name"] for d in s.manifests or [] if d["kind"] == "Namespace"}
    for s in (s for s in steps if s.resource_type == "Custom::AWSCDK-EKS-HelmChart"):
        assert s.commands[1][s.commands[1].index("--namespace") + 1] == "kube-system"


@pytest.mark.helm
@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_cilium_values_file_is_the_values_with_the_cluster_endpoint(request, datapath):
    synth, steps = synth_of(request, datapath), provider_steps_of(request, datapath)
    values = find_step(steps, synth.logical_id(synth.stack.mesh.cilium), "Create").values
    config = synth.stack.config
    strict = NODE_CIDR if config.encryption == "wireguard" else None
    assert values == cilium_values(API_SERVER_HOST, datapath, config.cluster_name, config.cilium_version,
                                   encryption=config.encryption, strict_mode_cidr=strict)  # fmt: skip
    assert values["k8sServiceHost"] == API_SERVER_HOST


@pytest.mark.helm
@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_cilium_chart_renders_with_the_handlers_values_file(request, datapath):
    synth, steps = synth_of(request, datapath), provider_steps_of(request, datapath)
    rendered = find_step(steps, synth.logical_id(synth.stack.mesh.cilium), "Create").rendered
    config = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cilium-config")["data"]
    keys = ("cni-chaining-mode", "ipam", "kube-proxy-replacement", "enable-envoy-config", "enable-hubble")
    assert {k: config.get(k) for k in keys} == {
        "cni-chaining-mode": "aws-cni" if datapath == "chaining" else None,
        "ipam": "cluster-pool" if datapath == "chaining" else "eni",
        "kube-proxy-replacement": "true",
        "enable-envoy-config": "true",
        "enable-hubble": "true",
    }
    # The shared Ingress: an NLB with instance targets, in front of a Service whose only endpoint is a placeholder.
    service = next(d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] == "cilium-ingress")
    assert service["spec"]["type"] == "LoadBalancer" and "selector" not in service["spec"]
    assert service["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"] == "instance"
    placeholder = next(d for d in rendered if d["kind"] in ("Endpoints", "EndpointSlice") and "cilium-ingress" in d["metadata"]["name"])
    assert "192.192.192.192" in json.dumps(placeholder)
    assert {d["metadata"]["name"] for d in rendered if d["kind"] == "Deployment"} >= {"hubble-relay", "hubble-ui"}
    # The chart hands the API server to Cilium's pods as environment, not in cilium-config.
    api_server = {
        (d["metadata"]["name"], c["name"]): {e["name"]: e.get("value") for e in c.get("env", [])
                                             if e["name"].startswith("KUBERNETES_SERVICE_")}
        for d in rendered
        if d["kind"] in ("DaemonSet", "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])
    }  # fmt: skip
    expected = {"KUBERNETES_SERVICE_HOST": API_SERVER_HOST, "KUBERNETES_SERVICE_PORT": "443"}
    for workload in (("cilium", "cilium-agent"), ("cilium-envoy", "cilium-envoy"), ("cilium-operator", "cilium-operator")):
        assert api_server[workload] == expected, workload
    assert all(env in ({}, expected) for env in api_server.values()), api_server


def test_ingress_hostname_is_read_from_cilium_ingress(steps, ids):
    create = find_step(steps, ids["hostname"], "Create")
    assert files_by_name(create.commands[1]) == [
        "kubectl", "--kubeconfig", "kubeconfig", "get", "-n", "kube-system", "service", "cilium-ingress",
        "-o=jsonpath='{.status.loadBalancer.ingress[0].hostname}'",
    ]  # fmt: skip
    assert create.result == {"Data": {"Value": INGRESS_HOSTNAME}}
    assert len(find_step(steps, ids["hostname"], "Delete").commands) == 1  # only the log-in


@pytest.mark.helm
@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_every_object_the_handler_would_create_is_valid(request, datapath):
    synth, steps = synth_of(request, datapath), provider_steps_of(request, datapath)
    documents = [d for s in steps if s.request_type == "Create" for d in s.manifests or []]
    assert len(documents) >= 20
    for document in documents:
        validate_object(document, synth.stack.config.kubernetes_version)


@pytest.mark.parametrize(
    ("wait", "expected"),
    [(False, True), ("absent", False), (True, True)],
    ids=["false-waits", "absent-does-not-wait", "true-waits"],
)
def test_cloudformation_hands_wait_false_to_the_handler_as_a_string_that_waits(synth, ids, wait, expected):
    """CloudFormation sends "false"; the handler tests it for truth, so only a removed Wait does not wait."""
    chart = copy.deepcopy(synth.template["Resources"][ids["lbc"]])
    chart["Properties"].pop("Wait", None)
    if wait != "absent":
        chart["Properties"]["Wait"] = wait
    (create, _) = dry_run({"Resources": {ids["lbc"]: chart}}, synth.stack)
    assert ("--wait" in create.commands[1]) is expected


@pytest.mark.slow
def test_kubectl_layer_matches_the_cluster_version(synth):
    result = subprocess.run(
        [layer_kubectl(synth.stack.config.kubernetes_version), "version", "--client", "--output", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    client = json.loads(result.stdout)["clientVersion"]
    assert f"{client['major']}.{client['minor']}" == synth.stack.config.kubernetes_version


def test_dry_run_fails_on_a_command_it_cannot_answer(synth):
    """A resource that makes the handler run something unrecorded (here kubectl patch) stops the dry run."""
    patch = {
        "Type": "Custom::AWSCDK-EKS-KubernetesPatch",
        "Properties": {
            "ClusterName": synth.stack.config.cluster_name,
            "ResourceName": "deployment/coredns",
            "ResourceNamespace": "kube-system",
            "ApplyPatchJson": "{}",
            "RestorePatchJson": "{}",
            "PatchType": "strategic",
        },
    }
    with pytest.raises(UnknownCommand, match=r"'kubectl', .*'patch', 'deployment/coredns'"):
        dry_run({"Resources": {"Patch": patch}}, synth.stack)


def test_a_services_manifest_is_applied_so_existing_version_services_are_taken_over(synth_eni, provider_steps_eni):
    """aws-cdk-lib's handler creates a manifest with `kubectl create` unless Overwrite: a service's version
    Services may already exist (hand-written, or in an earlier stack's sample manifest). The others are created."""
    mesh = synth_eni.stack.mesh
    verbs = {}
    for name, manifest in mesh.manifests.items():
        step = find_step(provider_steps_eni, synth_eni.logical_id(manifest), "Create")
        verbs[name] = {without_option(argv[1:], "--kubeconfig")[0] for argv in step.commands if argv[0] == "kubectl"}
    assert verbs["Service-workshop-catalogdetail"] == {"apply"}
    assert verbs["App"] == {"create"}
