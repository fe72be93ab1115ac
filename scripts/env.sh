# Sourced by the other scripts: the venv (with its Node.js) and the pinned CDK CLI on PATH.
source .venv/bin/activate
export PATH="$PWD/node_modules/.bin:$PATH"
