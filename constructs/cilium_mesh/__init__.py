"""CiliumMesh: Cilium, the sample app, its Ingress, traffic and network policy on an EKS cluster.

The construct is loaded on first use (PEP 562), so that the configuration and the traffic policy,
which need no aws-cdk-lib, import without the CDK's runtime: a bad setting stops app.py at once.
"""

from .traffic import CircuitBreakers, OutlierDetection, Retries, MeshService, DeclarationError

__all__ = ["CircuitBreakers", "CiliumMesh", "CiliumMeshProps", "OutlierDetection", "Retries", "MeshService", "DeclarationError"]


def __getattr__(name: str):
    if name in ("CiliumMesh", "CiliumMeshProps"):
        from . import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
