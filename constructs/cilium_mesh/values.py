"""Cilium Helm values: manifests/cilium/values.yaml plus the API server endpoint of the cluster."""

import copy
from pathlib import Path

from .manifests import CILIUM_VALUES_FILE, load_documents


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` over ``base`` (maps merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def cluster_values(api_server_host: str) -> dict:
    """Without kube-proxy nothing routes the ``kubernetes`` Service until Cilium
    runs, so Cilium must reach the API server by its endpoint."""
    return {"k8sServiceHost": api_server_host, "k8sServicePort": 443}


def cilium_values(api_server_host: str, values_file: Path = CILIUM_VALUES_FILE) -> dict:
    return merge(load_documents(values_file)[0], cluster_values(api_server_host))
