"""The plain YAML in manifests/: loaded as-is, so `kubectl apply -f` and the stack apply the same objects."""

from pathlib import Path

import yaml

# In this repository manifests/ is at its root; an installed wheel carries it inside the package (pyproject.toml).
_PACKAGED = Path(__file__).resolve().parent / "manifests"
MANIFESTS_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "manifests"
NAMESPACE_FILE = MANIFESTS_DIR / "app" / "00-namespace.yaml"
# The mesh's own namespace (its smoke test and rollout loads).
MESH_NAMESPACE_FILE = MANIFESTS_DIR / "mesh" / "namespace.yaml"
WORKLOAD_FILES = tuple(MANIFESTS_DIR / "app" / name for name in ("frontend.yaml", "productcatalog.yaml", "catalogdetail.yaml"))
INGRESS_FILE = MANIFESTS_DIR / "app" / "ingress.yaml"
NETWORK_POLICY_FILE = MANIFESTS_DIR / "policy" / "network-policy.yaml"
CILIUM_VALUES_FILE = MANIFESTS_DIR / "cilium" / "values.yaml"
# How pods get their network (docs/datapaths.md):
#   chaining: Cilium chained onto the AWS VPC CNI (the walkthrough); L3/L4 policy.
#   eni:      Cilium as the only CNI, its operator assigning pod addresses from ENIs; L7 policy too.
DATAPATHS = ("chaining", "eni")
# Each datapath's versions of some of NETWORK_POLICY_FILE's policies, which they replace by name:
#   chaining: frontend also admits the nodes (Cilium's Ingress is masqueraded to its node across nodes);
#   eni:      L7 rules, which only Cilium as the only CNI enforces.
NETWORK_POLICY_DATAPATH_FILES = {datapath: MANIFESTS_DIR / "policy" / f"network-policy-{datapath}.yaml" for datapath in DATAPATHS}
CILIUM_DATAPATH_FILES = {datapath: MANIFESTS_DIR / "cilium" / f"datapath-{datapath}.yaml" for datapath in DATAPATHS}
# With encryption wireguard (datapath eni only): WireGuard, and its strict mode in the chart's keys of the
# release (1.18: encryption.strictMode.*; 1.19+: encryption.strictMode.egress.*).
CILIUM_WIREGUARD_FILE = MANIFESTS_DIR / "cilium" / "encryption-wireguard.yaml"
CILIUM_STRICT_MODE_FILES = {"1.18": MANIFESTS_DIR / "cilium" / "strict-mode-flat.yaml"}
CILIUM_STRICT_MODE_DEFAULT_FILE = MANIFESTS_DIR / "cilium" / "strict-mode-egress.yaml"
# With existing_cluster (chaining only): what leaves the cluster working once Cilium is uninstalled.
CILIUM_EXISTING_CLUSTER_FILE = MANIFESTS_DIR / "cilium" / "existing-cluster.yaml"
TRAFFIC_POLICY_FILE = MANIFESTS_DIR / "traffic" / "catalogdetail-envoy.yaml"
# The sample app's declaration of catalogdetail, in the form of cdk.json's "services".
SAMPLE_DECLARATION_FILE = MANIFESTS_DIR / "app" / "mesh-services.yaml"


def cilium_release_file(cilium_version: str) -> Path | None:
    """manifests/cilium/release-<minor>.yaml: values only that minor's chart has, if there are any."""
    minor = ".".join(cilium_version.split(".")[:2])
    path = MANIFESTS_DIR / "cilium" / f"release-{minor}.yaml"
    return path if path.exists() else None



# libyaml's safe loader parses the same documents ten times faster; PyYAML's wheels bundle it.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_documents(text) -> list[dict]:
    """The non-empty YAML documents of a string or stream (a rendered chart is thousands of lines)."""
    return [doc for doc in yaml.load_all(text, Loader=_SAFE_LOADER) if doc]


def load_documents(*paths: Path) -> list[dict]:
    """All non-empty YAML documents of the given files, in order."""
    documents: list[dict] = []
    for path in paths:
        with path.open() as stream:
            documents.extend(doc for doc in yaml.load_all(stream, Loader=_SAFE_LOADER) if doc)
    return documents


def replaced_by_name(documents: list[dict], replacements: list[dict]) -> list[dict]:
    """``documents`` with each object that a replacement names (kind, namespace, name) swapped for it, as
    ``kubectl apply`` of the replacements after the documents would leave them."""
    def key(doc: dict) -> tuple:
        return doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]

    by_key = {key(doc): doc for doc in replacements}
    unmatched = by_key.keys() - {key(doc) for doc in documents}
    if unmatched:
        raise ValueError(f"replacements name no existing object: {sorted(unmatched)}")
    return [by_key.get(key(doc), doc) for doc in documents]


def service_names(documents: list[dict], namespace: str) -> set[str]:
    return {
        doc["metadata"]["name"]
        for doc in documents
        if doc.get("kind") == "Service" and doc["metadata"].get("namespace") == namespace
    }
