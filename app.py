#!/usr/bin/env python3
"""CDK app: Cilium service mesh on Amazon EKS. Configuration: cdk.json context (see README)."""

import aws_cdk as cdk

from stacks.cilium_eks_stack import CiliumEksStack
from stacks.config import load_config_or_exit

app = cdk.App()
config = load_config_or_exit(app.node.get_all_context())
CiliumEksStack(app, "CiliumMeshEks", config=config)
app.synth()
