"""Shared fixtures: the app is synthesized once per session, with cdk-nag attached."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
from checks.deploy_graph import logical_id  # noqa: E402
from checks.provider_dry_run import dry_run  # noqa: E402
from checks.rollout_harness import SUITE_SCENARIOS as ROLLOUT_SCENARIOS  # noqa: E402

CONTEXT = cdk_json_context()
STACK_NAME = "CiliumMeshEks"
TOKEN = "<TOKEN>"
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


def synthesize(outdir: Path, lint: bool = False, **overrides) -> Synth:
    """The app with these context overrides, cdk-nag attached; with ``lint``, its template is one of LINTED."""
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
    if lint:
        _lint_when_all_synthesized(outdir / f"{STACK_NAME}.template.json")
    return Synth(stack, template, Template.from_json(template), outdir, report)


# The session's three templates (synth, synth_variant, synth_eni): one cfn-lint over all of them starts
# beside the tests as soon as the last is synthesized; the fixture cfn_lint_run reads it.
LINTED = 3
_LINT: dict = {"templates": [], "process": None}


def _lint_when_all_synthesized(template: Path) -> None:
    _LINT["templates"].append(str(template))
    if len(_LINT["templates"]) == LINTED:
        cfn_lint = os.path.join(os.path.dirname(sys.executable), "cfn-lint")
        _LINT["process"] = subprocess.Popen([cfn_lint, "--format", "json", *_LINT["templates"]], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, preexec_fn=_lower_priority)  # fmt: skip


@pytest.fixture(scope="session")
def cfn_lint_run(synths) -> subprocess.CompletedProcess:
    """That cfn-lint, as it ran (its readers run last, so it has the time it needs beside the tests)."""
    process = _LINT["process"]
    stdout, stderr = process.communicate(timeout=BACKGROUND_TIMEOUT_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def synths(tmp_path_factory) -> dict[str, Synth]:
    """The session's three synths, made together when the first is needed, so that their one cfn-lint
    runs beside most of the tests."""
    return {
        # Datapath chaining: Cilium on the VPC CNI (the walkthrough's); alerts also by e-mail; weights rolled out.
        "chaining": synthesize(tmp_path_factory.mktemp("cdk.out"), lint=True, datapath="chaining",
                               alert_email="oncall@example.com", rollout=ROLLOUT),
        # Datapath eni: Cilium as the only CNI (the default in cdk.json).
        "eni": synthesize(tmp_path_factory.mktemp("cdk.out.eni"), lint=True, datapath="eni"),
        # The other side of every switch: no network policy, an admin principal, 90/10.
        "variant": synthesize(
            tmp_path_factory.mktemp("cdk.out.variant"),
            lint=True,
            network_policy=False,
            admin_principal_arn="arn:aws:iam::123456789012:role/PlatformAdmin",
            traffic_weights={"v1": 90, "v2": 10},
            metrics=False,
            smoke_test=False,
        ),
    }


@pytest.fixture(scope="session")
def synth(synths) -> Synth:
    return synths["chaining"]


@pytest.fixture(scope="session")
def synth_eni(synths) -> Synth:
    return synths["eni"]


@pytest.fixture(scope="session")
def synth_variant(synths) -> Synth:
    return synths["variant"]


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


# Commands that mostly wait run in their own processes from the end of collection on, beside the other
# tests, and the tests that read them run last: the local alert run (about 50 s, most of it the alerts'
# `for: 30s`), the rollout runs (about 35 s, most of it their pauses), the preview (about 7 s, most of it
# Prometheus' first target discovery) and the CDK CLI's synth of both datapaths (about 11 s).
BACKGROUND_TIMEOUT_S = 300
# Requests per second per alert scenario: enough for every alert, half of tools.measure's, for the suite's CPU.
ALERT_RUN_RATE = 20
CDK_CLI = ROOT / "node_modules" / ".bin" / "cdk"
_BACKGROUND: dict = {}


# Background commands run at a lower CPU priority, so the tests in front get the cores first: the
# runs that mostly wait on time (alerts' `for: 30s`, a rollout's pauses) a little lower, the ones that
# only compute (the CLI's synths, cfn-lint, the preview) lower still, so the timed runs finish first.
TIMED_NICE, COMPUTING_NICE = 5, 15


def _lower_priority(niceness: int = COMPUTING_NICE) -> None:
    os.nice(niceness)


def _python(*args: str, niceness: int = COMPUTING_NICE) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: _lower_priority(niceness))  # fmt: skip
    ]


def _cli_synths(directory: Path) -> list[subprocess.Popen]:
    """The real CDK CLI on a copy of the app, once per datapath, with no AWS credentials or config."""
    work = directory / "app"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", "node_modules", "cdk.out", ".git", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("CDK_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(directory / "none"),
        AWS_CONFIG_FILE=str(directory / "none"),
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
    )
    return [
        subprocess.Popen(
            # --no-staging: the 57 MB of kubectl layer assets are not copied; what is checked here is the synth.
            [str(CDK_CLI), "synth", "--quiet", "--no-notices", "--no-staging", "--output", str(directory / datapath),
             "--app", f"{sys.executable} app.py", "-c", f"datapath={datapath}"],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_lower_priority,
        )  # fmt: skip
        for datapath in ("chaining", "eni")
    ]


# Fixture name -> what starts its processes in a directory of its own.
_STARTERS = {
    "alert_observations": lambda d: _python("-m", "checks.metrics_harness", "--json", str(d / "observations.json"),
                                            "--rate", str(ALERT_RUN_RATE), niceness=TIMED_NICE),
    "preview_run": lambda d: _python("-m", "tools.preview", "--requests", "200", "--fault", "v2=empty", "--compare"),
    "cli_synths": _cli_synths,
    "rollout_runs": lambda d: _python("-m", "checks.rollout_harness", *ROLLOUT_SCENARIOS, niceness=TIMED_NICE),
}  # fmt: skip


# Fixture name -> work a test module hands over (mostly waiting on subprocesses: helm, app.py),
# started in threads at the end of collection, beside the tests that come before its readers.
_EARLY_WORK: dict[str, Callable[[], object]] = {}
_EARLY: dict[str, Future] = {}
_EARLY_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="early")


def early(name: str, work: Callable[[], object]) -> None:
    """Register ``work`` for the fixture ``name``, which reads it with ``early_result(name)``."""
    _EARLY_WORK[name] = work


def early_result(name: str):
    return _EARLY[name].result(timeout=BACKGROUND_TIMEOUT_S)


def pytest_collection_modifyitems(session, config, items):
    def reads(item, names) -> bool:
        return bool(set(names) & set(getattr(item, "fixturenames", ())))

    readers = [item for item in items if reads(item, (*_STARTERS, "cfn_lint_run"))]
    early_readers = [item for item in items if reads(item, _EARLY_WORK) and item not in readers]
    items[:] = [item for item in items if item not in readers and item not in early_readers] + early_readers + readers
    for name in sorted({n for item in readers for n in item.fixturenames if n in _STARTERS}):
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        _BACKGROUND[name] = (directory, _STARTERS[name](directory))
    for name in sorted({n for item in items for n in getattr(item, "fixturenames", ()) if n in _EARLY_WORK}):
        _EARLY[name] = _EARLY_POOL.submit(_EARLY_WORK[name])


def pytest_unconfigure(config):
    _EARLY_POOL.shutdown(wait=False, cancel_futures=True)
    for _, processes in _BACKGROUND.values():
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def _finished(name: str) -> tuple[Path, list[subprocess.CompletedProcess]]:
    directory, processes = _BACKGROUND[name]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=BACKGROUND_TIMEOUT_S)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return directory, results


@pytest.fixture(scope="session")
def alert_observations() -> dict:
    """Every scenario of checks/metrics_harness.py, as it wrote them (see pytest_collection_modifyitems)."""
    directory, (result,) = _finished("alert_observations")
    assert result.returncode == 0, f"checks.metrics_harness failed: {result.stderr[-3000:]}"
    return json.loads((directory / "observations.json").read_text())


@pytest.fixture(scope="session")
def preview_run() -> subprocess.CompletedProcess:
    """`python -m tools.preview --requests 200 --fault v2=empty --compare`, as it ran."""
    return _finished("preview_run")[1][0]


@pytest.fixture(scope="session")
def rollout_runs() -> dict[str, dict]:
    """Each scenario of checks/rollout_harness.py (a rollout, then CloudFormation's rollback), as it ran."""
    runs = {}
    for result in _finished("rollout_runs")[1]:
        assert result.returncode == 0, f"checks.rollout_harness failed: {result.stderr[-3000:]}"
        runs.update((run["name"], run) for run in map(json.loads, result.stdout.splitlines()))
    return runs


@pytest.fixture(scope="session")
def cli_synths() -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """The CDK CLI's synth of each datapath: (directory with the app's copy and each output, results)."""
    directory, results = _finished("cli_synths")
    return directory, dict(zip(("chaining", "eni"), results))


def resolve_join(value) -> str:
    """A string property that holds tokens, with every token replaced by <TOKEN>."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve_join(part) for part in parts)
    return TOKEN


def manifest_documents(resource: dict) -> list[dict]:
    return json.loads(resolve_join(resource["Properties"]["Manifest"]))


def helm_values(resource: dict) -> dict:
    return json.loads(resolve_join(resource["Properties"]["Values"]))


def normalize_assets(text: str) -> str:
    """Asset hashes change with any byte of a bundled asset; the snapshot keeps their place only."""
    return re.sub(r"[0-9a-f]{64}", "<ASSET_HASH>", text)
