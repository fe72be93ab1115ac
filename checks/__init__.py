"""The machinery that verifies the stack offline: provider dry run, readiness, schemas, chart values,
cilium-envoy's Envoy and its loopback harness, and the datapath model. Used by tests/ and tools/."""

import stacks  # noqa: F401  (puts constructs/ on the import path)
