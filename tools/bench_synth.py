"""Benchmark: `cdk synth` of this app next to a bare EKS stack, through the real CDK CLI.

The bare stack is what any EKS app pays for: a VPC over the same zones, an
aws_eks_v2 cluster with its kubectl provider, and a managed node group. The
goal is for this app to cost at most 1.3x that. Runs alternate to share
machine noise; the table shows medians.

    python -m tools.bench_synth [--runs 3]
"""

from __future__ import annotations

import argparse
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


def synth_once(app_command: str) -> float:
    """Seconds of one `cdk synth`."""
    out = tempfile.mkdtemp()
    started = time.perf_counter()
    subprocess.run(
        ["cdk", "synth", "--quiet", "--no-notices", "--output", out, "--app", app_command],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


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
    python = sys.executable
    apps = {"bare EKS stack": f"{python} tools/bench_synth.py --bare-app", "this app": f"{python} app.py"}
    times: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(args.runs):
        for name, command in apps.items():
            times[name].append(synth_once(command))
    bare = statistics.median(times["bare EKS stack"])
    print(f"cdk synth, {args.runs} runs each, alternating ({os.cpu_count()} cores)")
    print(f"| {'app':<16} | {'median s':>8} | {'min s':>6} | {'max s':>6} | {'ratio':>5} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 7}|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:<16} | {median:>8.2f} | {min(values):>6.2f} | {max(values):>6.2f} | {median / bare:>5.2f} |")
    ratio = statistics.median(times["this app"]) / bare
    print(f"goal: at most {GOAL}x the bare stack: {'met' if ratio <= GOAL else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
