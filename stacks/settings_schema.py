"""The JSON Schema of cdk.json (cdk.schema.json), so that an editor completes and checks the settings.

``services`` is generated from the model (cilium_mesh.declaration.services_schema); every other key
is described here, and tests/test_services.py checks that each key the app reads is, that cdk.json
validates, and that the committed file is current.

    python -m stacks.settings_schema      # rewrites cdk.schema.json
"""

from __future__ import annotations

import json

from cilium_mesh.declaration import services_schema
from cilium_mesh.manifests import DATAPATHS

from . import ROOT
from .config import EXISTING_CLUSTER_KEYS, EXISTING_CLUSTER_OPTIONAL_KEYS, KEYS

SCHEMA_FILE = ROOT / "cdk.schema.json"
_NULLABLE_OBJECT = {"type": ["object", "null"]}
_STRINGS = {"type": "array", "items": {"type": "string"}}
SETTINGS = {
    "region": ({"type": "string"}, "An AWS region name, like us-west-2."),
    "availability_zones": ({**_STRINGS, "minItems": 3, "maxItems": 3}, "3 different zones of region (given, so synth needs no AWS lookup)."),
    "cluster_name": ({"type": "string"}, "The EKS cluster's name: a letter, then letters, digits and '-'."),
    "kubernetes_version": ({"type": "string"}, 'A string like "1.35" (not a JSON number: 1.30 would read as 1.3).'),
    "cilium_version": ({"type": "string"}, "The Cilium chart's version, like 1.19.6."),
    "node_instance_type": ({"type": "string"}, "An x86_64 EC2 instance type, like m6i.large."),
    "node_count": ({"type": ["integer", "string"]}, "2 to 50 nodes."),
    "admin_principal_arn": ({"type": ["string", "null"]}, "null, or an IAM role or user ARN that gets cluster admin."),
    "endpoint_public_cidrs": ({**_STRINGS, "minItems": 1, "maxItems": 40}, "IPv4 CIDRs admitted to the public API endpoint."),
    "traffic_weights": (_NULLABLE_OBJECT, "The sample app's catalogdetail weights, version -> weight (null: its declaration's)."),
    "network_policy": ({"type": ["boolean", "string"]}, "Apply each service's policy and the sample's (default true)."),
    "datapath": ({"enum": [*DATAPATHS, None]}, "eni (Cilium as the only CNI) or chaining (onto the VPC CNI); null: eni, or chaining with existing_cluster."),
    "metrics": ({"type": ["boolean", "string"]}, "AMP workspace, collector, rules and alerts (default true)."),
    "alert_email": ({"type": ["string", "null"]}, "null, or an address subscribed to the alerts; needs metrics."),
    "smoke_test": ({"type": ["boolean", "string"]}, "The deploy's smoke test (default true)."),
    "rollout": (_NULLABLE_OBJECT, "The sample app's catalogdetail rollout settings (null: weights apply at once)."),
    "existing_cluster": (
        {"type": ["object", "null"], "properties": {key: {"description": text} for key, text in {**EXISTING_CLUSTER_KEYS, **EXISTING_CLUSTER_OPTIONAL_KEYS}.items()},
         "required": list(EXISTING_CLUSTER_KEYS), "additionalProperties": False},  # fmt: skip
        "null (the stack creates the cluster), or the cluster you run, to import.",
    ),
    "sample_app": ({"type": ["boolean", "string"]}, "Apply the Product Catalog sample and declare its catalogdetail (default true)."),
    "services": (None, "Your services in the mesh (docs/services.md)."),
    "encryption": ({"enum": ["wireguard", "none", None]}, "Transparent encryption between nodes: null is the datapath's (eni: wireguard; chaining: none)."),
}


def settings_schema() -> dict:
    services = services_schema()
    context = {key: {**(schema or {}), "description": text} for key, (schema, text) in SETTINGS.items()}
    context["services"] = {"type": ["array", "null"], "items": services["items"], "description": SETTINGS["services"][1]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cdk.json of cilium-mesh-eks",
        "type": "object",
        "properties": {
            "app": {"type": "string"},
            "context": {"type": "object", "properties": {k: context[k] for k in KEYS}},
        },
        "$defs": services["$defs"],
    }


def render() -> str:
    return json.dumps(settings_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE.relative_to(ROOT)}")
