"""Shared fixtures: the app is synthesized once per session and configuration, with cdk-nag attached;
the tiers (fast, and the slow tools' markers); and the two runs that mostly wait."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aws_cdk as cdk  # noqa: E402
from stacks import cdk_json_context  # noqa: E402  (also puts constructs/ on the import path)
from aws_cdk import Validations  # noqa: E402
from aws_cdk.assertions import Template  # noqa: E402
from cdk_nag import AwsSolutionsChecks  # noqa: E402
from stacks.cilium_eks_stack import CiliumEksStack  # noqa: E402
from stacks.config import load_config  # noqa: E402
from cilium_mesh.traffic import MeshService  # noqa: E402
from checks.deploy_graph import logical_id  # noqa: E402
from checks.template import TOKEN, manifest_documents, resolve_join  # noqa: E402, F401  (the tests import them from here)
from checks.provider_dry_run import dry_run  # noqa: E402
from checks.rollout_harness import SUITE_SCENARIOS as ROLLOUT_SCENARIOS  # noqa: E402

CONTEXT = cdk_json_context()
STACK_NAME = "CiliumMeshEks"
# The chaining synth's rollout setting (the eni synth keeps cdk.json's: none, weights at once).
ROLLOUT = {"steps": [10, 50, 100], "pause_s": 300, "max_error_ratio": 0.05, "max_p99_ms": 500, "min_request_rate": 0.5}


@dataclass
class Synth:
    stack: CiliumEksStack
    template: dict
    assertions: Template
    outdir: Path
    nag_report: dict

    def resources(self, type_: str) -> dict[str, dict]:
        return {k: r for k, r in self.template["Resources"].items() if r["Type"] == type_}

    def logical_id(self, construct) -> str:
        return logical_id(self.stack, construct)

    def resource(self, construct) -> dict:
        return self.template["Resources"][self.logical_id(construct)]


def synthesize(outdir: Path, **overrides) -> Synth:
    """The app with these context overrides, cdk-nag attached."""
    app = cdk.App(context={**CONTEXT, **overrides}, outdir=str(outdir))
    stack = CiliumEksStack(app, STACK_NAME, config=load_config(app.node.get_all_context()))
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    try:
        app.synth()
    except RuntimeError as error:
        if "ValidationFailed" not in str(error):
            raise
    template = json.loads((outdir / f"{STACK_NAME}.template.json").read_text())
    report = json.loads((outdir / "validation-report.json").read_text())
    return Synth(stack, template, Template.from_json(template), outdir, report)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Synth:
    """Datapath chaining: Cilium on the VPC CNI (the walkthrough's); alerts also by e-mail; weights rolled out."""
    return synthesize(tmp_path_factory.mktemp("cdk.out"), datapath="chaining", alert_email="oncall@example.com", rollout=ROLLOUT)


# examples/two-services/app.py's services as cdk.json declares them (test_example.py: the same model).
TWO_SERVICES = [
    {
        "name": "payments", "namespace": "shop", "port": 80, "target_port": 8080,
        "versions": {v: {"app": "payments", "version": v} for v in ("v1", "v2", "v3")},
        "weights": {"v1": 80, "v2": 20},
        "routes": [{"headers": {"x-beta": "true"}, "to": "v3"}, {"path_prefix": "/admin", "to": "v1"}],
        "mirror": {"version": "v3", "percent": 5},
        "callers": [{"namespace": "storefront", "labels": {"app": "checkout"}}],
        "check_path": "/healthz",
    },
    {
        "name": "inventory", "namespace": "shop", "port": 8080,
        "versions": {"stable": {"app": "inventory", "track": "stable"}, "canary": {"app": "inventory", "track": "canary"}},
        "weights": {"stable": 90, "canary": 10},
        "failover": ["stable", "canary"],
        "rollout": {"steps": [25, 100], "pause_s": 300, "load": {"rate_per_s": 2, "path": "/healthz"}},
        "callers": [{"labels": {"app": "payments"}}],
        "namespace_default_deny": True,
        "check_path": "/healthz",
    },
]  # fmt: skip


@pytest.fixture(scope="session")
def synth_services(tmp_path_factory) -> Synth:
    """The sample off, two services of the user's own (eni, so with L7 rules), one rolled out with a load."""
    return synthesize(tmp_path_factory.mktemp("cdk.out.services"), sample_app=False, traffic_weights=None, services=TWO_SERVICES)


@pytest.fixture(scope="session")
def synth_eni(tmp_path_factory) -> Synth:
    """Datapath eni: Cilium as the only CNI (the default in cdk.json)."""
    return synthesize(tmp_path_factory.mktemp("cdk.out.eni"), datapath="eni")


@pytest.fixture(scope="session")
def synth_variant(tmp_path_factory) -> Synth:
    """The other side of every switch: no network policy, an admin principal, 90/10, no metrics or smoke test."""
    return synthesize(
        tmp_path_factory.mktemp("cdk.out.variant"),
        network_policy=False,
        admin_principal_arn="arn:aws:iam::123456789012:role/PlatformAdmin",
        traffic_weights={"v1": 90, "v2": 10},
        metrics=False,
        smoke_test=False,
    )


# The walkthrough's Terraform-made cluster, as `existing_cluster` names it (IDs in EC2's format, none real).
EXISTING_CLUSTER = {
    "name": "walkthrough",
    "kubernetes_version": "1.33",
    "endpoint": "https://0123456789ABCDEF0123456789ABCDEF.gr7.us-west-2.eks.amazonaws.com",
    "vpc_id": "vpc-0123456789abcdef0",
    "private_subnet_ids": ["subnet-0a1b2c3d4e5f60718", "subnet-0a1b2c3d4e5f60719", "subnet-0a1b2c3d4e5f6071a"],
    "cluster_security_group_id": "sg-0a1b2c3d4e5f60718",
    "endpoint_access": "public_and_private",
    "public_access_cidrs": ["0.0.0.0/0"],
    "authentication_mode": "API_AND_CONFIG_MAP",
    "vpc_cni_version": "v1.19.2-eksbuild.1",
}
NODE_SECURITY_GROUP = "sg-0a1b2c3d4e5f6071b"
PRIVATE_EXISTING_CLUSTER = {**{k: v for k, v in EXISTING_CLUSTER.items() if k != "public_access_cidrs"},
                            "endpoint_access": "private", "node_security_group_id": NODE_SECURITY_GROUP}  # fmt: skip


@pytest.fixture(scope="session")
def synth_existing(tmp_path_factory) -> Synth:
    """An existing cluster as terraform-aws-eks makes one, private access only (the provider in its subnets)
    and the nodes in their own security group, set with the one key (the datapath follows); weights rolled out."""
    return synthesize(tmp_path_factory.mktemp("cdk.out.existing"), existing_cluster=PRIVATE_EXISTING_CLUSTER, rollout=ROLLOUT)


@pytest.fixture(scope="session")
def synth_existing_public(tmp_path_factory) -> Synth:
    """An existing cluster with a public endpoint only (the provider outside the VPC)."""
    return synthesize(tmp_path_factory.mktemp("cdk.out.existing-public"), datapath="chaining",
                      existing_cluster={**EXISTING_CLUSTER, "endpoint_access": "public"})  # fmt: skip


@pytest.fixture(scope="session")
def provider_steps_existing(synth_existing):
    return dry_run(synth_existing.template, synth_existing.stack)


@pytest.fixture(scope="session")
def provider_steps(synth):
    """The provider dry run of the chaining stack, once per session (checks/provider_dry_run.py)."""
    return dry_run(synth.template, synth.stack)


@pytest.fixture(scope="session")
def provider_steps_eni(synth_eni):
    return dry_run(synth_eni.template, synth_eni.stack)


def synth_of(request, datapath: str) -> Synth:
    """The session's synth of a datapath, for tests parametrized over both."""
    return request.getfixturevalue("synth_eni" if datapath == "eni" else "synth")


def provider_steps_of(request, datapath: str):
    return request.getfixturevalue("provider_steps_eni" if datapath == "eni" else "provider_steps")


# --- tiers ---------------------------------------------------------------------------------------
# `-m fast` is the inner loop: every test that starts none of the slow tools below and is not marked
# slow (the few that take most of a second on their own: a synth of their own, a plot). A test that
# starts a tool carries the tool's marker, by hand or through a fixture in FIXTURE_TOOLS. In a run of the fast tier
# alone, starting one of those tools fails (in the test or the fixture that tried), so the tier cannot
# quietly grow slow.
TOOL_MARKERS = {
    "envoy": ("envoy",),
    "prometheus": ("prometheus", "promtool", "amtool"),
    "helm": ("helm",),
    "cdk_cli": ("cdk",),
    "cfn_lint": ("cfn-lint",),
}
FIXTURE_TOOLS = {
    "alert_observations": ("envoy", "prometheus"),
    "rollout_runs": ("envoy", "prometheus"),
    "preview_run": ("envoy", "prometheus"),
    "fault_runs": ("envoy",),
    "cli_synths": ("cdk_cli",),
    "chart_renders": ("helm",),
    # The provider dry run renders the real Cilium chart with the kubectl layer's helm (``helm template``).
    "provider_steps": ("helm",),
    "provider_steps_eni": ("helm",),
    "provider_steps_existing": ("helm",),
    "cfn_lint_run": ("cfn_lint",),
}


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        for tool in {t for name in getattr(item, "fixturenames", ()) for t in FIXTURE_TOOLS.get(name, ())}:
            item.add_marker(tool)
        if not any(item.get_closest_marker(marker) for marker in (*TOOL_MARKERS, "slow")):
            item.add_marker("fast")


_RUNNING: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING["test"] = item.nodeid
    yield


def refuse_slow_tools():
    """For a run of the fast tier alone: any start of a slow tool raises, naming the test and the marker.
    Returns what it replaced."""
    popen_init = subprocess.Popen.__init__

    def refusing(self, args, *rest, **options):
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]))
        for tool, programs in TOOL_MARKERS.items():
            if program.startswith(programs):
                raise AssertionError(f"{_RUNNING.get('test')} starts {program} in the fast tier: mark it (or its fixture) {tool}")
        popen_init(self, args, *rest, **options)

    subprocess.Popen.__init__ = refusing
    return popen_init


