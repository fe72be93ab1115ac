"""Every Kubernetes object the stack applies is valid for the cluster's version, and hardened."""

import copy
import dataclasses
import json
import re

import pytest
from cilium_mesh.declaration import sample_service
from cilium_mesh.manifests import (
    INGRESS_FILE,
    MANIFESTS_DIR,
    MESH_NAMESPACE_FILE,
    NAMESPACE_FILE,
    SAMPLE_DECLARATION_FILE,
    NETWORK_POLICY_FILE,
    NETWORK_POLICY_DATAPATH_FILES,
    TRAFFIC_POLICY_FILE,
    WORKLOAD_FILES,
    load_documents,
    replaced_by_name,
)
from cilium_mesh.metrics_files import SCRAPER_RBAC_FILE
from cilium_mesh.rollout_plan import STATE_ANNOTATION
from cilium_mesh.policy import service_policies
from cilium_mesh.rollout_load import LOAD_FILE
from cilium_mesh.smoke_files import SMOKE_POLICY_FILE, SMOKE_SAMPLE_POLICY_FILE, SMOKE_TEST_FILE, SMOKE_WIREGUARD_FILE
from conftest import CONTEXT, manifest_documents, synth_of
from tools.render_traffic_policy import render
from checks.provider_dry_run import find_step
from checks.schemas import InvalidObject, validate_object

FILES = [NAMESPACE_FILE, MESH_NAMESPACE_FILE, *WORKLOAD_FILES, INGRESS_FILE, NETWORK_POLICY_FILE, *NETWORK_POLICY_DATAPATH_FILES.values(),
         TRAFFIC_POLICY_FILE, SCRAPER_RBAC_FILE, SMOKE_TEST_FILE, SMOKE_POLICY_FILE, SMOKE_SAMPLE_POLICY_FILE, SMOKE_WIREGUARD_FILE, LOAD_FILE]
# Not objects: a declaration, in cdk.json's form.
DECLARATIONS = [SAMPLE_DECLARATION_FILE]


def validate(document: dict) -> None:
    validate_object(document, CONTEXT["kubernetes_version"])


def applied_documents(synth) -> list[dict]:
    return [
        doc
        for resource in synth.resources("Custom::AWSCDK-EKS-KubernetesResource").values()
        for doc in manifest_documents(resource)
    ]


def test_every_manifest_file_is_listed():
    on_disk = {p for p in MANIFESTS_DIR.rglob("*.yaml") if p.parent.name not in ("cilium", "prometheus")}
    assert on_disk == set(FILES) | set(DECLARATIONS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(MANIFESTS_DIR)))
def test_manifest_file_is_valid_for_the_cluster_version(path):
    documents = load_documents(path)
    assert documents
    for document in documents:
        validate(document)


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_every_object_the_stack_applies_is_valid(request, datapath):
    documents = applied_documents(synth_of(request, datapath))
    assert len(documents) >= 20
    for document in documents:
        validate(document)


def test_validation_rejects_a_typo_in_a_built_in_kind():
    deployment = load_documents(WORKLOAD_FILES[0])[1]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(InvalidObject, match=r"spec\.template\.spec\.containers\[0\]\.imagePullPolcy: unknown field"):
        validate(deployment)


# An L7 policy like the walkthrough's; the project's own policy file is L3/L4 only.
HTTP_POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "catalogdetail-http", "namespace": "workshop"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "catalogdetail"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"app": "productcatalog"}}],
                "toPorts": [
                    {
                        "ports": [{"port": "3000", "protocol": "TCP"}],
                        "rules": {"http": [{"method": "GET", "path": "/catalogDetail"}]},
                    }
                ],
            }
        ],
    },
}


def renamed(document: dict, path: tuple, field: str, typo: str) -> dict:
    """A copy of ``document`` with ``field`` of the object at ``path`` renamed to ``typo``."""
    document = copy.deepcopy(document)
    node = document
    for key in path:
        node = node[key]
    node[typo] = node.pop(field)
    return document


# where: (object path, field, typo, the path the error must name)
TYPOS = {
    "http-rule": (
        ("spec", "ingress", 0, "toPorts", 0, "rules", "http", 0), "method", "methd",
        "spec.ingress[0].toPorts[0].rules.http[0].methd",
    ),
    "port-rule": (
        ("spec", "ingress", 0, "toPorts", 0, "ports", 0), "protocol", "protocl",
        "spec.ingress[0].toPorts[0].ports[0].protocl",
    ),
    "spec": (("spec",), "ingress", "ingres", "spec.ingres"),
    "metadata": (("metadata",), "namespace", "namspace", "metadata.namspace"),
}  # fmt: skip


@pytest.mark.parametrize("where", TYPOS)
def test_cilium_schema_rejects_a_typo_in_a_network_policy(where):
    """Cilium's own CRD schema knows every field, down to an HTTP rule or a port."""
    validate(HTTP_POLICY)
    path, field, typo, error_path = TYPOS[where]
    with pytest.raises(InvalidObject, match=re.escape(f"{error_path}: unknown field")):
        validate(renamed(HTTP_POLICY, path, field, typo))


