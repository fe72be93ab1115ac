"""Preview the catalogdetail traffic policy in a real Envoy before deploying it.

    python -m tools.preview                                  # the policy in cdk.json, all healthy
    python -m tools.preview --weights v1=90,v2=10            # a canary, before `cdk deploy -c traffic_weights=...`
    python -m tools.preview --fault v2=down --compare        # v2 pods down, next to the walkthrough's policy
    python -m tools.preview --fault v2=5xx:0.3 --fault v1=ok
    python -m tools.preview --header v2                      # requests pinned with x-catalog-version: v2
    python -m tools.preview --plot failover.png              # v2 goes down after 30 s: the dashboard's view

Faults: 5xx:<ratio> (that share answered 503), down (connection refused), empty (no endpoints).
A real Prometheus scrapes the Envoy and evaluates the rules the stack loads into AMP
(manifests/metrics/prometheus/rules.yaml); the run ends with what they recorded. With
--plot the faults (default v2=down) start after --fault-after seconds of healthy traffic at
--rate requests per second, and the picture shows per-version share, answered and ejected
hosts over --seconds, with the moment each alert fired: what the requests saw, counted every
2 s from the run itself, beside what AMP's 2-minute rules record for the same moments.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from checks.cilium_envoy import build_for
from checks.envoy_harness import DIFFERENCES, Fault, RunResult, run, verdicts_line
from checks.metrics_harness import Timeline, run_recorded, timeline

from cilium_mesh import MeshService, DeclarationError
from stacks import cdk_json_context
from stacks.config import ConfigError, load_config

MAX_REQUESTS = 20000
PLOT_LIMITS = {"seconds": (40, 600), "rate": (1, 200), "fault_after": (0, 590)}


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
    parser.add_argument("--plot", type=Path, help="draw share, answered and ejections over time into this PNG")
    parser.add_argument("--seconds", type=float, default=120.0, help="with --plot: length of the run")
    parser.add_argument("--rate", type=float, default=40.0, help="with --plot: requests per second")
    parser.add_argument("--fault-after", type=float, default=30.0, help="with --plot: healthy seconds before the faults")
    args = parser.parse_args(argv)
    try:
        if not 1 <= args.requests <= MAX_REQUESTS:
            raise ValueError(f"--requests must be 1-{MAX_REQUESTS}")
        for name, (low, high) in PLOT_LIMITS.items():
            if not low <= getattr(args, name) <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be {low}-{high}")
        if args.fault_after >= args.seconds:
            raise ValueError("--fault-after must be less than --seconds")
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
        if args.plot:
            faults = faults or {"v2": Fault("down")}
            if any(f.kind == "empty" for f in faults.values()):
                raise ValueError("--plot: a fault that starts part-way is 5xx:<ratio> or down (endpoints are fixed)")
            if args.header or args.compare:
                raise ValueError("--plot runs this policy's split: no --header or --compare")
        headers = None
        if args.header:
            if not policy.pin_header or args.header not in policy.weights:
                raise ValueError(f"--header must be one of {', '.join(policy.versions)}")
            headers = {policy.pin_header: args.header}
    except (ValueError, ConfigError, DeclarationError) as error:
        print(f"preview: {error}", file=sys.stderr)
        return 2

    build = build_for(config.cilium_version)
    if args.plot:
        return plot_run(args, policy, faults, build, config.datapath)
    runs = [("this policy", policy)]
    if args.compare:
        runs.append(("walkthrough", dataclasses.replace(MeshService.walkthrough(), weights=policy.weights)))
    fault_text = ", ".join(f"{v} {f.describe()}" for v, f in faults.items()) or "none"
    print(f"{policy.cec_name}: {args.requests} requests to {policy.name}:{policy.port}/catalogDetail in Envoy "
          f"{build.upstream_version} limited to cilium-envoy {build.tag} (Cilium {config.cilium_version}), "
          f"faults: {fault_text}" + (f", header {policy.pin_header}: {args.header}" if headers else ""))
    print(DIFFERENCES)
    for label, candidate in runs:
        print(verdicts_line(label, candidate, config.datapath))
    print(f"{'policy':<12} {'version':<8} {'configured':>10} {'share':>8}   {'95% interval':<18}   fault")
    recorded = None
    for label, candidate in runs:
        if label == "this policy":
            result, recorded = run_recorded(candidate, build.tag, args.requests, faults, headers, config.datapath)
        else:
            result = run(candidate, build.tag, args.requests, faults, datapath=config.datapath)
        for line in table(label, result):
            print(line)
    print(f"Prometheus, this policy's rules (as in AMP): {recorded}")
    return 0


def plot_run(args: argparse.Namespace, policy: MeshService, faults: dict[str, Fault], build, datapath: str) -> int:
    fault_text = ", ".join(f"{v} {f.describe()}" for v, f in faults.items())
    print(f"{policy.cec_name}: {args.rate:g} requests/s for {args.seconds:g} s in Envoy {build.upstream_version} limited to "
          f"cilium-envoy {build.tag}; after {args.fault_after:g} s: {fault_text}")  # fmt: skip
    run_ = timeline(policy, build.tag, faults, args.fault_after, args.seconds, args.rate, datapath)
    draw(run_, policy, fault_text, args.plot)
    fired = ", ".join(f"{a} {s:+.1f} s" for a, s in sorted(run_.first_fired_s.items(), key=lambda i: i[1])) or "none"
    print(f"answered {run_.measured.answered_share:.2%} of {run_.measured.requests}; alerts fired (after the fault): {fired}")
    print(f"wrote {args.plot}")
    return 0


# What the requests saw is counted over windows of this many seconds.
SEEN_WINDOW_S = 2.0
VERSION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def draw(run_: Timeline, policy: MeshService, fault_text: str, path: Path) -> list[str]:
    """Three panels over time: what the requests saw (solid, every SEEN_WINDOW_S from the run itself)
    beside what AMP's 2-minute rules record for the same moments (thin, dashed), the weights, and
    Envoy's ejected hosts. Returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {v: VERSION_COLOURS[i % len(VERSION_COLOURS)] for i, v in enumerate(policy.versions)}
    recorded_style = {"linestyle": "--", "linewidth": 1, "alpha": 0.8}

    def recorded(axis, record, label_of, colour_of):
        for result in run_.series[record]:
            times = [t - run_.start for t, _ in result["values"]]
            axis.plot(times, [v for _, v in result["values"]], color=colour_of(result["metric"]),
                      label=label_of(result["metric"]), **recorded_style)  # fmt: skip

    figure, (share, answered, ejected) = plt.subplots(3, 1, sharex=True, figsize=(12, 8), constrained_layout=True)
    middles, shares, answered_seen = run_.seen(SEEN_WINDOW_S)
    for version, values in shares.items():
        share.plot(middles, values, color=colour[version], linewidth=1.8, label=f"{version}: requests answered by it")
    recorded(share, "catalogdetail:share:ratio2m", lambda m: f"{m['version']}: as AMP's 2-minute rule records it",
             lambda m: colour.get(m["version"], "grey"))  # fmt: skip
    # One line per distinct weight, so that equal weights (50/50) do not hide one another.
    total = sum(policy.weights.values())
    for weight in sorted(set(policy.weights.values())):
        versions = [v for v, w in policy.weights.items() if w == weight]
        share.axhline(weight / total, color="black", linestyle=":", linewidth=1,
                      label=f"weight of {', '.join(versions)}: {weight / total:.0%}" + (" each" if len(versions) > 1 else ""))  # fmt: skip
    share.set_ylabel("share of answered")
    share.set_ylim(-0.05, 1.05)
    answered.plot(middles, answered_seen, color="tab:green", linewidth=1.8, label="answered (2xx), as the requests saw it")
    recorded(answered, "catalogdetail:answered:ratio2m", lambda m: "answered, as AMP's 2-minute rule records it", lambda m: "tab:green")
    answered.set_ylabel("answered (2xx)")
    answered.set_ylim(0, 1.05)
    for result in run_.series["catalogdetail:ejections_active"]:
        destination = result["metric"]["destination"]
        ejected.plot([t - run_.start for t, _ in result["values"]], [v for _, v in result["values"]],
                     color=colour.get(destination, "grey"), label=f"{destination}'s cluster (Envoy's gauge)")  # fmt: skip
    ejected.set_ylabel("ejected hosts")
    ejected.set_xlabel(f"seconds (requests counted every {SEEN_WINDOW_S:g} s; AMP's rules over the last 2 minutes)")
    for axis in (share, answered, ejected):
        axis.axvline(run_.fault_at_s, color="red", linewidth=1)
        for alert, after in run_.first_fired_s.items():
            axis.axvline(run_.fault_at_s + after, color="grey", linestyle=":", linewidth=1)
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        axis.grid(alpha=0.3)
    for alert, after in sorted(run_.first_fired_s.items(), key=lambda item: item[1]):
        ejected.annotate(alert, (run_.fault_at_s + after, 0.5), xycoords=("data", "axes fraction"), rotation=90,
                         fontsize=7, va="center", ha="right", color="grey")  # fmt: skip
    share.set_title(f"{policy.cec_name}, weights {dict(policy.weights)}: {fault_text} at {run_.fault_at_s:g} s (red); "
                    "alerts firing (grey)", fontsize=9)  # fmt: skip
    labels = [text.get_text() for axis in (share, answered, ejected) for text in axis.get_legend().get_texts()]
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return labels


if __name__ == "__main__":
    sys.exit(main())
