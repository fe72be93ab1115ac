"""The smoke test's files (manifests/smoke/) as the stack applies them; free of aws-cdk-lib, so the
datapath model (checks/datapath.py) and the local tests load them without the CDK's Node.js runtime."""

from __future__ import annotations

import hashlib
import json

from .manifests import MANIFESTS_DIR, load_documents, replaced_by_name
from .traffic import MeshService

SMOKE_DIR = MANIFESTS_DIR / "smoke"
SMOKE_TEST_FILE = SMOKE_DIR / "smoke-test.yaml"
SMOKE_SCRIPT_FILE = SMOKE_DIR / "smoke_test.py"
SMOKE_POLICY_FILE = SMOKE_DIR / "network-policy.yaml"
SMOKE_POLICY_DATAPATH_FILES = {"chaining": None, "eni": SMOKE_DIR / "network-policy-eni.yaml"}
# The Job's own deadline (activeDeadlineSeconds in smoke-test.yaml), below the stack's wait for its
# verdict, below the provider Lambda's 15 minutes (tests/test_smoke.py checks the order).
VERDICT_WAIT_S = 600


def smoke_documents(policy: MeshService, datapath: str, network_policy: bool) -> list[dict]:
    """manifests/smoke/ as the stack applies it: the script as a ConfigMap, the Job's settings from the
    configuration and a name from their digest, and the smoke test's network policy with the app's."""
    documents = load_documents(SMOKE_TEST_FILE)
    if network_policy:
        replacements = SMOKE_POLICY_DATAPATH_FILES[datapath]
        documents += replaced_by_name(load_documents(SMOKE_POLICY_FILE), load_documents(replacements) if replacements else [])
    script = SMOKE_SCRIPT_FILE.read_text()
    documents.append({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "smoke-test-script", "namespace": policy.namespace},
        "data": {SMOKE_SCRIPT_FILE.name: script},
    })  # fmt: skip
    (job,) = [d for d in documents if d["kind"] == "Job"]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    env["WEIGHTS"]["value"] = json.dumps(dict(policy.weights))
    env["PIN_HEADER"]["value"] = policy.pin_header or ""
    if not network_policy:
        env["DENIED_URL"]["value"] = ""  # nothing refuses it then
    digest = hashlib.sha256(json.dumps([job, script, documents[:-1]], sort_keys=True).encode()).hexdigest()[:10]
    job["metadata"]["name"] = f"smoke-test-{digest}"
    env["VERDICT_KEY"] = {"name": "VERDICT_KEY", "value": job["metadata"]["name"]}
    job["spec"]["template"]["spec"]["containers"][0]["env"] = list(env.values())
    return documents


def verdict_configmap(documents: list[dict]) -> tuple[str, str, str]:
    """(namespace, ConfigMap, key) the Job writes its verdict to."""
    (job,) = [d for d in documents if d["kind"] == "Job"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return job["metadata"]["namespace"], env["VERDICT_CONFIGMAP"], env["VERDICT_KEY"]


RESULT_CONFIGMAP = "smoke-test-result"


def result_document(namespace: str, verdict: str) -> dict:
    """The verdict handed back to the cluster, where the admission policy smoke-test-verdict refuses it unless "pass"."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": RESULT_CONFIGMAP, "namespace": namespace},
            "data": {"verdict": verdict}}  # fmt: skip
