"""CiliumMesh: Cilium, the sample app, its Ingress, traffic and network policy on an EKS cluster."""

from .mesh import CiliumMesh, CiliumMeshProps
from .traffic import CircuitBreakers, OutlierDetection, RetryPolicy, TrafficPolicy, TrafficPolicyError

__all__ = ["CircuitBreakers", "CiliumMesh", "CiliumMeshProps", "OutlierDetection", "RetryPolicy", "TrafficPolicy", "TrafficPolicyError"]
