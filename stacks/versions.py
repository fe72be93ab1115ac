"""Supported EKS Kubernetes versions: the one table mapping each to its kubectl layer.

Kept as data so a retired release fails synth with a message, instead of a
deploy that EKS or helm.cilium.io rejects an hour later.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class KubernetesRelease:
    """An EKS Kubernetes minor version and the kubectl layer package that matches it."""

    version: str
    layer_module: str
    layer_class: str


KUBERNETES_RELEASES: dict[str, KubernetesRelease] = {
    release.version: release
    for release in (
        KubernetesRelease("1.32", "aws_cdk.lambda_layer_kubectl_v32", "KubectlV32Layer"),
        KubernetesRelease("1.33", "aws_cdk.lambda_layer_kubectl_v33", "KubectlV33Layer"),
        KubernetesRelease("1.34", "aws_cdk.lambda_layer_kubectl_v34", "KubectlV34Layer"),
        KubernetesRelease("1.35", "aws_cdk.lambda_layer_kubectl_v35", "KubectlV35Layer"),
        KubernetesRelease("1.36", "aws_cdk.lambda_layer_kubectl_v36", "KubectlV36Layer"),
    )
}

# Versions EKS no longer creates clusters for, with the day extended support ended.
# 1.31 ends on 2026-11-26: a new cluster would be force-upgraded within days.
RETIRED_KUBERNETES: dict[str, str] = {
    "1.23": "2025-07-26",
    "1.24": "2025-01-31",
    "1.25": "2025-05-01",
    "1.26": "2025-06-11",
    "1.27": "2025-07-24",
    "1.28": "2025-11-26",
    "1.29": "2026-03-23",
    "1.30": "2026-07-23",
    "1.31": "2026-11-26",
}
