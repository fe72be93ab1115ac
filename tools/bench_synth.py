"""Benchmark: `cdk synth` of this app next to a bare EKS stack, through the real CDK CLI, with the
sample app and with 1, 5 and 20 declared services of a user's own (the sample off).

The bare stack is what any EKS app pays for: a VPC over the same zones, an aws_eks_v2 cluster with
its kubectl provider, and a managed node group. The goals: this app at most 1.3x that, and with 20
services at most 1.5x; the Kubernetes steps in sequence after the node group the same for any number
of services; the rule file and the template within AMP's and CloudFormation's limits. Runs alternate
to share machine noise; the table shows medians.

    python -m tools.bench_synth [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.3
SERVICES_GOAL = 1.5
SERVICE_COUNTS = (1, 5, 20)
# CloudFormation's resources per stack.
MAX_RESOURCES = 500


def bare_app() -> None:
    """The comparison app: VPC, cluster, kubectl provider, node group; nothing of this project's."""
    import aws_cdk as cdk
    from aws_cdk import aws_ec2 as ec2
    from aws_cdk import aws_eks_v2 as eks
    from aws_cdk.lambda_layer_kubectl_v35 import KubectlV35Layer

    app = cdk.App()  # the CDK CLI passes cdk.json's context: the same region and zones
    stack = cdk.Stack(app, "BareEks", env=cdk.Environment(region=app.node.try_get_context("region")))
    vpc = ec2.Vpc(stack, "Vpc", availability_zones=app.node.try_get_context("availability_zones"))
    cluster = eks.Cluster(
        stack,
        "Cluster",
        version=eks.KubernetesVersion.V1_35,
        vpc=vpc,
        default_capacity_type=eks.DefaultCapacityType.NODEGROUP,
        default_capacity=0,
        kubectl_provider_options=eks.KubectlProviderOptions(kubectl_layer=KubectlV35Layer(stack, "KubectlLayer")),
    )
    cluster.add_nodegroup_capacity("Nodes", min_size=2)
    app.synth()


def declared_services(count: int) -> list[dict]:
    """``count`` services as a user declares them: two versions, a caller, a pin header, every third
    one rolled out with a load."""
    return [
        {
            "name": f"svc{i}", "namespace": f"team{i % 4}", "port": 8080,
            "versions": {v: {"app": f"svc{i}", "version": v} for v in ("v1", "v2")},
            "weights": {"v1": 90, "v2": 10}, "pin_header": "x-version", "check_path": "/healthz",
            "callers": [{"namespace": "web", "labels": {"app": "frontend"}}],
            **({"rollout": {"load": {"rate_per_s": 2}}} if i % 3 == 0 else {}),
        }
        for i in range(count)
    ]  # fmt: skip


