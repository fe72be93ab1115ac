"""The plain YAML in manifests/: loaded as-is, so `kubectl apply -f` and the stack apply the same objects."""

from pathlib import Path

import yaml

MANIFESTS_DIR = Path(__file__).resolve().parents[2] / "manifests"
NAMESPACE_FILE = MANIFESTS_DIR / "app" / "00-namespace.yaml"
WORKLOAD_FILES = tuple(MANIFESTS_DIR / "app" / name for name in ("frontend.yaml", "productcatalog.yaml", "catalogdetail.yaml"))
INGRESS_FILE = MANIFESTS_DIR / "app" / "ingress.yaml"
NETWORK_POLICY_FILE = MANIFESTS_DIR / "policy" / "network-policy.yaml"
CILIUM_VALUES_FILE = MANIFESTS_DIR / "cilium" / "values.yaml"
TRAFFIC_POLICY_FILE = MANIFESTS_DIR / "traffic" / "catalogdetail-envoy.yaml"


# libyaml's safe loader parses the same documents ten times faster; PyYAML's wheels bundle it.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(*paths: Path) -> list[dict]:
    """All non-empty YAML documents of the given files, in order."""
    documents: list[dict] = []
    for path in paths:
        with path.open() as stream:
            documents.extend(doc for doc in yaml.load_all(stream, Loader=_SAFE_LOADER) if doc)
    return documents


def service_names(documents: list[dict], namespace: str) -> set[str]:
    return {
        doc["metadata"]["name"]
        for doc in documents
        if doc.get("kind") == "Service" and doc["metadata"].get("namespace") == namespace
    }
