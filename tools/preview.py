"""Preview the catalogdetail traffic policy in a real Envoy before deploying it.

    python -m tools.preview                                  # the policy in cdk.json, all healthy
    python -m tools.preview --weights v1=90,v2=10            # a canary, before `cdk deploy -c traffic_weights=...`
    python -m tools.preview --fault v2=down --compare        # v2 pods down, next to the walkthrough's policy
    python -m tools.preview --fault v2=5xx:0.3 --fault v1=ok
    python -m tools.preview --header v2                      # requests pinned with x-catalog-version: v2

Faults: 5xx:<ratio> (that share answered 503), down (connection refused), empty (no endpoints).
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from checks.cilium_envoy import build_for
from checks.envoy_harness import DIFFERENCES, Fault, RunResult, run, verdicts_line

from cilium_mesh import TrafficPolicy, TrafficPolicyError
from stacks import cdk_json_context
from stacks.config import ConfigError, load_config

MAX_REQUESTS = 20000


def parse_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not version=value")
        pairs[key.strip()] = value.strip()
    return pairs


def table(label: str, result: RunResult) -> list[str]:
    policy = result.policy
    total = sum(policy.weights.values())
    lines = []
    for index, version in enumerate(policy.versions):
        low, high = result.interval(version)
        lines.append(
            f"{label if index == 0 else '':<12} {version:<8} {policy.weights[version] / total:>10.1%} "
            f"{result.share(version):>8.1%}   [{low:6.1%}, {high:6.1%}]   {result.faults[version].describe()}"
        )
    statuses = " ".join(f"{code or 'reset'}={n}" for code, n in sorted(result.statuses.items()))
    lines.append(
        f"{'':<12} answered {result.answered_share:.2%} ({result.answered}/{result.requests})   "
        f"statuses {statuses}   retries {result.retries}   ejections {result.ejections}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help=f"requests to send (1-{MAX_REQUESTS})")
    parser.add_argument("--weights", help="override cdk.json traffic_weights, e.g. v1=90,v2=10")
    parser.add_argument("--fault", action="append", default=[], help="version=5xx:<ratio>|down|empty")
    parser.add_argument("--header", help="pin every request to this version with the policy's header")
    parser.add_argument("--compare", action="store_true", help="also run the walkthrough's original policy")
    args = parser.parse_args(argv)
    try:
        if not 1 <= args.requests <= MAX_REQUESTS:
            raise ValueError(f"--requests must be 1-{MAX_REQUESTS}")
        context = cdk_json_context()
        if args.weights:
            context["traffic_weights"] = {v: int(w) for v, w in parse_pairs(args.weights).items()}
        config = load_config(context)
        policy = config.traffic_policy
        faults = {}
        for spec in args.fault:
            for version, text in parse_pairs(spec).items():
                if version not in policy.weights:
                    raise ValueError(f"--fault names {version!r}; versions: {', '.join(policy.versions)}")
                faults[version] = Fault.parse(text)
        headers = None
        if args.header:
            if not policy.pin_header or args.header not in policy.weights:
                raise ValueError(f"--header must be one of {', '.join(policy.versions)}")
            headers = {policy.pin_header: args.header}
    except (ValueError, ConfigError, TrafficPolicyError) as error:
        print(f"preview: {error}", file=sys.stderr)
        return 2

    build = build_for(config.cilium_version)
    runs = [("this policy", policy)]
    if args.compare:
        runs.append(("walkthrough", dataclasses.replace(TrafficPolicy.walkthrough(), weights=policy.weights)))
    fault_text = ", ".join(f"{v} {f.describe()}" for v, f in faults.items()) or "none"
    print(f"{policy.name}: {args.requests} requests to {policy.service}:{policy.port}/catalogDetail in Envoy "
          f"{build.upstream_version} limited to cilium-envoy {build.tag} (Cilium {config.cilium_version}), "
          f"faults: {fault_text}" + (f", header {policy.pin_header}: {args.header}" if headers else ""))
    print(DIFFERENCES)
    for label, candidate in runs:
        print(verdicts_line(label, candidate, config.datapath))
    print(f"{'policy':<12} {'version':<8} {'configured':>10} {'share':>8}   {'95% interval':<18}   fault")
    for label, candidate in runs:
        result = run(candidate, build.tag, args.requests, faults, headers if label == "this policy" else None,
                     datapath=config.datapath)  # fmt: skip
        for line in table(label, result):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
