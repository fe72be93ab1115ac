"""The synthetic load of a declared service's rollout (rollout.load), rendered from manifests/mesh/.

Standard library only: the stack renders the documents at synth and hands them to the rollout Lambda,
which applies them when a gated rollout starts and deletes them when it ends.
"""

from __future__ import annotations

import hashlib
import json

from .manifests import MANIFESTS_DIR, load_documents
from .policy import dns_egress, egress_to_pods, load_labels
from .traffic import LOAD_HEADER, MESH_NAMESPACE, MeshService

LOAD_FILE = MANIFESTS_DIR / "mesh" / "rollout-load.yaml"
LOAD_SCRIPT_FILE = MANIFESTS_DIR / "mesh" / "rollout_load.py"


def load_name(service: MeshService) -> str:
    """``load-<namespace>-<name>``, or with a digest in place of the end when that is over 63 characters."""
    name = f"load-{service.namespace}-{service.name}"
    return name if len(name) <= 63 else f"{name[:52]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def load_documents_of(service: MeshService, network_policy: bool) -> list[dict]:
    """The load's Deployment, and with network policy its own egress: DNS and the service's pods."""
    load = service.rollout.load if service.rollout else None
    if load is None:
        return []
    (deployment,) = load_documents(LOAD_FILE)
    name, labels = load_name(service), load_labels(service)
    deployment["metadata"]["name"] = name
    deployment["spec"]["selector"]["matchLabels"] = labels
    deployment["spec"]["template"]["metadata"]["labels"] = labels
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [LOAD_SCRIPT_FILE.read_text()]
    url = f"http://{service.name}.{service.namespace}.svc.cluster.local:{service.port}{load.path or service.check_path}"
    values = {"URL": url, "METHOD": load.method, "HEADERS": json.dumps({**load.headers, LOAD_HEADER: "1"}),
              "RATE_PER_S": f"{load.rate_per_s:g}"}  # fmt: skip
    for env in container["env"]:
        env["value"] = values[env["name"]]
    if not network_policy:
        return [deployment]
    policy = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": MESH_NAMESPACE},
        "spec": {"description": f"The rollout load of {service.key} reaches DNS and the service's pods.",
                 "endpointSelector": {"matchLabels": labels}, "egress": [dns_egress(), egress_to_pods(service)]},
    }  # fmt: skip
    return [policy, deployment]
