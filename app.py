#!/usr/bin/env python3
"""CDK app: Cilium service mesh on Amazon EKS. Configuration: cdk.json context (see README).

cdk-nag's AwsSolutions checks run as a validation plugin, so `cdk synth` fails on any finding
the stack does not acknowledge.
"""

from stacks.config import cli_context, load_config_or_exit

# A bad value stops here, before the CDK's Node.js runtime starts (about 3 s); cdk.App reads the same context.
context = cli_context()
config = load_config_or_exit(context) if context is not None else None

import aws_cdk as cdk  # noqa: E402
from cdk_nag import AwsSolutionsChecks  # noqa: E402

from stacks.cilium_eks_stack import CiliumEksStack  # noqa: E402

app = cdk.App()
config = config or load_config_or_exit(app.node.get_all_context())
cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
CiliumEksStack(app, "CiliumMeshEks", config=config)
app.synth()
