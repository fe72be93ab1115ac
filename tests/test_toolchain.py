"""The real tools that will act on this app: the CDK CLI, cfn-lint, cdk-nag; and the layout they rely on."""

import json
import os
import subprocess
import sys

import aws_cdk as cdk
import constructs
import pytest
from aws_cdk import aws_iam as iam
from cdk_nag import AwsSolutionsChecks
from conftest import CDK_CLI, EXISTING_CLUSTER, PRIVATE_EXISTING_CLUSTER, ROOT, STACK_NAME


def test_constructs_folder_does_not_shadow_the_constructs_library():
    import cilium_mesh
    from constructs import Construct

    assert "site-packages" in constructs.__file__
    assert Construct.__module__.startswith("constructs")
    assert not (ROOT / "constructs" / "__init__.py").exists()
    assert cilium_mesh.__file__ == str(ROOT / "constructs" / "cilium_mesh" / "__init__.py")


def test_cdk_cli_synthesizes_the_default_and_an_existing_cluster_without_credentials_or_lookups(cli_synths):
    """The real CLI, with no AWS credentials or config, with cdk.json as it is (eni) and with the README's
    command for an existing cluster (`-c existing_cluster=<its JSON>`, chaining)."""
    if not CDK_CLI.exists():
        pytest.fail("node_modules/.bin/cdk missing: run the README's set-up command (npm ci)")
    directory, results = cli_synths
    assert set(results) == {"eni", "existing"}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
        template = json.loads((directory / name / f"{STACK_NAME}.template.json").read_text())
        types = {r["Type"] for r in template["Resources"].values()}
        assert ("AWS::EKS::Cluster" in types) == (name != "existing") and ("Custom::CiliumEniCleanup" in types) == (name == "eni")
        assert ("AWS::EKS::Nodegroup" in types) == (name != "existing")
        manifest = json.loads((directory / name / "manifest.json").read_text())
        assert not manifest.get("missing"), "a context lookup would need AWS at synth"
    assert not (directory / "app" / "cdk.context.json").exists()


# cfn-lint warnings we accept, each with its cause; any other warning (an unknown IAM action, W3037, say) fails.
ACCEPTED_CFN_LINT_WARNINGS = {
    "W3005": "redundant DependsOn next to a Ref: aws-cdk-lib writes both for its own constructs",
    "W3010": "availability zones given in cdk.json, so that synth needs no AWS lookup",
}


@pytest.fixture(scope="module")
def cfn_lint_run(synth, synth_variant, synth_eni, synth_existing, synth_existing_public) -> subprocess.CompletedProcess:
    """One cfn-lint over the session's five templates."""
    cfn_lint = os.path.join(os.path.dirname(sys.executable), "cfn-lint")
    templates = [str(s.outdir / f"{STACK_NAME}.template.json") for s in (synth, synth_variant, synth_eni, synth_existing, synth_existing_public)]
    return subprocess.run([cfn_lint, "--format", "json", *templates], capture_output=True, text=True, timeout=600, check=False)


def test_cfn_lint_finds_no_errors_and_only_accepted_warnings(cfn_lint_run):
    result = cfn_lint_run
    findings = json.loads(result.stdout or "[]")
    errors = [f for f in findings if f["Level"] == "Error"]
    assert errors == [], errors
    unexpected = [f for f in findings if f["Rule"]["Id"] not in ACCEPTED_CFN_LINT_WARNINGS]
    assert unexpected == [], unexpected
    assert result.returncode in (0, 4), result.stderr  # 4: warnings only


def nag_violations(report: dict) -> list[str]:
    return [
        f"{violation['ruleName']} {construct['constructPath']}"
        for plugin in report["pluginReports"]
        if plugin["pluginName"] == "AwsSolutions"
        for violation in plugin["violations"]
        for construct in violation["violatingConstructs"]
    ]


def test_cdk_nag_aws_solutions_has_no_unsuppressed_findings(synth, synth_variant, synth_eni, synth_existing, synth_existing_public):
    for result in (synth, synth_variant, synth_eni, synth_existing, synth_existing_public):
        assert nag_violations(result.nag_report) == []
        assert all(plugin["conclusion"] == "success" for plugin in result.nag_report["pluginReports"])


@pytest.mark.slow
def test_cdk_nag_reports_what_is_not_acknowledged(tmp_path):
    """The same plugin on a role with a managed policy: proves the check above is live."""
    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "Probe")
    iam.Role(
        stack,
        "Role",
        assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
        managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonEKSWorkerNodePolicy")],
    )
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    assert any("AwsSolutions-IAM4" in v for v in nag_violations(report))


def test_every_acknowledgement_names_its_cause(synth):
    """Ours are the AwsSolutions ones (CDK itself acknowledges a few CloudFormation-Validate rules)."""
    acknowledged = {
        rule: reason
        for construct in synth.stack.node.find_all()
        for entry in construct.node.metadata
        if entry.type == "aws:cdk:acknowledged-rules"
        for rule, reason in entry.data.items()
        if "AwsSolutions-" in rule
    }
    assert len(acknowledged) >= 15
    for rule, reason in acknowledged.items():
        assert len(reason) > 60 and any(word in reason for word in ("Amazon", "AWS", "kubectl", "Controller")), rule


