"""Commands a user runs from the repository root as `python -m tools.<name>`: preview, measure, render, benchmark."""

import stacks  # noqa: F401  (puts constructs/ on the import path)
