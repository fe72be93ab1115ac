#!/usr/bin/env bash
# The test suite (-m fast: the inner loop, no Envoy, Prometheus, helm, CDK CLI or cfn-lint;
# nothing: everything, what CI runs): template assertions and snapshot, dependency order,
# Kubernetes schemas, cfn-lint, cdk-nag, the CDK CLI, and the traffic policy
# in a real Envoy on loopback. Run scripts/setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m pytest "$@"
