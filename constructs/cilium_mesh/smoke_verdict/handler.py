"""The smoke test's verdict as the deploy's outcome: "pass" succeeds, any other line fails the stack with it.

Inline Lambda code (CloudFormation provides the cfnresponse module to ZipFile code). The verdict is
read in the cluster by the kubectl provider (a KubernetesObjectValue); this only relays it.
"""

import cfnresponse


def handler(event, context):
    verdict = event["ResourceProperties"].get("Verdict", "")
    if event["RequestType"] == "Delete" or verdict == "pass":
        cfnresponse.send(event, context, cfnresponse.SUCCESS, {}, "smoke-test")
    else:
        reason = f"smoke test failed: {verdict}"[:1000]
        cfnresponse.send(event, context, cfnresponse.FAILED, {}, "smoke-test", reason=reason)
