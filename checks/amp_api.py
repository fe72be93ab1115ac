"""What AMP's API receives for a CloudFormation property: the documents as the collector, ruler and alert manager read them.

CloudFormation's APS handlers hand a property's string to the SDK as its bytes (``[]byte(*model.Data)``
in aws-cloudformation-resource-providers-aps, aws-aps-workspace and aws-aps-rulegroupsnamespace
cmd/resource/resource.go; the same for the scraper's ConfigurationBlob, as AWS::APS::Scraper's
example and Terraform's aws_prometheus_scraper show). The SDK then serializes the request in AMP's
protocol, where each of these members is a ``blob``: base64 in the JSON body. Here botocore's own AMP
service model does that serialization, and the body is decoded as AMP decodes it, so a test checks
exactly the document AMP would get from the template's text.
"""

from __future__ import annotations

import base64
import json

import botocore.session
from botocore.serialize import create_serializer

WORKSPACE_ID = "ws-0123abcd-4567-89ef-0123-456789abcdef"
WORKSPACE_ARN = f"arn:aws:aps:us-west-2:123456789012:workspace/{WORKSPACE_ID}"
CLUSTER_ARN = "arn:aws:eks:us-west-2:123456789012:cluster/cilium-mesh"


def _received(operation: str, params: dict, blob_path: tuple[str, ...]) -> bytes:
    model = botocore.session.get_session().get_service_model("amp")
    request = create_serializer(model.metadata["protocol"]).serialize_to_request(params, model.operation_model(operation))
    value = json.loads(request["body"])
    for key in blob_path:
        value = value[key]
    return base64.b64decode(value, validate=True)


def scrape_configuration(property_text: str) -> bytes:
    """CreateScraper's scrapeConfiguration as the collector reads it, from ScrapeConfiguration.ConfigurationBlob."""
    params = {
        "scrapeConfiguration": {"configurationBlob": property_text.encode()},
        "source": {"eksConfiguration": {"clusterArn": CLUSTER_ARN, "subnetIds": ["subnet-0123456789abcdef0"]}},
        "destination": {"ampConfiguration": {"workspaceArn": WORKSPACE_ARN}},
        "clientToken": "cloudformation",
    }
    return _received("CreateScraper", params, ("scrapeConfiguration", "configurationBlob"))


def rule_groups(property_text: str) -> bytes:
    """CreateRuleGroupsNamespace's data as the ruler reads it, from AWS::APS::RuleGroupsNamespace Data."""
    params = {"workspaceId": WORKSPACE_ID, "name": "rules", "data": property_text.encode(), "clientToken": "cloudformation"}
    return _received("CreateRuleGroupsNamespace", params, ("data",))


def alert_manager_definition(property_text: str) -> bytes:
    """CreateAlertManagerDefinition's data, from AWS::APS::Workspace AlertManagerDefinition."""
    params = {"workspaceId": WORKSPACE_ID, "data": property_text.encode(), "clientToken": "cloudformation"}
    return _received("CreateAlertManagerDefinition", params, ("data",))
