"""Benchmark: the two test tiers' wall time against their budgets, as scripts/test.sh runs them.

The fast tier (`-m fast`: no Envoy, Prometheus, helm, CDK CLI or cfn-lint) is the inner loop: at
least MIN_FAST_TESTS tests in at most FAST_BUDGET_S. The full suite (what CI runs) has FULL_BUDGET_S
on a 2-core machine. Prints a table; a run over its budget is marked.

    python -m tools.bench_suite [--runs 1] [--fast-only]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_BUDGET_S, FULL_BUDGET_S, MIN_FAST_TESTS = 20.0, 150.0, 100


def run_tier(args: list[str]) -> tuple[float, int, str]:
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / "test.sh"), "-p", "no:cacheprovider", *args], cwd=ROOT,
                            capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.monotonic() - started
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    passed = re.search(r"(\d+) passed", summary)
    return seconds, int(passed.group(1)) if passed else 0, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--fast-only", action="store_true")
    args = parser.parse_args(argv)
    tiers = [("fast", ["-m", "fast"], FAST_BUDGET_S)] + ([] if args.fast_only else [("full", [], FULL_BUDGET_S)])
    print(f"{'tier':<6} {'tests':>6} {'median s':>9} {'budget s':>9}  verdict")
    for name, tier_args, budget in tiers:
        runs = [run_tier(tier_args) for _ in range(args.runs)]
        median = statistics.median(seconds for seconds, _, _ in runs)
        tests = runs[-1][1]
        ok = median <= budget and (name != "fast" or tests >= MIN_FAST_TESTS) and all(t for _, t, _ in runs)
        print(f"{name:<6} {tests:>6} {median:>9.1f} {budget:>9.0f}  {'within' if ok else 'OVER: ' + runs[-1][2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
