"""The smoke test's files (manifests/smoke/) as the stack applies them, with what it asks each declared
service; free of aws-cdk-lib, so the datapath model (checks/datapath.py) and the local tests load them
without the CDK's Node.js runtime."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence

from .manifests import MANIFESTS_DIR, load_documents
from .policy import egress_to_pods, smoke_probes
from .traffic import MESH_NAMESPACE, OUTSIDER_LABELS, SMOKE_TEST_LABELS, MeshService

SMOKE_DIR = MANIFESTS_DIR / "smoke"
SMOKE_TEST_FILE = SMOKE_DIR / "smoke-test.yaml"
SMOKE_SCRIPT_FILE = SMOKE_DIR / "smoke_test.py"
SMOKE_POLICY_FILE = SMOKE_DIR / "network-policy.yaml"
SMOKE_SAMPLE_POLICY_FILE = SMOKE_DIR / "network-policy-sample.yaml"
SMOKE_WIREGUARD_FILE = SMOKE_DIR / "wireguard-rbac.yaml"
# The environment of the sample app's own checks (its Ingress, its app, its refused frontend).
SAMPLE_CHECKS = ("INGRESS_SERVICE", "PRODUCTS_URL", "DENIED_URL")
# The Job's own deadline (activeDeadlineSeconds in smoke-test.yaml), below the stack's wait for its
# verdict, below the provider Lambda's 15 minutes (tests/test_smoke.py checks the order).
VERDICT_WAIT_S = 600


def service_checks(service: MeshService, network_policy: bool) -> dict:
    """What the Job asks one service, and what the answers must show (manifests/smoke/smoke_test.py)."""
    base = f"http://{service.name}.{service.namespace}.svc.cluster.local:{service.port}"
    refused = network_policy and service.callers is not None
    return {
        "service": service.key,
        "base_url": base,
        "weights": {v: w for v, w in service.weights.items() if w > 0},
        "probes": [{"check": p.check, "method": p.method, "path": p.path, "headers": p.headers, "expect": p.expect}
                   for p in smoke_probes(service)],  # fmt: skip
        # Each version's pods, asked directly (the headless Service: no Envoy in between): the smoke test
        # expects each weighted version to answer (the split's header names the routed destination, which
        # failover may hide), the outsider expects every version to refuse it.
        "version_urls": {v: f"http://{service.version_host(v)}:{service.pod_port}{service.check_path}" for v in service.versions},
        "refused": refused,
    }


def _egress_to_services(name: str, labels: dict, services: Sequence[MeshService]) -> dict:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"{name}-to-services", "namespace": MESH_NAMESPACE},
        "spec": {
            "description": f"{name} reaches every declared service's pods on their port.",
            "endpointSelector": {"matchLabels": dict(labels)},
            "egress": [egress_to_pods(s) for s in services],
        },
    }  # fmt: skip


def smoke_documents(services: Sequence[MeshService], datapath: str, network_policy: bool, sample_app: bool,
                    encryption: str = "none") -> list[dict]:  # fmt: skip
    """manifests/smoke/ as the stack applies it: the script as a ConfigMap, the two Jobs with their
    settings from the declarations and a name from their digest, and the smoke test's network policy;
    with encryption wireguard, the check of every node's key and its read of the Nodes and CiliumNodes."""
    del datapath  # the services' own policies carry the datapath's L7 rules; the smoke test's are the same in both
    documents = load_documents(SMOKE_TEST_FILE)
    if encryption == "wireguard":
        documents += load_documents(SMOKE_WIREGUARD_FILE)
    if network_policy:
        documents += load_documents(SMOKE_POLICY_FILE) + (load_documents(SMOKE_SAMPLE_POLICY_FILE) if sample_app else [])
        if services:
            documents += [_egress_to_services("smoke-test", SMOKE_TEST_LABELS, services),
                          _egress_to_services("smoke-test-outsider", OUTSIDER_LABELS, services)]  # fmt: skip
    script = SMOKE_SCRIPT_FILE.read_text()
    documents.append({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "smoke-test-script", "namespace": MESH_NAMESPACE},
        "data": {SMOKE_SCRIPT_FILE.name: script},
    })  # fmt: skip
    (job,) = [d for d in documents if d["kind"] == "Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    env["SERVICES"]["value"] = json.dumps([service_checks(s, network_policy) for s in services], sort_keys=True)
    env["WIREGUARD"] = {"name": "WIREGUARD", "value": "true" if encryption == "wireguard" else ""}
    for key in SAMPLE_CHECKS:
        if not sample_app or (key == "DENIED_URL" and not network_policy):
            env[key]["value"] = ""  # no sample app; or nothing refuses the frontend probe
    digest = hashlib.sha256(json.dumps([job, script, documents[:-1]], sort_keys=True).encode()).hexdigest()[:10]
    outsider = copy.deepcopy(job)
    job["metadata"]["name"] = f"smoke-test-{digest}"
    outsider["metadata"]["name"] = f"smoke-test-outsider-{digest}"
    for metadata in (outsider["metadata"], outsider["spec"]["template"]["metadata"]):
        metadata["labels"] = dict(OUTSIDER_LABELS)
    outsider_container = outsider["spec"]["template"]["spec"]["containers"][0]
    outsider_container["name"] = "smoke-test-outsider"
    outsider_container["env"] = [*env.values(), {"name": "ROLE", "value": "outsider"},
                                 {"name": "VERDICT_KEY", "value": outsider["metadata"]["name"]}]  # fmt: skip
    container["env"] = [*env.values(), {"name": "VERDICT_KEY", "value": job["metadata"]["name"]},
                        {"name": "OUTSIDER_KEY", "value": outsider["metadata"]["name"]}]  # fmt: skip
    documents.insert(documents.index(job) + 1, outsider)
    return documents


def verdict_configmap(documents: list[dict]) -> tuple[str, str, str]:
    """(namespace, ConfigMap, key) the main Job writes its verdict to."""
    job = next(d for d in documents if d["kind"] == "Job" and d["metadata"]["labels"] == SMOKE_TEST_LABELS)
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return job["metadata"]["namespace"], env["VERDICT_CONFIGMAP"], env["VERDICT_KEY"]


RESULT_CONFIGMAP = "smoke-test-result"


def result_document(namespace: str, verdict: str) -> dict:
    """The verdict handed back to the cluster, where the admission policy smoke-test-verdict refuses it unless "pass"."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": RESULT_CONFIGMAP, "namespace": namespace},
            "data": {"verdict": verdict}}  # fmt: skip
