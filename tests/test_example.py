"""examples/two-services: another CDK app that installs this repository's library (its wheel, as pip
would) and meshes two services of its own on its own cluster, without the sample app."""

import importlib.util
import json
import subprocess
import sys
import zipfile

import pytest
from cilium_mesh.declaration import services
from cilium_mesh.rollout_plan import RESOURCE_TYPE
from conftest import ROOT, TWO_SERVICES

EXAMPLE = ROOT / "examples" / "two-services"


def example_module():
    spec = importlib.util.spec_from_file_location("two_services_app", EXAMPLE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_declares_in_python_what_cdk_json_declares_as_json():
    """One model, two ways in: the example's dataclasses equal the same services read from JSON."""
    assert example_module().SERVICES == services(TWO_SERVICES)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The library's wheel, built from pyproject.toml offline (hatchling from the venv) and unpacked as pip
    installs it: the example then imports cilium_mesh from there, not from this checkout."""
    wheels = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("cilium_mesh_eks-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


@pytest.mark.slow
def test_the_wheel_carries_the_library_and_its_manifests(installed):
    package = installed / "cilium_mesh"
    assert (package / "traffic.py").is_file() and (package / "manifests" / "smoke" / "smoke_test.py").is_file()
    assert (package / "manifests" / "metrics").is_dir() and not (installed / "stacks").exists()


@pytest.mark.slow
def test_the_example_synthesizes_with_the_installed_library(installed, tmp_path):
    """`cdk synth` of the example as its own app would run it: only the wheel's cilium_mesh on the path."""
    env = {"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(installed), "CDK_OUTDIR": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", "import cilium_mesh.manifests as m; print(m.__file__, m.MANIFESTS_DIR)"],
                           cwd=EXAMPLE, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    module_file, manifests = where.stdout.split()
    assert module_file.startswith(str(installed)) and manifests.startswith(str(installed)), where.stdout
    result = subprocess.run([sys.executable, "app.py"], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    template = json.loads((tmp_path / "Shop.template.json").read_text())
    rollouts = [r["Properties"] for r in template["Resources"].values() if r["Type"] == RESOURCE_TYPE]
    policies = {json.loads(r["Policy"])["name"]: r for r in rollouts}
    assert sorted(policies) == ["inventory", "payments"]
    assert "Rollout" in policies["inventory"] and "Load" in policies["inventory"] and "Rollout" not in policies["payments"]
    applied = [d for r in template["Resources"].values() if r["Type"] == "Custom::AWSCDK-EKS-KubernetesResource"
               for d in json.loads(r["Properties"]["Manifest"]) if isinstance(r["Properties"]["Manifest"], str)]  # fmt: skip
    names = {(d["kind"], d["metadata"]["name"]) for d in applied}
    assert {("Service", f"payments{v}") for v in ("v1", "v2", "v3")} <= names
    assert ("CiliumNetworkPolicy", "mesh-inventory-default-deny") in names
    assert not {n for k, n in names if k == "Deployment"}, "the sample app is not applied"


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_every_path_of_the_examples_services_delivers_and_every_refusal_holds(datapath):
    """The datapath model of the example's services (no sample app): every caller's, the smoke test's and
    the load's requests through each route, cluster and priority deliver; the outsider and (eni) a
    method outside the callers' rules are refused."""
    from checks.datapath import Deployed, evaluate_all, must_deny

    deployed = Deployed.of(datapath, example_module().SERVICES, sample_app=False)
    outcomes = evaluate_all(deployed)
    assert outcomes and [o for o in outcomes if o.status != "delivered"] == []
    refusals = evaluate_all(deployed, must_deny(deployed))
    assert refusals and [o for o in refusals if o.status == "delivered"] == []
    for name in ("payments", "inventory"):
        assert len([o for o in outcomes if name in o.hop.name]) >= 20, name


@pytest.mark.envoy
def test_the_examples_cilium_envoy_configs_run_in_cilium_envoys_envoy():
    """Each service's exact resources in the Envoy limited to cilium-envoy's extensions: every route, the
    split, the mirror and the failover deliver where the declaration says (check_services_in_envoy
    raises naming any that does not)."""
    from checks.cilium_envoy import build_for
    from checks.envoy_harness import check_services_in_envoy
    from conftest import CONTEXT

    results = check_services_in_envoy(example_module().SERVICES, build_for(CONTEXT["cilium_version"]).tag, datapath="chaining")
    assert sorted(results) == ["shop/inventory", "shop/payments"]
    assert all(results.values())
