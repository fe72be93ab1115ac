"""Cilium Helm values: manifests/cilium/values.yaml, the datapath's file, the release's file, and what depends on the cluster."""

import copy

from .manifests import (
    CILIUM_DATAPATH_FILES,
    CILIUM_EXISTING_CLUSTER_FILE,
    CILIUM_STRICT_MODE_DEFAULT_FILE,
    CILIUM_STRICT_MODE_FILES,
    CILIUM_VALUES_FILE,
    CILIUM_WIREGUARD_FILE,
    cilium_release_file,
    load_documents,
)


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


def strict_mode_file(cilium_version: str):
    """The strict mode's values in the chart's keys of that release."""
    return CILIUM_STRICT_MODE_FILES.get(".".join(cilium_version.split(".")[:2]), CILIUM_STRICT_MODE_DEFAULT_FILE)


def encryption_values(cilium_version: str, strict_mode_cidr: str | None) -> list[dict]:
    """WireGuard; with a CIDR also its strict mode (the CIDR where the file's keys are)."""
    layers = load_documents(CILIUM_WIREGUARD_FILE)
    if strict_mode_cidr is not None:
        (strict,) = load_documents(strict_mode_file(cilium_version))
        mode = strict["encryption"]["strictMode"]
        (mode.get("egress") or mode)["cidr"] = strict_mode_cidr
        layers.append(strict)
    return layers


def cilium_values(api_server_host: str, datapath: str, cluster_name: str, cilium_version: str,
                  existing_cluster: bool = False, encryption: str = "none", strict_mode_cidr: str | None = None) -> dict:  # fmt: skip
    """What the stack hands helm: values.yaml, datapath-<datapath>.yaml, release-<minor>.yaml where the
    minor has one, existing-cluster.yaml on a cluster the user runs, with encryption wireguard its
    files, then the cluster's values."""
    release = cilium_release_file(cilium_version)
    extra = [*([release] if release else []), *([CILIUM_EXISTING_CLUSTER_FILE] if existing_cluster else [])]
    files = load_documents(CILIUM_VALUES_FILE, CILIUM_DATAPATH_FILES[datapath], *extra)
    if encryption == "wireguard":
        files += encryption_values(cilium_version, strict_mode_cidr)
    values = {}
    for layer in (*files, cluster_values(api_server_host, datapath, cluster_name)):
        values = merge(values, layer)
    return values
