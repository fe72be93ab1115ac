"""Custom resource handler: on Delete, delete the detached ENIs Cilium's operator created for the cluster.

Runs after the node group is gone, when no operator is left to collect them. ENIs
still attached (an instance still terminating) are waited for until shortly
before the Lambda's own timeout; if any remain, the delete fails and says which,
rather than leaving the VPC's deletion to fail later without naming them.
"""

import time

import boto3
from botocore.exceptions import ClientError

MANAGED_TAG = ("io.cilium/cilium-managed", "true")
CLUSTER_NAME_TAG = "io.cilium/cluster-name"
POLL_SECONDS = 10
# Left for the last describe and the response when the Lambda's time runs out.
MARGIN_SECONDS = 60


def cilium_enis(ec2, cluster_name: str) -> list[dict]:
    """Every ENI tagged as Cilium's for this cluster, any status."""
    filters = [
        {"Name": f"tag:{MANAGED_TAG[0]}", "Values": [MANAGED_TAG[1]]},
        {"Name": f"tag:{CLUSTER_NAME_TAG}", "Values": [cluster_name]},
    ]
    enis = []
    for page in ec2.get_paginator("describe_network_interfaces").paginate(Filters=filters):
        enis.extend(page["NetworkInterfaces"])
    return enis


def delete_detached(ec2, cluster_name: str, deadline: float, clock=time.monotonic, sleep=time.sleep) -> list[str]:
    """Delete every detached Cilium ENI of the cluster until none is left; the IDs deleted."""
    deleted = []
    while True:
        enis = cilium_enis(ec2, cluster_name)
        for eni in enis:
            if eni["Status"] != "available":
                continue
            try:
                ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
            except ClientError as error:
                if error.response["Error"]["Code"] != "InvalidNetworkInterfaceID.NotFound":
                    raise
            deleted.append(eni["NetworkInterfaceId"])
        attached = sorted(e["NetworkInterfaceId"] for e in enis if e["Status"] != "available")
        if not attached:
            return deleted
        if clock() + POLL_SECONDS > deadline:
            raise RuntimeError(
                f"Cilium ENIs of cluster {cluster_name} still attached: {', '.join(attached)}; "
                "detach or delete them, then delete the stack again"
            )
        sleep(POLL_SECONDS)


def on_event(event, context):
    cluster_name = event["ResourceProperties"]["ClusterName"]
    if event["RequestType"] == "Delete":
        deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - MARGIN_SECONDS
        deleted = delete_detached(boto3.client("ec2"), cluster_name, deadline)
        print(f"deleted {len(deleted)} detached Cilium ENIs of {cluster_name}: {' '.join(deleted)}")
    return {"PhysicalResourceId": f"cilium-eni-cleanup-{cluster_name}"}
