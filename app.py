#!/usr/bin/env python3
"""CDK app: Cilium service mesh on Amazon EKS. Configuration: cdk.json context (see README).

cdk-nag's AwsSolutions checks run as a validation plugin, so `cdk synth` fails on any finding
the stack does not acknowledge.
"""

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from stacks.cilium_eks_stack import CiliumEksStack
from stacks.config import load_config_or_exit

app = cdk.App()
config = load_config_or_exit(app.node.get_all_context())
cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
CiliumEksStack(app, "CiliumMeshEks", config=config)
app.synth()
