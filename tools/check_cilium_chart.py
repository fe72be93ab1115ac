"""Check manifests/cilium/values.yaml against a real Cilium chart: no dead keys, and it renders.

    python -m tools.check_cilium_chart path/to/cilium-1.19.6.tgz [...more charts]

Every key path we set must exist in the chart's own values.yaml (below a map
the chart leaves open, such as annotations, anything goes), and `helm template`
must render the chart with our values plus the cluster-dependent ones, using
the very helm binary the kubectl provider runs in AWS (from the kubectl layer
package). Charts come from https://helm.cilium.io/ (or github.com/cilium/charts);
none is committed here.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

from cilium_mesh.values import cilium_values
from tools.kubectl_layer import layer_helm

API_SERVER = "ABCDEF0123456789.gr7.us-west-2.eks.amazonaws.com"


def key_paths(values: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths.extend(key_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


def dead_keys(ours: dict, chart_defaults: dict) -> list[str]:
    dead = []
    for path in key_paths(ours):
        node = chart_defaults
        for part in path.split("."):
            if isinstance(node, dict) and not node and node is not chart_defaults:
                break  # an open map in the chart, e.g. annotations: {}
            if not isinstance(node, dict) or part not in node:
                dead.append(path)
                break
            node = node[part]
    return dead


def chart_values(chart: Path) -> dict:
    with tarfile.open(chart) as archive:
        return yaml.safe_load(archive.extractfile("cilium/values.yaml"))


def check(chart: Path, helm: Path, kubernetes_version: str = "1.35.0") -> list[str]:
    """Problems found for one chart (empty when it is fine)."""
    problems = []
    for kube_proxy_replacement in (True, False):
        values = cilium_values(kube_proxy_replacement, API_SERVER)
        problems += [f"{chart.name}: {path} is not in the chart's values.yaml" for path in dead_keys(values, chart_values(chart))]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump(values, file)
            file.flush()
            result = subprocess.run(
                [str(helm), "template", "cilium", str(chart), "-n", "kube-system", "-f", file.name,
                 "--kube-version", kubernetes_version],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            problems.append(f"{chart.name}: helm template failed: {result.stderr.strip()[-500:]}")
            continue
        config = next(
            d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cilium-config"
        )["data"]
        expected = {
            "cni-chaining-mode": "aws-cni",
            "routing-mode": "native",
            "enable-ipv4-masquerade": "false",
            "enable-envoy-config": "true",
            "enable-ingress-controller": "true",
            "ingress-default-lb-mode": "shared",
            "kube-proxy-replacement": str(kube_proxy_replacement).lower(),
        }
        problems += [
            f"{chart.name}: cilium-config {key}={config.get(key)!r}, expected {value!r}"
            for key, value in expected.items()
            if config.get(key) != value
        ]
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    helm = layer_helm()
    failures = 0
    for chart in map(Path, argv):
        problems = check(chart, helm)
        failures += bool(problems)
        print(f"{chart.name}: {'OK' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
