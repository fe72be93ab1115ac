"""Check manifests/cilium/ against a real Cilium chart, for each datapath: no dead keys, and it renders as meant.

    python -m checks.cilium_chart                 # 1.18.12, 1.19.6, 1.20.0 (fixtures or helm.cilium.io)
    python -m checks.cilium_chart path/to/cilium-1.19.6.tgz [...more charts]

Every key path we set must exist in the chart's own values.yaml (below a map
the chart leaves open, such as annotations, anything goes), and `helm template`
must render the chart with our values plus the cluster-dependent ones, using
the very helm binary the kubectl provider runs in AWS (from the kubectl layer
package). Charts come from https://helm.cilium.io/ (or github.com/cilium/charts);
none is committed here.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

import yaml

from cilium_mesh.manifests import DATAPATHS, load_documents, parse_documents
from cilium_mesh.metrics_files import METRICS_PORTS, SCRAPE_CONFIG_FILE
from cilium_mesh.values import cilium_values
from cilium_mesh.versions import CILIUM_RELEASES
from checks.fixtures import cilium_chart
from stacks.network import NODE_CIDR, NODE_SUBNET_TAG
from checks.kubectl_layer import helm_template, layer_helm

API_SERVER = "ABCDEF0123456789.gr7.us-west-2.eks.amazonaws.com"
CLUSTER_NAME = "cilium-mesh"

# What each datapath must turn into in the rendered cilium-config (None: the key is absent).
EXPECTED_CONFIG = {
    "both": {
        "routing-mode": "native",
        "envoy-http-upstream-linger-timeout": "0",
        "enable-envoy-config": "true",
        "enable-ingress-controller": "true",
        "ingress-default-lb-mode": "shared",
        "kube-proxy-replacement": "true",
        # The metrics ports the collector's security group opens (constructs/cilium_mesh/metrics.py).
        "prometheus-serve-addr": ":9962",
        "operator-prometheus-serve-addr": ":9963",
        "hubble-metrics-server": ":9965",
        "hubble-metrics-server-enable-tls": "false",
    },
    "chaining": {
        "cni-chaining-mode": "aws-cni",
        "ipam": "cluster-pool",
        "cluster-pool-ipv4-cidr": "100.65.0.0/16",
        # Only Cilium's own pool is masqueraded (iptables): the native routing CIDR is that pool.
        "enable-ipv4-masquerade": "true",
        "enable-bpf-masquerade": "false",
        "ipv4-native-routing-cidr": "100.65.0.0/16",
    },
    "eni": {
        "ipam": "eni",
        "enable-endpoint-routes": "true",
        "cluster-name": CLUSTER_NAME,
        "enable-ipv4-masquerade": "false",
        "cni-chaining-mode": None,
        "egress-masquerade-interfaces": None,
    },
}
# What a Cilium minor must turn into besides (release-<minor>.yaml).
EXPECTED_RELEASE_CONFIG = {"1.20": {"envoy-xds-mode": "split"}}
# Datapath eni with its default, encryption wireguard with strict mode over the node subnets: the agent's
# flags of 1.18 (encryption.strictMode.*) and of 1.19 and 1.20 (encryption.strictMode.egress.*).
STRICT_MODE_CIDR = NODE_CIDR
_WIREGUARD = {"enable-wireguard": "true", "subnet-tags-filter": "=".join(NODE_SUBNET_TAG), "enable-node-encryption": None}
EXPECTED_ENCRYPTION_CONFIG = {
    "1.18": {**_WIREGUARD, "enable-encryption-strict-mode": "true", "encryption-strict-mode-cidr": STRICT_MODE_CIDR,
             "encryption-strict-mode-allow-remote-node-identities": "true", "enable-encryption-strict-mode-egress": None},
    "1.19": {**_WIREGUARD, "enable-encryption-strict-mode-egress": "true", "encryption-strict-egress-cidr": STRICT_MODE_CIDR,
             "encryption-strict-egress-allow-remote-node-identities": "true", "enable-encryption-strict-mode": None},
}  # fmt: skip
EXPECTED_ENCRYPTION_CONFIG["1.20"] = EXPECTED_ENCRYPTION_CONFIG["1.19"]


def datapath_values(datapath: str, version: str) -> dict:
    """The values the stack hands helm for a datapath with its default encryption (eni: wireguard)."""
    encryption = "wireguard" if datapath == "eni" else "none"
    return cilium_values(API_SERVER, datapath, CLUSTER_NAME, version, encryption=encryption, strict_mode_cidr=STRICT_MODE_CIDR)


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


@functools.cache
def chart_values(chart: Path) -> dict:
    with tarfile.open(chart) as archive:
        (values,) = parse_documents(archive.extractfile("cilium/values.yaml"))
        return values


def chart_version(chart: Path) -> str:
    with tarfile.open(chart) as archive:
        return yaml.safe_load(archive.extractfile("cilium/Chart.yaml"))["version"]


_RENDERS: dict[tuple, Future] = {}
_RENDERS_LOCK = threading.Lock()


def render(chart: Path, helm: Path, values: dict, kubernetes_version: str = "1.35.0") -> subprocess.CompletedProcess:
    """``helm template`` of the chart with these values, once per process for the same inputs (a render
    takes seconds; threads asking for the same one wait for it)."""
    key = (str(chart), str(helm), json.dumps(values, sort_keys=True), kubernetes_version)
    with _RENDERS_LOCK:
        future, first = _RENDERS.get(key), key not in _RENDERS
        if first:
            future = _RENDERS[key] = Future()
    if first:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump(values, file)
            file.flush()
            future.set_result(helm_template(helm, "cilium", chart, "kube-system", file.name, kubernetes_version))
    return future.result()


def check(chart: Path, helm: Path, datapath: str) -> list[str]:
    """Problems found for one chart and datapath (empty when it is fine)."""
    name = f"{chart.name} ({datapath})"
    version = chart_version(chart)
    values = datapath_values(datapath, version)
    problems = [f"{name}: {path} is not in the chart's values.yaml" for path in dead_keys(values, chart_values(chart))]
    result = render(chart, helm, values)
    if result.returncode != 0:
        return [*problems, f"{name}: helm template failed: {result.stderr.strip()[-500:]}"]
    documents = parse_documents(result.stdout)
    config = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cilium-config")["data"]
    minor = ".".join(version.split(".")[:2])
    expected = {**EXPECTED_CONFIG["both"], **EXPECTED_CONFIG[datapath], **EXPECTED_RELEASE_CONFIG.get(minor, {}),
                **(EXPECTED_ENCRYPTION_CONFIG[minor] if datapath == "eni" else {"enable-wireguard": None})}  # fmt: skip
    problems += [
        f"{name}: cilium-config {key}={config.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if config.get(key) != value
    ]
    problems += scrape_problems(name, documents, values)
    workloads = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in documents if d["kind"] in ("DaemonSet", "Deployment")}
    if workloads["cilium-envoy"].get("dnsPolicy") != "ClusterFirstWithHostNet":
        problems.append(f"{name}: cilium-envoy does not use cluster DNS (its failover clusters resolve Service names)")
    if datapath == "eni" and not workloads["cilium-operator"].get("hostNetwork"):
        problems.append(f"{name}: cilium-operator is not on the host network (it reads IMDS, hop limit 1)")
    return problems


def _meta_label(key: str) -> str:
    """A pod label as Prometheus' Kubernetes discovery names it (`io.cilium/app` -> io_cilium_app)."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def scrape_problems(name: str, documents: list[dict], values: dict) -> list[str]:
    """Each scrape job of manifests/metrics/prometheus/scrape-config.yaml keeps a container port the
    rendered chart declares, on pods with the job's label, within the ports the collector may reach;
    and Hubble serves the metrics the values enable."""
    (scrape_config,) = load_documents(SCRAPE_CONFIG_FILE)
    pods = [d["spec"]["template"] for d in documents if d["kind"] in ("DaemonSet", "Deployment")]
    problems = []
    for job in scrape_config["scrape_configs"]:
        (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        label, port_name = keep["regex"].split(";")
        ports = [
            port["containerPort"]
            for pod in pods
            if any(_meta_label(k) == keep["source_labels"][0] and v == label for k, v in pod["metadata"]["labels"].items())
            for container in pod["spec"]["containers"]
            for port in container.get("ports", [])
            if port.get("name") == port_name
        ]
        if not ports:
            problems.append(f"{name}: scrape job {job['job_name']}: no pod labelled {label} has a port named {port_name}")
        problems += [
            f"{name}: scrape job {job['job_name']}: port {port} is outside {METRICS_PORTS[0]}-{METRICS_PORTS[1]}"
            for port in ports
            if not METRICS_PORTS[0] <= port <= METRICS_PORTS[1]
        ]
    config = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cilium-config")["data"]
    if config.get("hubble-metrics", "").split() != values["hubble"]["metrics"]["enabled"]:
        problems.append(f"{name}: cilium-config hubble-metrics={config.get('hubble-metrics')!r}, not the values' list")
    return problems


def supported_charts() -> list[Path]:
    """The newest patch of every supported Cilium minor: ../shared/fixtures/cilium-charts or helm.cilium.io."""
    return [cilium_chart(f"{minor}.{patch}") for minor, patch in CILIUM_RELEASES.items()]


def main(argv: list[str]) -> int:
    helm = layer_helm()
    failures = 0
    for chart in map(Path, argv) if argv else supported_charts():
        for datapath in DATAPATHS:
            problems = check(chart, helm, datapath)
            failures += bool(problems)
            print(f"{chart.name} ({datapath}): {'OK' if not problems else 'FAILED'}")
            for problem in problems:
                print(f"  {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
