"""Preview a declared service's traffic policy in a real Envoy before deploying it.

    python -m tools.preview                                  # the sample's catalogdetail as cdk.json declares it
    python -m tools.preview --service shop/payments          # another service that cdk.json's services declares
    python -m tools.preview --weights v1=90,v2=10            # a canary, before deploying those weights
    python -m tools.preview --fault v2=down --compare        # v2 pods down, next to the walkthrough's policy
    python -m tools.preview --fault v2=5xx:0.3 --fault v1=ok
    python -m tools.preview --header v2                      # requests pinned to v2 with the service's pin header
    python -m tools.preview --plot failover.png              # a version goes down after 30 s: the dashboard's view

The requests are GETs of the service's check_path. Faults: 5xx:<ratio> (that share answered 503),
down (connection refused), empty (no endpoints). A real Prometheus scrapes the Envoy and evaluates
the rules the stack loads into AMP; the run ends with what they recorded. With --plot the faults
(default: the last weighted version down, v2 for the sample) start after --fault-after seconds of
healthy traffic at --rate requests per second, and the picture shows per-version share, answered
and ejected hosts over --seconds, with the moment each alert fired: what the requests saw, counted
every 2 s from the run itself, beside what AMP's 2-minute rules record for the same moments.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checks.cilium_envoy import build_for
from checks.envoy_harness import DIFFERENCES, Fault, RunResult, run, verdicts_line, walkthrough
from checks.metrics_harness import PLOTTED, Timeline, run_recorded, timeline

from cilium_mesh import MeshService, DeclarationError
from cilium_mesh.declaration import sample_service
from stacks import cdk_json_context
from stacks.config import ConfigError, MeshConfig, load_config

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


def chosen_service(config: MeshConfig, key: str | None) -> MeshService:
    """The declared service ``namespace/name`` (default the sample's), or ValueError naming the declared ones."""
    key = key or sample_service().key
    if key not in {s.key for s in config.services}:
        declared = ", ".join(s.key for s in config.services) or "none (cdk.json: sample_app false, services [])"
        raise ValueError(f"--service {key} is not declared; declared: {declared}")
    return config.service(key)


def table(label: str, result: RunResult) -> list[str]:
    service = result.policy
    total = sum(service.weights.values())
    lines = []
    for index, version in enumerate(service.versions):
        low, high = result.interval(version)
        lines.append(
            f"{label if index == 0 else '':<12} {version:<8} {service.weights[version] / total:>10.1%} "
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
    parser.add_argument("--service", metavar="NAMESPACE/NAME", help="the declared service (default the sample's workshop/catalogdetail)")
    parser.add_argument("--weights", help="the service's weights instead of the declared ones, e.g. v1=90,v2=10")
    parser.add_argument("--fault", action="append", default=[], help="version=5xx:<ratio>|down|empty")
    parser.add_argument("--header", help="pin every request to this version with the service's pin header")
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
        config = load_config(cdk_json_context())
        service = chosen_service(config, args.service)
        if args.weights:
            service = service.with_weights({v: int(w) for v, w in parse_pairs(args.weights).items()})
        faults = {}
        for spec in args.fault:
            for version, text in parse_pairs(spec).items():
                if version not in service.versions:
                    raise ValueError(f"--fault names {version!r}; versions: {', '.join(service.versions)}")
                faults[version] = Fault.parse(text)
        if args.plot:
            faults = faults or {service.weighted_versions[-1]: Fault("down")}
            if any(f.kind == "empty" for f in faults.values()):
                raise ValueError("--plot: a fault that starts part-way is 5xx:<ratio> or down (endpoints are fixed)")
            if args.header or args.compare:
                raise ValueError("--plot runs this policy's split: no --header or --compare")
        headers = None
        if args.header:
            if not service.pin_header:
                raise ValueError(f"--header: {service.key} declares no pin_header")
            if args.header not in service.versions:
                raise ValueError(f"--header must be one of {', '.join(service.versions)}")
            headers = {service.pin_header: args.header}
    except (ValueError, ConfigError, DeclarationError) as error:
        print(f"preview: {error}", file=sys.stderr)
        return 2

    build = build_for(config.cilium_version)
    if args.plot:
        return plot_run(args, service, faults, build, config.datapath)
    runs = [("this policy", service)]
    if args.compare:
        runs.append(("walkthrough", walkthrough(service)))
    fault_text = ", ".join(f"{v} {f.describe()}" for v, f in faults.items()) or "none"
    print(f"{service.cec_name}: {args.requests} requests to {service.name}.{service.namespace}:{service.port}{service.check_path} in Envoy "
          f"{build.upstream_version} limited to cilium-envoy {build.tag} (Cilium {config.cilium_version}), "
          f"faults: {fault_text}" + (f", header {service.pin_header}: {args.header}" if headers else ""))
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


def plot_run(args: argparse.Namespace, service: MeshService, faults: dict[str, Fault], build, datapath: str) -> int:
    fault_text = ", ".join(f"{v} {f.describe()}" for v, f in faults.items())
    print(f"{service.cec_name}: {args.rate:g} requests/s for {args.seconds:g} s in Envoy {build.upstream_version} limited to "
          f"cilium-envoy {build.tag}; after {args.fault_after:g} s: {fault_text}")  # fmt: skip
    run_ = timeline(service, build.tag, faults, args.fault_after, args.seconds, args.rate, datapath)
    draw(run_, service, fault_text, args.plot)
    fired = ", ".join(f"{a} {s:+.1f} s" for a, s in sorted(run_.first_fired_s.items(), key=lambda i: i[1])) or "none"
    print(f"answered {run_.measured.answered_share:.2%} of {run_.measured.requests}; alerts fired (after the fault): {fired}")
    print(f"wrote {args.plot}")
    return 0


# What the requests saw is counted over windows of this many seconds.
SEEN_WINDOW_S = 2.0
VERSION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def draw(run_: Timeline, service: MeshService, fault_text: str, path: Path) -> list[str]:
    """Three panels over time: what the requests saw (solid, every SEEN_WINDOW_S from the run itself)
    beside what AMP's 2-minute rules record for the same moments (thin, dashed), the weights, and
    Envoy's ejected hosts. Returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {v: VERSION_COLOURS[i % len(VERSION_COLOURS)] for i, v in enumerate(service.versions)}
    share_record, answered_record, ejections_record = PLOTTED
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
    recorded(share, share_record, lambda m: f"{m['version']}: as AMP's 2-minute rule records it",
             lambda m: colour.get(m["version"], "grey"))  # fmt: skip
    # One line per distinct weight, so that equal weights (50/50) do not hide one another.
    total = sum(service.weights.values())
    for weight in sorted(set(service.weights.values())):
        versions = [v for v, w in service.weights.items() if w == weight]
        share.axhline(weight / total, color="black", linestyle=":", linewidth=1,
                      label=f"weight of {', '.join(versions)}: {weight / total:.0%}" + (" each" if len(versions) > 1 else ""))  # fmt: skip
    share.set_ylabel("share of answered")
    share.set_ylim(-0.05, 1.05)
    answered.plot(middles, answered_seen, color="tab:green", linewidth=1.8, label="answered (2xx), as the requests saw it")
    recorded(answered, answered_record, lambda m: "answered, as AMP's 2-minute rule records it", lambda m: "tab:green")
    answered.set_ylabel("answered (2xx)")
    answered.set_ylim(0, 1.05)
    for result in run_.series[ejections_record]:
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
    share.set_title(f"{service.cec_name}, weights {dict(service.weights)}: {fault_text} at {run_.fault_at_s:g} s (red); "
                    "alerts firing (grey)", fontsize=9)  # fmt: skip
    labels = [text.get_text() for axis in (share, answered, ejected) for text in axis.get_legend().get_texts()]
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return labels


if __name__ == "__main__":
    sys.exit(main())