def synth_once(app_command: str, context: dict | None = None) -> tuple[float, dict]:
    """Seconds of one `cdk synth`, and the stack's template."""
    out = tempfile.mkdtemp()
    options = [f"--context={key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in (context or {}).items()]
    started = time.perf_counter()
    subprocess.run(
        ["cdk", "synth", "--quiet", "--no-notices", "--output", out, "--app", app_command, *options],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    (template_file,) = Path(out).glob("*.template.json")
    template = json.loads(template_file.read_text())
    shutil.rmtree(out)
    return elapsed, template


def kubernetes_chain(template: dict) -> int:
    """The Kubernetes steps in sequence after the node group (the longest chain, as tests/test_order.py reads it)."""
    from checks.deploy_graph import Graph
    from cilium_mesh.rollout_plan import RESOURCE_TYPE

    kinds = ("Custom::AWSCDK-EKS-HelmChart", "Custom::AWSCDK-EKS-KubernetesResource", "Custom::AWSCDK-EKS-KubernetesObjectValue", RESOURCE_TYPE)
    graph = Graph(template)
    (nodes,) = [name for name, r in template["Resources"].items() if r["Type"] == "AWS::EKS::Nodegroup"]
    return len(graph.longest_chain({n for n, r in graph.resources.items() if r["Type"] in kinds and nodes in graph.after(n)}))


def rule_usage(template: dict) -> tuple[int, int]:
    """The AMP rule groups namespace's size in bytes and its rules, as CloudFormation hands them over."""
    from cilium_mesh.metrics_files import rule_file_usage

    (rules,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::APS::RuleGroupsNamespace"]
    return rule_file_usage(rules["Properties"]["Data"])



def _services_app(count: int) -> str:
    return f"{count} service" + ("" if count == 1 else "s")

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bare-app", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_app:
        bare_app()
        return 0
    if not shutil.which("cdk"):
        print("bench_synth: run `source scripts/env.sh` first (cdk not on PATH)", file=sys.stderr)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "constructs")]
    from cilium_mesh.metrics_files import AMP_RULE_FILE_MAX_BYTES, AMP_RULES_PER_WORKSPACE

    python = sys.executable
    sample_off = {"sample_app": "false", "traffic_weights": "null"}
    apps = {"bare EKS stack": (f"{python} tools/bench_synth.py --bare-app", None), "this app (sample)": (f"{python} app.py", None)}
    apps |= {_services_app(n): (f"{python} app.py", {**sample_off, "services": declared_services(n)}) for n in SERVICE_COUNTS}
    times: dict[str, list[float]] = {name: [] for name in apps}
    templates: dict[str, dict] = {}
    for _ in range(args.runs):
        for name, (command, context) in apps.items():
            elapsed, templates[name] = synth_once(command, context)
            times[name].append(elapsed)
    bare = statistics.median(times["bare EKS stack"])
    print(f"cdk synth, {args.runs} runs each, alternating ({os.cpu_count()} cores)")
    print(f"| {'app':<17} | {'median s':>8} | {'min s':>6} | {'max s':>6} | {'ratio':>5} | {'k8s steps':>9} | {'resources':>9} | {'rule file':>18} | {'rules':>10} |")
    print(f"|{'-' * 19}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 20}|{'-' * 12}|")
    for name, values in times.items():
        median = statistics.median(values)
        template = templates[name]
        steps = kubernetes_chain(template) if name != "bare EKS stack" else "-"
        size, rules = rule_usage(template) if name != "bare EKS stack" else (None, None)
        size_text = f"{size:,} / {AMP_RULE_FILE_MAX_BYTES:,} B" if size is not None else "-"
        rules_text = f"{rules} / {AMP_RULES_PER_WORKSPACE}" if rules is not None else "-"
        print(f"| {name:<17} | {median:>8.2f} | {min(values):>6.2f} | {max(values):>6.2f} | {median / bare:>5.2f} |"
              f" {steps:>9} | {len(template['Resources']):>9} | {size_text:>18} | {rules_text:>10} |")  # fmt: skip
    ratio = statistics.median(times["this app (sample)"]) / bare
    print(f"goal: the sample app at most {GOAL}x the bare stack: {'met' if ratio <= GOAL else 'NOT met'} ({ratio:.2f}x)")
    most = _services_app(SERVICE_COUNTS[-1])
    ratio = statistics.median(times[most]) / bare
    print(f"goal: {most} at most {SERVICES_GOAL}x the bare stack: {'met' if ratio <= SERVICES_GOAL else 'NOT met'} ({ratio:.2f}x)")
    chains = {kubernetes_chain(templates[_services_app(n)]) for n in SERVICE_COUNTS}
    print(f"goal: the same Kubernetes steps in sequence for any number of services: {'met' if len(chains) == 1 else 'NOT met'} ({sorted(chains)})")
    biggest = len(templates[most]["Resources"])
    print(f"goal: within CloudFormation's {MAX_RESOURCES} resources: {'met' if biggest <= MAX_RESOURCES else 'NOT met'} ({biggest} at {most})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