def test_every_supported_kubernetes_version_maps_to_its_own_kubectl_layer(tmp_path):
    import importlib

    from stacks.versions import KUBERNETES_RELEASES, RETIRED_KUBERNETES

    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "Layers")
    for version, release in KUBERNETES_RELEASES.items():
        getattr(importlib.import_module(release.layer_module), release.layer_class)(stack, f"Layer{version}")
    template = app.synth().get_stack_by_name("Layers").template
    descriptions = sorted(r["Properties"]["Description"] for r in template["Resources"].values())
    kubectl = [d.split(";")[0].rsplit(" ", 1)[-1] for d in descriptions]
    assert [k.rsplit(".", 1)[0] for k in kubectl] == sorted(KUBERNETES_RELEASES)
    assert not set(KUBERNETES_RELEASES) & set(RETIRED_KUBERNETES)


# Each session synth whose acknowledgements are checked, and the context it was made with.
NAG_SYNTHS = {
    "synth": {"datapath": "chaining"},
    "synth_eni": {"datapath": "eni"},
    "synth_existing": {"existing_cluster": PRIVATE_EXISTING_CLUSTER},
    "synth_existing_public": {"datapath": "chaining", "existing_cluster": {**EXISTING_CLUSTER, "endpoint_access": "public"}},
}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", list(NAG_SYNTHS))
def test_cdk_nag_findings_without_acknowledgements_are_exactly_the_acknowledged_ones(tmp_path, monkeypatch, request, fixture):
    """Proves the plugin ran on this stack and that no acknowledgement is stale or misplaced."""
    from conftest import synthesize
    from stacks.cilium_eks_stack import CiliumEksStack

    synth = request.getfixturevalue(fixture)
    acknowledged = {
        (rule[rule.index("AwsSolutions-") :], construct.node.path)
        for construct in synth.stack.node.find_all()
        for entry in construct.node.metadata
        if entry.type == "aws:cdk:acknowledged-rules"
        for rule in entry.data
        if "AwsSolutions-" in rule
    }
    monkeypatch.setattr(CiliumEksStack, "_acknowledge_findings", lambda self: None)
    bare = synthesize(tmp_path / "bare", **NAG_SYNTHS[fixture])
    findings = [
        (violation["ruleName"], construct["constructPath"])
        for plugin in bare.nag_report["pluginReports"]
        if plugin["pluginName"] == "AwsSolutions"
        for violation in plugin["violations"]
        for construct in violation["violatingConstructs"]
    ]
    assert findings, "cdk-nag reported nothing: it did not run"
    for rule, path in findings:
        assert any(rule == r and (path == p or path.startswith(p + "/")) for r, p in acknowledged), (rule, path)
    assert {r for r, _ in acknowledged} == {r for r, _ in findings}, "an acknowledgement no finding needs"


def registry_hosts() -> set[str]:
    """The package registries this machine is configured for, read from their own configuration: apt's
    sources, pip's index (its PyPI default and any configured index) and npm's registry."""
    import re
    import subprocess
    import sys
    from urllib.parse import urlsplit

    from pip._internal.models.index import PyPI

    from checks.debian import archive_uris

    urls = list(archive_uris())
    pip_config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    urls += re.findall(r"index-url='([^']+)'", pip_config.stdout)
    npm = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True, check=True)
    urls.append(npm.stdout.strip())
    hosts = {urlsplit(url).hostname for url in " ".join(urls).split() if urlsplit(url).hostname}
    return hosts | {PyPI.netloc, PyPI.file_storage_domain}


def test_no_file_names_a_package_registry():
    """Debian's archive comes from apt's sources (checks/debian.py), PyPI and npm from pip and npm as configured."""
    import subprocess

    hosts = registry_hosts()
    assert len(hosts) >= 3, hosts
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    naming = []
    for name in filter(None, files.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore").lower()
        naming += [f"{name}: {host}" for host in sorted(hosts) if host.lower() in text]
    assert naming == []


def test_debians_archive_is_read_from_both_styles_of_apt_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# local mirror\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian trixie main\n"
                                           "deb-src http://src.example/debian trixie main\n")  # fmt: skip
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://one.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://two.example/debian-security/\n http://three.example/debian\nSuites: bookworm-security\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: trixie\n"
    )
    (tmp_path / "sources.list.d" / "vendor.list.disabled").write_text("deb http://disabled.example/apt stable main\n")
    from checks.debian import archive_uris

    assert archive_uris(tmp_path) == ["http://mirror.example/debian", "http://one.example/debian",
                                      "http://two.example/debian-security", "http://three.example/debian"]  # fmt: skip


def test_the_fast_tier_refuses_every_slow_tool():
    """What keeps `-m fast` fast: in a run of that tier alone, starting any tool a marker names fails."""
    from conftest import TOOL_MARKERS, refuse_slow_tools

    original = refuse_slow_tools()
    try:
        for tool, programs in TOOL_MARKERS.items():
            for program in programs:
                with pytest.raises(AssertionError, match=f"starts {program} in the fast tier: mark it .*{tool}$"):
                    subprocess.Popen([f"/opt/bin/{program}", "--version"])
        assert subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True).stdout == "ok\n"
    finally:
        subprocess.Popen.__init__ = original
