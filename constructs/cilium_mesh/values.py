"""Cilium Helm values: manifests/cilium/values.yaml, the datapath's file, the release's file, and what depends on the cluster."""

import copy

from .manifests import CILIUM_DATAPATH_FILES, CILIUM_EXISTING_CLUSTER_FILE, CILIUM_VALUES_FILE, cilium_release_file, load_documents


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` over ``base`` (maps merge, everything else replaces), as helm merges ``-f`` files."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def cluster_values(api_server_host: str, datapath: str, cluster_name: str) -> dict:
    """Without kube-proxy nothing routes the ``kubernetes`` Service until Cilium runs, so Cilium must
    reach the API server by its endpoint. In ENI mode the cluster name tags (and so scopes the
    cleanup of) the ENIs Cilium's operator creates."""
    values = {"k8sServiceHost": api_server_host, "k8sServicePort": 443}
    if datapath == "eni":
        values["cluster"] = {"name": cluster_name}
    return values


def cilium_values(api_server_host: str, datapath: str, cluster_name: str, cilium_version: str,
                  existing_cluster: bool = False) -> dict:  # fmt: skip
    """What the stack hands helm: values.yaml, datapath-<datapath>.yaml, release-<minor>.yaml where the
    minor has one, existing-cluster.yaml on a cluster the user runs, then the cluster's values."""
    release = cilium_release_file(cilium_version)
    extra = [*([release] if release else []), *([CILIUM_EXISTING_CLUSTER_FILE] if existing_cluster else [])]
    files = load_documents(CILIUM_VALUES_FILE, CILIUM_DATAPATH_FILES[datapath], *extra)
    values = {}
    for layer in (*files, cluster_values(api_server_host, datapath, cluster_name)):
        values = merge(values, layer)
    return values
