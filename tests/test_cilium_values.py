"""The Cilium values: one file, merged with what depends on the cluster, with no key the chart lacks."""

import copy
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from cilium_mesh.manifests import (
    CILIUM_DATAPATH_FILES,
    CILIUM_EXISTING_CLUSTER_FILE,
    CILIUM_STRICT_MODE_DEFAULT_FILE,
    CILIUM_STRICT_MODE_FILES,
    CILIUM_VALUES_FILE,
    CILIUM_WIREGUARD_FILE,
    DATAPATHS,
    cilium_release_file,
    parse_documents,
)
from cilium_mesh.values import cilium_values, merge
from checks.cilium_chart import API_SERVER, CLUSTER_NAME, chart_values, check, dead_keys, key_paths, render, supported_charts
from checks.fixtures import cilium_chart
from checks.kubectl_layer import layer_helm


def test_merge_keeps_base_and_overrides_leaves():
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]}) == {"a": {"b": 1, "c": 3}, "d": [2]}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_values_are_the_shared_file_then_the_datapaths_then_the_clusters(datapath):
    shared = yaml.safe_load(CILIUM_VALUES_FILE.read_text())
    own = yaml.safe_load(CILIUM_DATAPATH_FILES[datapath].read_text())
    values = cilium_values("example.eks.amazonaws.com", datapath, "demo", "1.19.6")
    assert values == merge(merge(shared, own), {k: values[k] for k in values.keys() - shared.keys() - own.keys()})
    assert values["k8sServiceHost"] == "example.eks.amazonaws.com"
    assert ("cluster" in values) == (datapath == "eni")


def test_datapath_files_set_different_keys_from_the_shared_file():
    """Each key lives in one file: a datapath file never overrides the shared one."""
    shared = set(key_paths(yaml.safe_load(CILIUM_VALUES_FILE.read_text())))
    for path in [*CILIUM_DATAPATH_FILES.values(), *CILIUM_VALUES_FILE.parent.glob("release-*.yaml"), CILIUM_EXISTING_CLUSTER_FILE,
                 CILIUM_WIREGUARD_FILE, *CILIUM_VALUES_FILE.parent.glob("strict-mode-*.yaml")]:  # fmt: skip
        assert shared.isdisjoint(key_paths(yaml.safe_load(path.read_text()))), path.name


def test_eni_sets_no_chaining_key_and_no_masquerade_interfaces():
    values = cilium_values(API_SERVER, "eni", CLUSTER_NAME, "1.18.12")
    assert "cni" not in values and "egressMasqueradeInterfaces" not in values
    assert values["eni"] == {"enabled": True} and values["ipam"] == {"mode": "eni"}
    assert values["cluster"] == {"name": CLUSTER_NAME}


def _without_ipam_mode() -> dict:
    values = cilium_values(API_SERVER, "eni", CLUSTER_NAME, "1.18.12")
    del values["ipam"]
    return values


def test_cilium_1_18_needs_ipam_mode_eni_set_explicitly(chart_renders):
    """Why datapath-eni.yaml sets ipam.mode: 1.18.12 does not derive it from eni.enabled (1.19 does)."""
    assert _rendered_config(cilium_chart("1.18.12"), _without_ipam_mode())["ipam"] == "cluster-pool"


def test_dead_key_detection():
    chart = {"hubble": {"relay": {"enabled": False}}, "ingressController": {"service": {"annotations": {}}}}
    ours = {
        "hubble": {"relay": {"enabled": True}, "relayy": {"enabled": True}},
        "ingressController": {"service": {"annotations": {"any/annotation": "x"}}},
        "hostLegacyRouting": False,
    }
    assert dead_keys(ours, chart) == ["hubble.relayy.enabled", "hostLegacyRouting"]