def test_cilium_schema_rejects_a_typo_in_the_envoy_config():
    cec = load_documents(TRAFFIC_POLICY_FILE)[0]
    validate(cec)
    with pytest.raises(InvalidObject, match=re.escape("spec.backendServices[0].namspace: unknown field")):
        validate(renamed(cec, ("spec", "backendServices", 0), "namespace", "namspace"))


def test_rendered_traffic_policy_file_is_current():
    assert TRAFFIC_POLICY_FILE.read_text() == render(), "run: python -m tools.render_traffic_policy"


def test_the_stack_applies_the_same_traffic_policy_as_the_file(synth_eni, provider_steps_eni):
    """The rollout's apply (through aws-cdk-lib's handler) is the file plus the rollout's progress annotation."""
    assert not [d for d in applied_documents(synth_eni) if d["kind"] == "CiliumEnvoyConfig"], "one owner: the rollout"
    (cec,) = find_step(provider_steps_eni, synth_eni.logical_id(synth_eni.stack.traffic.resources["workshop/catalogdetail"])).manifests
    annotations = cec["metadata"].pop("annotations")
    assert set(annotations) == {STATE_ANNOTATION}
    assert cec == load_documents(TRAFFIC_POLICY_FILE)[0]


def test_app_objects_match_the_walkthrough():
    documents = {(d["kind"], d["metadata"]["name"]): d for d in load_documents(*WORKLOAD_FILES)}
    expected = {
        "frontend": ("frontend_node:2.0", 9000, "/ping", {"app": "frontend"}),
        "productcatalog": ("product_catalog:1.0", 5000, "/products/ping", {"app": "productcatalog"}),
        "catalogdetail": ("catalog_detail:1.0", 3000, "/ping", {"app": "catalogdetail", "version": "v1"}),
        "catalogdetail2": ("catalog_detail:2.0", 3000, "/ping", {"app": "catalogdetail", "version": "v2"}),
    }
    for name, (image, port, probe, labels) in expected.items():
        pod = documents[("Deployment", name)]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["image"] == f"public.ecr.aws/u2g6w7p2/eks-workshop-demo/{image}"
        assert container["ports"][0]["containerPort"] == port
        assert container["readinessProbe"]["httpGet"] == {"path": probe, "port": port}
        assert container["livenessProbe"]["httpGet"] == {"path": probe, "port": port}
        assert pod["metadata"]["labels"] == labels
    env = {c["name"]: c["env"][0] for d in documents.values() if d["kind"] == "Deployment"
           for c in d["spec"]["template"]["spec"]["containers"] if "env" in c}
    assert env["frontend"]["value"] == "http://productcatalog.workshop.svc.cluster.local:5000/products/"
    assert env["productcatalog"]["value"] == "http://catalogdetail.workshop.svc.cluster.local:3000/catalogDetail"
    documents |= {("Service", d["metadata"]["name"]): d for d in sample_service().version_services()}
    selectors = {n: documents[("Service", n)]["spec"]["selector"] for n in ("catalogdetail", "catalogdetailv1", "catalogdetailv2")}
    assert selectors == {
        "catalogdetail": {"app": "catalogdetail"},
        "catalogdetailv1": {"app": "catalogdetail", "version": "v1"},
        "catalogdetailv2": {"app": "catalogdetail", "version": "v2"},
    }
    ingress = load_documents(INGRESS_FILE)[0]
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert ingress["metadata"]["name"] == "productappingress" and ingress["spec"]["ingressClassName"] == "cilium"
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": "frontend", "port": {"number": 9000}}


