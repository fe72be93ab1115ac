"""Developer tools: preview, benchmarks, checks. Run from the repository root as `python -m tools.<name>`."""

import stacks  # noqa: F401  (puts constructs/ on the import path)
