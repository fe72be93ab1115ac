"""Stacks of this app.

The construct library lives in ``constructs/cilium_mesh``. ``constructs/`` is a
source folder, not a package (it has no ``__init__.py``): a package named
``constructs`` here would shadow the ``constructs`` library that aws-cdk-lib
imports. Its folder goes on the import path as ``cilium_mesh``'s root.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CONSTRUCTS_ROOT = str(ROOT / "constructs")
if _CONSTRUCTS_ROOT not in sys.path:
    sys.path.append(_CONSTRUCTS_ROOT)


def cdk_json_context() -> dict:
    """The configuration in cdk.json, for tools and tests that run without the CDK CLI."""
    return json.loads((ROOT / "cdk.json").read_text())["context"]
