"""The Cilium values: one file, merged with what depends on the cluster, with no key the chart lacks."""

import subprocess

import pytest
import yaml
from cilium_mesh.manifests import CILIUM_VALUES_FILE
from cilium_mesh.values import cilium_values, merge
from tools.check_cilium_chart import check, dead_keys, supported_charts
from tools.kubectl_layer import layer_helm



def test_merge_keeps_base_and_overrides_leaves():
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]}) == {"a": {"b": 1, "c": 3}, "d": [2]}


def test_values_file_is_the_base_and_cluster_values_are_added():
    base = yaml.safe_load(CILIUM_VALUES_FILE.read_text())
    values = cilium_values("example.eks.amazonaws.com")
    assert {k: v for k, v in values.items() if k in base} == base
    assert values["k8sServiceHost"] == "example.eks.amazonaws.com"


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


@pytest.mark.parametrize("chart", supported_charts(), ids=lambda c: c.name)
def test_values_render_on_the_real_chart_with_no_dead_key(chart):
    """1.18.12, 1.19.6 and 1.20.0 as published, rendered by the kubectl layer's helm."""
    assert check(chart, layer_helm()) == []