def test_pods_are_hardened():
    for deployment in (d for d in load_documents(*WORKLOAD_FILES) if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
            assert {"cpu", "memory"} <= container["resources"]["limits"].keys()


def test_namespace_enforces_baseline_and_warns_restricted():
    labels = load_documents(NAMESPACE_FILE)[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


def test_network_policy_denies_by_default_and_allows_only_the_call_graph():
    policies = {p["metadata"]["name"]: p["spec"] for p in load_documents(NETWORK_POLICY_FILE)}
    assert policies["default-deny"] == {
        "description": policies["default-deny"]["description"],
        "endpointSelector": {},
        "ingress": [{}],
        "egress": [{}],
    }
    dns = policies["allow-dns"]["egress"][0]
    assert dns["toEndpoints"][0]["matchLabels"]["k8s:k8s-app"] == "kube-dns"
    assert {(p["port"], p["protocol"]) for p in dns["toPorts"][0]["ports"]} == {("53", "UDP"), ("53", "TCP")}

    def allowed(spec, direction):
        return {
            (json.dumps(rule.get("fromEndpoints", rule.get("toEndpoints", rule.get("fromEntities"))), sort_keys=True),
             port["port"])
            for rule in spec.get(direction, [])
            for to in rule["toPorts"]
            for port in to["ports"]
        }

    assert allowed(policies["frontend"], "ingress") == {('["ingress", "host"]', "9000")}
    assert allowed(policies["frontend"], "egress") == {('[{"matchLabels": {"app": "productcatalog"}}]', "5000")}
    assert allowed(policies["productcatalog"], "egress") == {('[{"matchLabels": {"app": "catalogdetail"}}]', "3000")}
    generated = {p["metadata"]["name"]: p["spec"] for p in service_policies(sample_service(), "chaining")}
    assert generated.keys() == {"mesh-catalogdetail-v1", "mesh-catalogdetail-v2"}
    for version in ("v1", "v2"):
        spec = generated[f"mesh-catalogdetail-{version}"]
        assert spec["endpointSelector"] == {"matchLabels": {"app": "catalogdetail", "version": version}}
        assert allowed(spec, "ingress") == {
            ('[{"matchLabels": {"app": "productcatalog"}}]', "3000"),
            ('[{"matchLabels": {"app": "smoke-test", "k8s:io.kubernetes.pod.namespace": "cilium-mesh"}}]', "3000"),
            ('["host"]', "3000"),
        }
        assert "egress" not in spec


def applied_policies(synth) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for d in applied_documents(synth) if d["kind"] == "CiliumNetworkPolicy"}


def l7_rules(spec: dict) -> list[dict]:
    return [to["rules"] for d in ("ingress", "egress") for rule in spec.get(d, []) for to in rule.get("toPorts", []) if "rules" in to]


def without_l7(spec: dict) -> dict:
    spec = json.loads(json.dumps(spec))
    for direction in ("ingress", "egress"):
        for rule in spec.get(direction, []):
            for to in rule.get("toPorts", []):
                to.pop("rules", None)
    spec.pop("description", None)
    return spec


def test_network_policy_has_no_l7_rules_while_cilium_chains_onto_the_vpc_cni(synth):
    """Chained Cilium does not enforce HTTP or DNS rules; a DNS rule not enforced as written can cut DNS."""
    policies = applied_policies(synth)
    assert policies and all(l7_rules(spec) == [] for spec in policies.values())


def test_eni_adds_l7_rules_on_the_same_peers_and_ports(synth, synth_eni):
    """catalogdetail answers productcatalog only GET /catalogDetail and /ping and the smoke test only
    GET /catalogDetail (its callers' http rules); the probes stay L4; DNS is visible. Besides, only
    chaining's frontend differs: it also admits the nodes (its masqueraded Ingress)."""
    chaining, eni = applied_policies(synth), applied_policies(synth_eni)
    assert chaining.keys() == eni.keys()
    differ = {name for name in eni if without_l7(eni[name]) != without_l7(chaining[name])}
    assert differ == {"frontend"}
    assert chaining["frontend"]["ingress"][0]["fromEntities"] == ["ingress", "host", "remote-node"]
    assert eni["frontend"]["ingress"][0]["fromEntities"] == ["ingress", "host"]
    assert {name for name, spec in eni.items() if l7_rules(spec)} == {"allow-dns", "mesh-catalogdetail-v1", "mesh-catalogdetail-v2"}
    http = [{"method": "GET", "path": "/catalogDetail"}, {"method": "GET", "path": "/ping"}]
    for version in ("v1", "v2"):
        assert l7_rules(eni[f"mesh-catalogdetail-{version}"]) == [{"http": http}, {"http": [{"method": "GET", "path": "/catalogDetail"}]}]
    assert l7_rules(eni["allow-dns"]) == [{"dns": [{"matchPattern": "*"}]}]


@pytest.mark.parametrize("datapath", sorted(NETWORK_POLICY_DATAPATH_FILES))
def test_datapath_file_replaces_policies_by_name_and_names_only_existing_ones(datapath):
    base = load_documents(NETWORK_POLICY_FILE)
    own = load_documents(NETWORK_POLICY_DATAPATH_FILES[datapath])
    replaced = replaced_by_name(base, own)
    assert [d["metadata"]["name"] for d in replaced] == [d["metadata"]["name"] for d in base]
    stray = {**own[0], "metadata": {"name": "allow-dnss", "namespace": "workshop"}}
    with pytest.raises(ValueError, match="allow-dnss"):
        replaced_by_name(base, [stray])


def test_the_mesh_namespace_enforces_restricted_and_its_pods_meet_it():
    """cilium-mesh runs the smoke test's two Jobs and each rollout's load under Pod Security "restricted":
    non-root, RuntimeDefault seccomp, no privilege escalation, every capability dropped, no host volume."""
    from cilium_mesh.rollout_load import load_documents_of
    from cilium_mesh.rollout_plan import RolloutLoad, RolloutSettings
    from cilium_mesh.smoke_files import smoke_documents

    labels = load_documents(MESH_NAMESPACE_FILE)[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    sample = sample_service()
    loaded = dataclasses.replace(sample, rollout=RolloutSettings(load=RolloutLoad()))
    workloads = [d for d in smoke_documents([sample], "eni", True, True) + load_documents_of(loaded, True)
                 if d["kind"] in ("Job", "Deployment")]  # fmt: skip
    assert len(workloads) == 3
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert workload["metadata"]["namespace"] == "cilium-mesh"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert all(set(v) - {"name"} <= {"configMap", "projected", "emptyDir"} for v in pod.get("volumes", []))
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            validate(workload)
