"""Every Kubernetes object the stack applies is valid for the cluster's version, and hardened."""

import json

import jsonschema
import kubernetes_validate
import pytest
from cilium_mesh.manifests import (
    INGRESS_FILE,
    MANIFESTS_DIR,
    NAMESPACE_FILE,
    NETWORK_POLICY_FILE,
    TRAFFIC_POLICY_FILE,
    WORKLOAD_FILES,
    load_documents,
)
from conftest import CONTEXT, manifest_documents
from tools.render_traffic_policy import render

def custom_resource(spec: dict, defs: dict) -> dict:
    """A cilium.io/v2 object whose spec has exactly the fields this project uses."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cilium.io/v2"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {"type": "object", "additionalProperties": False, **spec},
        },
        "$defs": defs,
    }


SERVICE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "listener": {"type": "string"},
        "ports": {"type": "array"},
    },
}
PORT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port", "protocol"],
    "properties": {"port": {"type": "string", "pattern": "^[0-9]+$"}, "protocol": {"enum": ["TCP", "UDP", "ANY"]}},
}
RULE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "fromEndpoints": {"type": "array"},
        "toEndpoints": {"type": "array"},
        "fromEntities": {"type": "array", "items": {"enum": ["ingress", "host", "world", "cluster"]}},
        "toPorts": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "ports": {"type": "array", "items": PORT},
                    "rules": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"http": {"type": "array"}, "dns": {"type": "array"}},
                    },
                },
            },
        },
    },
}
CUSTOM_RESOURCE_SCHEMAS = {
    "CiliumEnvoyConfig": custom_resource(
        {
            "required": ["services", "backendServices", "resources"],
            "properties": {
                "services": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/service"}},
                "backendServices": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/service"}},
                "resources": {"type": "array", "items": {"type": "object", "required": ["@type", "name"]}},
            },
        },
        {"service": SERVICE},
    ),
    "CiliumNetworkPolicy": custom_resource(
        {
            "required": ["endpointSelector"],
            "properties": {
                "description": {"type": "string"},
                "endpointSelector": {"type": "object"},
                "ingress": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
                "egress": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
            },
        },
        {"rule": RULE},
    ),
}

FILES = [NAMESPACE_FILE, *WORKLOAD_FILES, INGRESS_FILE, NETWORK_POLICY_FILE, TRAFFIC_POLICY_FILE]


def validate(document: dict) -> None:
    schema = CUSTOM_RESOURCE_SCHEMAS.get(document["kind"])
    if schema:
        jsonschema.validate(document, schema)
    else:
        kubernetes_validate.validate(document, CONTEXT["kubernetes_version"], strict=True)


def applied_documents(synth) -> list[dict]:
    return [
        doc
        for resource in synth.resources("Custom::AWSCDK-EKS-KubernetesResource").values()
        for doc in manifest_documents(resource)
    ]


def test_every_manifest_file_is_listed():
    on_disk = {p for p in MANIFESTS_DIR.rglob("*.yaml") if p.parent.name != "cilium"}
    assert on_disk == set(FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(MANIFESTS_DIR)))
def test_manifest_file_is_valid_for_the_cluster_version(path):
    documents = load_documents(path)
    assert documents
    for document in documents:
        validate(document)


def test_every_object_the_stack_applies_is_valid(synth):
    documents = applied_documents(synth)
    assert len(documents) >= 20
    for document in documents:
        validate(document)


def test_validation_rejects_a_typo():
    deployment = load_documents(WORKLOAD_FILES[0])[1]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    policy = load_documents(NETWORK_POLICY_FILE)[0]
    policy["spec"]["ingres"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate(policy)


def test_rendered_traffic_policy_file_is_current():
    assert TRAFFIC_POLICY_FILE.read_text() == render(), "run: python -m tools.render_traffic_policy"


def test_the_stack_applies_the_same_traffic_policy_as_the_file(synth):
    cec = next(d for d in applied_documents(synth) if d["kind"] == "CiliumEnvoyConfig")
    labels = cec["metadata"]["labels"]
    prune = [k for k in labels if k.startswith("aws.cdk.eks/prune-")]
    assert len(prune) == 1, "CDK's prune label lets a removed object be deleted on update"
    del labels[prune[0]]
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
    assert {p["port"] for p in dns["toPorts"][0]["ports"]} == {"53"}

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
    catalog = policies["catalogdetail"]
    assert {s for s, _ in allowed(catalog, "ingress")} == {
        '[{"matchLabels": {"app": "productcatalog"}}]',
        '["ingress", "host"]',
    }
    for rule in catalog["ingress"]:
        http = rule["toPorts"][0]["rules"]["http"]
        assert http == [{"method": "GET", "path": "/catalogDetail"}, {"method": "GET", "path": "/ping"}]
    assert "egress" not in catalog
