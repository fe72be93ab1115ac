"""CiliumMesh: Cilium and the declared services (MeshService) on an EKS cluster, and optionally the sample app.

The construct is loaded on first use (PEP 562), so that the configuration and the traffic policy,
which need no aws-cdk-lib, import without the CDK's runtime: a bad setting stops app.py at once.
"""

from .rollout_plan import RolloutLoad, RolloutSettings
from .traffic import Caller, CircuitBreakers, DeclarationError, HttpRule, MeshService, Mirror, OutlierDetection, Retries, Route

__all__ = ["Caller", "CircuitBreakers", "CiliumMesh", "CiliumMeshProps", "DeclarationError", "HttpRule", "MeshService",
           "Mirror", "OutlierDetection", "Retries", "RolloutLoad", "RolloutSettings", "Route"]


def __getattr__(name: str):
    if name in ("CiliumMesh", "CiliumMeshProps"):
        from . import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
