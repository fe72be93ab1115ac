"""The Cilium values: one file, merged with what depends on the cluster, with no key the chart lacks."""

import subprocess

import pytest
import yaml
from cilium_mesh.manifests import CILIUM_DATAPATH_FILES, CILIUM_VALUES_FILE, DATAPATHS
from cilium_mesh.values import cilium_values, merge
from checks.cilium_chart import API_SERVER, CLUSTER_NAME, check, dead_keys, key_paths, render, supported_charts
from checks.fixtures import cilium_chart
from checks.kubectl_layer import layer_helm


def test_merge_keeps_base_and_overrides_leaves():
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]}) == {"a": {"b": 1, "c": 3}, "d": [2]}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_values_are_the_shared_file_then_the_datapaths_then_the_clusters(datapath):
    shared = yaml.safe_load(CILIUM_VALUES_FILE.read_text())
    own = yaml.safe_load(CILIUM_DATAPATH_FILES[datapath].read_text())
    values = cilium_values("example.eks.amazonaws.com", datapath, "demo")
    assert values == merge(merge(shared, own), {k: values[k] for k in values.keys() - shared.keys() - own.keys()})
    assert values["k8sServiceHost"] == "example.eks.amazonaws.com"
    assert ("cluster" in values) == (datapath == "eni")


def test_datapath_files_set_different_keys_from_the_shared_file():
    """Each key lives in one file: a datapath file never overrides the shared one."""
    shared = set(key_paths(yaml.safe_load(CILIUM_VALUES_FILE.read_text())))
    for path in CILIUM_DATAPATH_FILES.values():
        assert shared.isdisjoint(key_paths(yaml.safe_load(path.read_text()))), path.name


def test_eni_sets_no_chaining_key_and_no_masquerade_interfaces():
    values = cilium_values(API_SERVER, "eni", CLUSTER_NAME)
    assert "cni" not in values and "egressMasqueradeInterfaces" not in values
    assert values["eni"] == {"enabled": True} and values["ipam"] == {"mode": "eni"}
    assert values["cluster"] == {"name": CLUSTER_NAME}


def test_cilium_1_18_needs_ipam_mode_eni_set_explicitly():
    """Why datapath-eni.yaml sets ipam.mode: 1.18.12 does not derive it from eni.enabled (1.19 does)."""
    values = cilium_values(API_SERVER, "eni", CLUSTER_NAME)
    del values["ipam"]
    rendered = render(cilium_chart("1.18.12"), layer_helm(), values)
    config = next(d for d in yaml.safe_load_all(rendered.stdout) if d and d["metadata"]["name"] == "cilium-config")
    assert config["data"]["ipam"] == "cluster-pool"


def test_dead_key_detection():
    chart = {"hubble": {"relay": {"enabled": False}}, "ingressController": {"service": {"annotations": {}}}}
    ours = {
        "hubble": {"relay": {"enabled": True}, "relayy": {"enabled": True}},
        "ingressController": {"service": {"annotations": {"any/annotation": "x"}}},
        "hostLegacyRouting": False,
    }
    assert dead_keys(ours, chart) == ["hubble.relayy.enabled", "hostLegacyRouting"]


def test_helm_from_the_kubectl_layer_runs():
    result = subprocess.run([layer_helm(), "version", "--short"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("v4.")


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("chart", supported_charts(), ids=lambda c: c.name)
def test_values_render_on_the_real_chart_with_no_dead_key(chart, datapath):
    """1.18.12, 1.19.6 and 1.20.0 as published, rendered by the kubectl layer's helm, for both datapaths."""
    assert check(chart, layer_helm(), datapath) == []


def test_a_cluster_name_the_chart_rejects_fails_the_render():
    """The chart's own rule, which the config's cluster_name check for eni mirrors."""
    values = cilium_values(API_SERVER, "eni", "Cilium_Mesh")
    assert "The cluster name is invalid" in render(cilium_chart("1.19.6"), layer_helm(), values).stderr
