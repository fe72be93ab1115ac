"""The created VPC's layout, as numbers: what the stack builds, Cilium's strict mode and the datapath
model (checks/datapath.py) read. Standard library only.

The subnets are allocated one after the other in this order (aws_ec2.Vpc): three public /22 (the NAT
gateways, the NLB, the VPC's resolver at .2), three /26 for the control plane's ENIs (and the kubectl
provider's Lambda), three /19 held free, and the three node /19 last, which together are NODE_CIDR
and hold nothing else: nodes, and with datapath eni every pod (Cilium's operator makes pods' ENIs only
in subnets tagged NODE_SUBNET_TAG). WireGuard's strict mode drops unencrypted pod traffic to
NODE_CIDR, so the resolver and the API server's ENIs must lie outside it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

VPC_CIDR = "10.0.0.0/16"
VPC_RESOLVER = "10.0.0.2"  # the VPC's base address plus two (Amazon VPC, "DNS attributes")
CONTROL_PLANE_SUBNETS, NODE_SUBNETS = "ControlPlane", "Private"
NODE_CIDR = "10.0.128.0/17"
# Only on the node subnets (aws_eks_v2 tags every private subnet kubernetes.io/role/internal-elb).
NODE_SUBNET_TAG = ("cilium-mesh.eks/pod-subnet", "1")
# WireGuard between the nodes: Cilium's fixed listen port (pkg/wireguard/types ListenPort; no setting).
WIREGUARD_PORT = 51871


def covering_cidr(cidrs: Iterable[str]) -> str:
    """The smallest CIDR that holds every one of ``cidrs``."""
    networks = [ipaddress.ip_network(c) for c in cidrs]
    network = networks[0]
    while not all(n.subnet_of(network) for n in networks):
        network = network.supernet()
    return str(network)