@pytest.mark.helm
def test_helm_from_the_kubectl_layer_runs():
    result = subprocess.run([layer_helm(), "version", "--short"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("v4.")


def _other_renders() -> list[tuple[str, dict]]:
    renders = [("1.18.12", _without_ipam_mode()), ("1.19.6", _bad_cluster_name()), ("1.20.0", _without_xds_mode())]
    return renders + [(version, values) for version in ("1.18.12", "1.19.6", "1.20.0") for values in _linger_variants(version)[1:]]


@pytest.fixture(scope="module")
def chart_renders() -> dict:
    """check() of every supported chart and datapath (chart and datapath -> problems), and every other
    render this module asserts on, two helm processes at a time (render() keeps each for the tests)."""
    helm = layer_helm()
    cases = [(chart, datapath) for chart in supported_charts() for datapath in DATAPATHS]
    others = [(cilium_chart(version), values) for version, values in _other_renders()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        checks = pool.map(lambda case: check(case[0], helm, case[1]), cases)
        list(pool.map(lambda other: render(other[0], helm, other[1]), others))
        return dict(zip(cases, checks))


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("chart", supported_charts(), ids=lambda c: c.name)
def test_values_render_on_the_real_chart_with_no_dead_key(chart_renders, chart, datapath):
    """1.18.12, 1.19.6 and 1.20.0 as published, rendered by the kubectl layer's helm, for both datapaths."""
    assert chart_renders[chart, datapath] == []


def _bad_cluster_name() -> dict:
    return cilium_values(API_SERVER, "eni", "Cilium_Mesh", "1.19.6")


def test_a_cluster_name_the_chart_rejects_fails_the_render(chart_renders):
    """The chart's own rule, which the config's cluster_name check for eni mirrors."""
    assert "The cluster name is invalid" in render(cilium_chart("1.19.6"), layer_helm(), _bad_cluster_name()).stderr


def _rendered_config(chart, values) -> dict:
    rendered = render(chart, layer_helm(), values)
    return next(d for d in parse_documents(rendered.stdout) if d["metadata"]["name"] == "cilium-config")["data"]


def _without_xds_mode() -> dict:
    values = cilium_values(API_SERVER, "eni", CLUSTER_NAME, "1.20.0")
    del values["envoy"]["xdsMode"]
    return values


def test_cilium_1_20_needs_xds_mode_split_from_its_release_file(chart_renders):
    """Why release-1.20.yaml exists: 1.20.0 renders ADS for a new install (cilium/cilium#47624), and
    the key is one the older charts lack, so it cannot live in values.yaml."""
    release = cilium_release_file("1.20.0")
    values = cilium_values(API_SERVER, "eni", CLUSTER_NAME, "1.20.0")
    assert _rendered_config(cilium_chart("1.20.0"), values)["envoy-xds-mode"] == "split"
    assert _rendered_config(cilium_chart("1.20.0"), _without_xds_mode())["envoy-xds-mode"] == "ads"
    own = yaml.safe_load(release.read_text())
    for version in ("1.18.12", "1.19.6"):
        assert cilium_release_file(version) is None
        assert dead_keys(own, chart_values(cilium_chart(version))) == ["envoy.xdsMode"]


def _linger_variants(version: str) -> tuple[dict, dict, dict]:
    """Ours; without extraConfig; and with the chart's own key set to 0 instead."""
    ours = cilium_values(API_SERVER, "eni", CLUSTER_NAME, version)
    without = copy.deepcopy(ours)
    del without["extraConfig"]
    chart_key = copy.deepcopy(without)
    chart_key["envoy"]["httpUpstreamLingerTimeout"] = 0
    return ours, without, chart_key


def test_linger_timeout_zero_needs_extra_config(chart_renders):
    """The chart's own key cannot say 0 before Cilium 1.20.1 (cilium/cilium#47741): its schema takes only
    null, and its template drops 0. So the agent flag goes through extraConfig, on every supported chart."""
    for version in ("1.18.12", "1.19.6", "1.20.0"):
        ours, without, chart_key = _linger_variants(version)
        assert _rendered_config(cilium_chart(version), ours)["envoy-http-upstream-linger-timeout"] == "0"
        assert "envoy-http-upstream-linger-timeout" not in _rendered_config(cilium_chart(version), without)
        assert "want null" in render(cilium_chart(version), layer_helm(), chart_key).stderr


def test_strict_mode_has_a_file_per_key_generation_and_neither_works_on_the_other_side():
    """1.18 has only encryption.strictMode.{enabled,cidr,...}; 1.19 adds .egress.* and deprecates the flat
    keys; 1.20 has only .egress.*: so 1.18 gets the flat file, 1.19 and 1.20 the egress one, and each is
    dead where it is not used (both on 1.19 would render the agent's flags twice)."""
    flat, egress = yaml.safe_load(CILIUM_STRICT_MODE_FILES["1.18"].read_text()), yaml.safe_load(CILIUM_STRICT_MODE_DEFAULT_FILE.read_text())
    assert dead_keys(flat, chart_values(cilium_chart("1.18.12"))) == [] and dead_keys(flat, chart_values(cilium_chart("1.20.0")))
    assert dead_keys(egress, chart_values(cilium_chart("1.18.12"))) and dead_keys(egress, chart_values(cilium_chart("1.20.0"))) == []
    assert dead_keys(egress, chart_values(cilium_chart("1.19.6"))) == []
    for version, key in (("1.18.12", ("encryption", "strictMode", "cidr")), ("1.19.6", ("encryption", "strictMode", "egress", "cidr"))):
        values = cilium_values(API_SERVER, "eni", CLUSTER_NAME, version, encryption="wireguard", strict_mode_cidr="10.0.128.0/17")
        node = values
        for part in key:
            node = node[part]
        assert node == "10.0.128.0/17"
    assert "strictMode" not in cilium_values(API_SERVER, "eni", CLUSTER_NAME, "1.19.6", encryption="wireguard")["encryption"]
    assert "encryption" not in cilium_values(API_SERVER, "eni", CLUSTER_NAME, "1.19.6")