# --- runs that mostly wait ----------------------------------------------------------------------
# The local alert run (about 50 s, most of it the alerts' `for: 30s`), the rollout runs (about 90 s, most
# of it their pauses) and the preview's (about 9 s, most of it Prometheus' scrapes) start in their own
# processes once the tests are collected, if a selected test reads them, and those tests run last: the
# rest of the suite runs while they wait.
BACKGROUND_TIMEOUT_S = 300
# Requests per second per alert scenario: enough for every alert, half of tools.measure's, for the suite's CPU.
ALERT_RUN_RATE = 20
CDK_CLI = ROOT / "node_modules" / ".bin" / "cdk"
BACKGROUND = {
    "alert_observations": lambda d: ["-m", "checks.metrics_harness", "--json", str(d / "observations.json"), "--rate", str(ALERT_RUN_RATE)],
    "rollout_runs": lambda d: ["-m", "checks.rollout_harness", *ROLLOUT_SCENARIOS],
    "preview_run": lambda d: ["-m", "tools.preview", "--requests", "200", "--fault", "v2=empty", "--compare"],
}
_STARTED: dict[str, tuple[Path, subprocess.Popen]] = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """After -m and -k have deselected: start the background runs the selected tests read, and put their readers last."""
    if session.items and all(item.get_closest_marker("fast") for item in session.items):
        refuse_slow_tools()
    reading = [item for item in session.items if set(BACKGROUND) & set(getattr(item, "fixturenames", ()))]
    session.items[:] = [item for item in session.items if item not in reading] + reading
    for name in sorted({n for item in reading for n in item.fixturenames if n in BACKGROUND}):
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        # A process group of its own: stopping it stops the Envoys and Prometheus servers it started too.
        process = subprocess.Popen([sys.executable, *BACKGROUND[name](directory)], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        _STARTED[name] = (directory, process)


def pytest_unconfigure(config):
    """A session that ends early (-x, Ctrl-C, a failed reader) leaves nothing running behind it."""
    for _, process in _STARTED.values():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def _finished(name: str) -> tuple[Path, subprocess.CompletedProcess]:
    directory, process = _STARTED[name]
    stdout, stderr = process.communicate(timeout=BACKGROUND_TIMEOUT_S)
    return directory, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def alert_observations() -> dict:
    """Every scenario of checks/metrics_harness.py, as it wrote them."""
    directory, result = _finished("alert_observations")
    assert result.returncode == 0, f"checks.metrics_harness failed: {result.stderr[-3000:]}"
    return json.loads((directory / "observations.json").read_text())


@pytest.fixture(scope="session")
def rollout_runs() -> dict[str, dict]:
    """Each scenario of checks/rollout_harness.py (a rollout, then CloudFormation's rollback), as it ran."""
    _, result = _finished("rollout_runs")
    assert result.returncode == 0, f"checks.rollout_harness failed: {result.stderr[-3000:]}"
    return {run["name"]: run for run in map(json.loads, result.stdout.splitlines())}


@pytest.fixture(scope="session")
def preview_run() -> subprocess.CompletedProcess:
    """`python -m tools.preview --requests 200 --fault v2=empty --compare`, as it ran."""
    return _finished("preview_run")[1]


@pytest.fixture(scope="session")
def cli_synths(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """The real CDK CLI on a copy of the app, with cdk.json as it is (datapath eni, created) and with the README's
    command for an existing cluster (chaining), both at once, with no AWS credentials or config: (directory with
    the app's copy and each output, results). Chaining on a created cluster differs from eni only in what the
    app builds, which the session's in-process synths check."""
    directory = tmp_path_factory.mktemp("cli")
    work = directory / "app"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", "node_modules", "cdk.out", ".git", "__pycache__", ".tools"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("CDK_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(directory / "none"),
        AWS_CONFIG_FILE=str(directory / "none"),
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
    )
    # Each run's -c options: none, and the README's command for an existing cluster (its JSON as one string).
    runs = {"eni": [], "existing": ["-c", f"existing_cluster={json.dumps(PRIVATE_EXISTING_CLUSTER)}"]}
    processes = {
        name: subprocess.Popen(
            # --no-staging: the 57 MB of kubectl layer assets are not copied; what is checked here is the synth.
            [str(CDK_CLI), "synth", "--quiet", "--no-notices", "--no-staging", "--output", str(directory / name),
             "--app", f"{sys.executable} app.py", *options],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name, options in runs.items()
    }
    results = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=BACKGROUND_TIMEOUT_S)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    return directory, results


class _WithHealthChecks(MeshService):
    """A service with active health checks on its failover clusters (none ships)."""

    def envoy_resources(self):
        resources = super().envoy_resources()
        for resource in resources:
            if resource.get("type") == "STRICT_DNS":
                resource["health_checks"] = [{"timeout": "1s", "interval": "5s", "http_health_check": {"path": "/ping"}}]
        return resources


def with_health_checks(service: MeshService) -> MeshService:
    return _WithHealthChecks(**{f.name: getattr(service, f.name) for f in dataclasses.fields(service)})


def helm_values(resource: dict) -> dict:
    return json.loads(resolve_join(resource["Properties"]["Values"]))


def update_requested() -> bool:
    """UPDATE_SNAPSHOTS=1 rewrites the snapshot, except in CI, where it must fail instead of passing."""
    if os.environ.get("UPDATE_SNAPSHOTS") != "1":
        return False
    if os.environ.get("CI"):
        raise AssertionError("UPDATE_SNAPSHOTS is set in CI: review and commit the snapshot instead")
    return True


def normalize_assets(text: str) -> str:
    """Asset hashes change with any byte of a bundled asset; the snapshot keeps their place only."""
    return re.sub(r"[0-9a-f]{64}", "<ASSET_HASH>", text)
