"""Bad input: every case fails with one line that names the key; through app.py also no traceback, nothing written."""

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aws_cdk
import pytest
from conftest import CONTEXT, ROOT
from stacks.config import INSTANCE_FAMILIES, KEYS, ConfigError, ec2_instance_types, load_config
from cilium_mesh.rollout_plan import RolloutSettings

# Also run through the real app.py (a subprocess each): one of every kind of failure.
THROUGH_APP = [
    ("node_count", "²", "whole number from 2 to 50"),  # str.isdigit() is True, int() fails
    ("endpoint_public_cidrs", [3232235520], "not an IPv4 CIDR string"),  # IPv4Network would take the int
    ("node_instance_type", "t3.metal", "not an EC2 instance type"),
    ("traffic_weights", {"v1": 5000000000, "v2": 1}, "at most 4294967295"),
    ("cilium_version", "1.19.06", "write 1.19.6"),
    ("cluster_name", "cilium-mesh\n", "must start with a letter"),  # '$' would match before the newline
    ("kube_proxy", True, "removed: Cilium's Ingress needs kube-proxy replacement"),
    ("node_cout", 3, "not a configuration key"),
    ("services", [{"name": "payments", "namespace": "shop", "port": 80, "versions": {"v1": {"app": "payments"}},
                   "routes": [{"path_prefix": "/a", "to": "v1"}, {"path_prefix": "/b", "to": "v3"}]}],
     "services[payments].routes[1].to: version v3 is not declared"),
]

BAD = THROUGH_APP + [
    ("region", "us-west", "not an AWS region"),
    ("region", "US-WEST-2", "not an AWS region"),
    ("region", "us-west-2\n", "not an AWS region"),
    ("availability_zones", ["us-west-2a", "us-west-2b", "us-east-1c"], "not a zone of us-west-2"),
    ("availability_zones", ["us-west-2a", "us-west-2b"], "list of 3 different zones"),
    ("availability_zones", ["us-west-2a", "us-west-2a", "us-west-2b"], "listed twice"),
    ("cluster_name", "my_cluster!", "must start with a letter"),
    ("cluster_name", "1cluster", "must start with a letter"),
    ("cluster_name", "c" * 101, "at most 100"),
    ("kubernetes_version", "1.29", "retired on EKS"),
    ("kubernetes_version", "1.31", "extended support ended 2026-11-26"),
    ("kubernetes_version", "1.99", "not an EKS version"),
    ("kubernetes_version", "latest", "supported: 1.32, 1.33, 1.34, 1.35, 1.36"),
    ("kubernetes_version", "1.35\n", "not an EKS version"),
    ("kubernetes_version", 1.35, "must be a string"),
    ("kubernetes_version", 1.3, "1.30 would read as 1.3"),
    ("cilium_version", "1.14.7", "end-of-life"),
    ("cilium_version", "1.19.99", "not published"),
    ("cilium_version", "1.25.0", "not published"),
    ("cilium_version", "v1.19", "not a release"),
    ("cilium_version", "01.19.6", "write 1.19.6"),
    ("cilium_version", "v1.19.6", "write 1.19.6"),
    ("cilium_version", "1.19.6\n", "not a release"),
    ("node_instance_type", "x9z.large", "x86_64 family"),
    ("node_instance_type", "m7g.large", "x86_64 family"),
    ("node_instance_type", "m6i.0xlarge", "not an EC2 instance type"),
    ("node_instance_type", "t3.medium", "<large|xlarge|Nxlarge|metal|metal-Nxl>"),
    ("node_instance_type", "m6i.large\n", "x86_64 family"),
    ("node_count", 0, "whole number from 2 to 50"),
    ("node_count", 1, "whole number from 2 to 50"),
    ("node_count", 51, "whole number from 2 to 50"),
    ("node_count", "three", "whole number from 2 to 50"),
    ("node_count", True, "whole number from 2 to 50"),
    ("node_count", 2.5, "whole number from 2 to 50"),
    ("node_count", "  3 ", "whole number from 2 to 50"),
    ("node_count", "9" * 5000, "whole number from 2 to 50"),  # int() refuses more than 4300 digits
    ("admin_principal_arn", "", "IAM role or user ARN"),
    ("admin_principal_arn", "arn:aws:iam::12345:role/x", "IAM role or user ARN"),
    ("admin_principal_arn", "arn:aws:iam::123456789012:role/Admin\n", "IAM role or user ARN"),
    ("admin_principal_arn", "arn:aws:iam::123456789012:group/Admins", "IAM role or user ARN"),
    ("endpoint_public_cidrs", ["10.0.0.0/33"], "not an IPv4 CIDR"),
    ("endpoint_public_cidrs", ["203.0.113.7/24"], "host bits zero"),
    ("endpoint_public_cidrs", ["203.0.113.0/24\n"], "not an IPv4 CIDR"),
    ("endpoint_public_cidrs", [], "list of 1 to 40"),
    ("endpoint_public_cidrs", [f"198.51.{i}.0/24" for i in range(41)], "list of 1 to 40 (the EKS limit)"),
    ("endpoint_public_cidrs", ["198.51.100.0/24", "198.51.100.0/255.255.255.0"], "listed twice"),
    ("endpoint_public_cidrs", "203.0.113.0/24", "must be a list"),
    ("endpoint_public_cidrs", "[" + "1" * 5000 + "]", "must be a list"),  # JSON too long to read as a number
    ("traffic_weights", {"v1": -10, "v2": 110}, "non-negative integer"),
    ("traffic_weights", {"v1": 0, "v2": 0}, "positive sum"),
    ("traffic_weights", {"v1": 50, "v3": 50}, "version v3 is not declared"),
    ("traffic_weights", {"V_1": 100}, "version V_1 is not declared"),
    ("traffic_weights", {"v1": 50.5, "v2": 49.5}, "non-negative integer"),
    ("traffic_weights", '{"v1": 90, "v2": 10', "must map versions to weights"),
    ("traffic_weights", [50, 50], "must map versions to weights"),
    ("network_policy", "maybe", "true or false"),
    ("network_policy", 1, "true or false"),
    ("datapath", "cni-chaining", "must be one of chaining, eni"),
    ("datapath", "ENI", "must be one of chaining, eni"),
    ("datapath", True, "must be one of chaining, eni"),
    ("kube_proxy", "false", "removed"),
    ("metrics", "yes", "true or false"),
    ("metrics", None, "missing from cdk.json"),
    ("alert_email", "oncall", "e-mail address"),
    ("alert_email", "oncall@localhost", "e-mail address"),
    ("alert_email", "oncall@example.com\n", "e-mail address"),
    ("alert_email", "on call@example.com", "e-mail address"),
    ("alert_email", ["oncall@example.com"], "e-mail address"),
    ("smoke_test", "sometimes", "true or false"),
    ("rollout", "fast", "must be null or an object"),
    ("rollout", '{"steps": [10, 100]', "must be null or an object"),
    ("rollout", {"step": [10, 100]}, "'step' is not a rollout setting"),
    ("rollout", {"steps": [50, 10, 100]}, "rising whole percentages"),
    ("rollout", {"steps": [10, 50]}, "ending at 100"),
    ("rollout", {"steps": [0, 100]}, "rising whole percentages"),
    ("rollout", {"steps": "10,100"}, "rising whole percentages"),
    ("rollout", {"pause_s": 60}, "at least 180"),
    ("rollout", {"pause_s": 300.5}, "whole seconds"),
    ("rollout", {"pause_s": 1200}, "may take 4800 s, more than the 3000 s"),
    ("rollout", {"max_error_ratio": 1.5}, "from 0 to below 1"),
    ("rollout", {"max_error_ratio": True}, "from 0 to below 1"),
    ("rollout", {"max_p99_ms": 0}, "whole milliseconds"),
    ("rollout", {"min_request_rate": 0}, "above 0"),
    ("existing_cluster", "walkthrough", "must be null or an object"),
    ("sample_app", "no", "true or false"),
    ("encryption", "ipsec", "must be null, wireguard or none"),
    ("cilium_version", "1.18.5", "with encryption wireguard fragments L7 proxy traffic in native routing (cilium/cilium#42837, fixed in 1.18.6"),
    ("services", {"name": "payments"}, "must be a list of services"),
    ("services", [{"name": "catalogdetail", "namespace": "workshop", "port": 3000, "versions": {"x": {"app": "x"}}}],
     "workshop/catalogdetail is also declared by services[catalogdetail]"),
]


def test_alert_email_needs_metrics():
    with pytest.raises(ConfigError, match=r"^alert_email: needs metrics true"):
        load_config({**CONTEXT, "metrics": False, "alert_email": "oncall@example.com"})
    config = load_config({**CONTEXT, "metrics": "false", "alert_email": None})
    assert (config.metrics, config.alert_email) == (False, None)
    assert load_config({**CONTEXT, "alert_email": "oncall@example.com"}).alert_email == "oncall@example.com"


def test_rollout_needs_metrics_and_fills_in_defaults():
    with pytest.raises(ConfigError, match=r"^rollout: needs metrics true"):
        load_config({**CONTEXT, "metrics": False, "rollout": {}})
    assert load_config(CONTEXT).service("workshop/catalogdetail").rollout is None
    rollout = load_config({**CONTEXT, "rollout": '{"steps": [25, 100], "pause_s": 600}'}).service("workshop/catalogdetail").rollout
    assert rollout == RolloutSettings(steps=(25, 100), pause_s=600, max_error_ratio=0.05, max_p99_ms=500, min_request_rate=0.5)


def case_id(case) -> str:
    key, value, _ = case
    shown = repr(value)
    return f"{key}={shown if len(shown) <= 40 else shown[:37] + '...'}"


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=map(case_id, BAD))
def test_bad_value_is_one_line_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as raised:
        load_config({**CONTEXT, key: value})
    message = str(raised.value)
    assert message.startswith((f"{key}: ", f"{key}[")), message
    assert expected in message, message
    assert "\n" not in message


def run_app(context: dict, outdir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(context), "CDK_OUTDIR": str(outdir)}
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def app_runs() -> list:
    """Each THROUGH_APP configuration through the real app.py, two at a time, each into an empty directory."""

    def run(case):
        key, value, _ = case
        outdir = Path(tempfile.mkdtemp(prefix="bad-"))
        return run_app({**CONTEXT, key: value}, outdir), outdir

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, THROUGH_APP))


@pytest.mark.parametrize("index", range(len(THROUGH_APP)), ids=map(case_id, THROUGH_APP))
def test_bad_value_stops_app_py_with_one_line_and_writes_nothing(app_runs, index):
    key, _, expected = THROUGH_APP[index]
    result, outdir = app_runs[index]
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip() and "!!" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith((f"Configuration error: {key}: ", f"Configuration error: {key}[")), lines[0]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert list(outdir.iterdir()) == []


def test_catalogue_has_at_least_forty_cases_covering_every_key():
    assert len(BAD) >= 40
    assert {key for key, _, _ in BAD} >= set(KEYS)


def test_missing_key_is_named():
    context = {k: v for k, v in CONTEXT.items() if k != "node_count"}
    with pytest.raises(ConfigError, match=r"^node_count: missing from cdk.json context"):
        load_config(context)


def test_command_line_strings_are_read_like_cdk_json():
    """`cdk deploy -c node_count=3 -c traffic_weights='{"v1":90,"v2":10}'` passes strings."""
    context = {
        **CONTEXT,
        "node_count": "3",
        "network_policy": "false",
        "traffic_weights": '{"v1": 90, "v2": 10}',
        "endpoint_public_cidrs": '["203.0.113.0/24"]',
    }
    config = load_config(context)
    assert config.node_count == 3 and config.network_policy is False
    assert dict(config.service("workshop/catalogdetail").weights) == {"v1": 90, "v2": 10}
    assert config.endpoint_public_cidrs == ("203.0.113.0/24",)


def test_cidrs_come_back_as_ipv4network_writes_them():
    config = load_config({**CONTEXT, "endpoint_public_cidrs": ["192.0.2.1", "198.51.100.0/255.255.255.0"]})
    assert config.endpoint_public_cidrs == ("192.0.2.1/32", "198.51.100.0/24")


@pytest.mark.parametrize("name", ["Cilium-Mesh", "cilium-mesh-" + "x" * 21, "mesh-"])
def test_eni_datapath_needs_a_cluster_name_ciliums_chart_accepts(name):
    """Fine for EKS, but not as Cilium's cluster.name (lowercase, at most 32, no trailing '-')."""
    assert load_config({**CONTEXT, "cluster_name": name, "datapath": "chaining"}).cluster_name == name
    with pytest.raises(ConfigError, match=r"^cluster_name: .* with datapath eni"):
        load_config({**CONTEXT, "cluster_name": name})


def test_instance_types_are_checked_against_botocores_ec2_model():
    assert load_config({**CONTEXT, "node_instance_type": "m7i.metal-24xl"}).node_instance_type == "m7i.metal-24xl"
    for family in INSTANCE_FAMILIES:
        assert f"{family}.large" in ec2_instance_types(), family


def test_instance_types_are_the_ones_botocores_loader_reads():
    """The direct read of the model file must match botocore's own Loader (same API version, same enum)."""
    from botocore.loaders import Loader

    model = Loader().load_service_model("ec2", "service-2")
    assert ec2_instance_types() == frozenset(model["shapes"]["InstanceType"]["enum"])


def test_cdk_cli_context_keys_are_accepted_and_ignored():
    """`cdk acknowledge 12345` and `cdk cli-telemetry --disable` write these to cdk.context.json."""
    context = {**CONTEXT, "acknowledged-issue-numbers": [12345], "notices": False, "cli-telemetry": False}
    assert load_config(context) == load_config(CONTEXT)


def test_defaults_in_cdk_json_are_valid_and_complete():
    assert {key for key in CONTEXT if ":" not in key and "/" not in key} == set(KEYS)
    config = load_config(CONTEXT)
    assert config.kubernetes_version == "1.35" and config.region == "us-west-2"
    assert dict(config.service("workshop/catalogdetail").weights) == {"v1": 50, "v2": 50}
    # eni by default: the datapath in which every shipped path delivers without masquerading (checks/datapath.py).
    assert config.datapath == "eni"


@pytest.mark.slow
def test_cdk_json_carries_aws_cdk_libs_recommended_feature_flags():
    """What `cdk init` puts in a new app's cdk.json, from the installed aws-cdk-lib itself."""
    library = next((Path(aws_cdk.__file__).parent / "_jsii").glob("aws-cdk-lib@*.jsii.tgz"))
    with tarfile.open(library) as package:
        recommended = json.load(package.extractfile("package/recommended-feature-flags.json"))
    assert {key: CONTEXT.get(key) for key in recommended} == recommended


def test_encryption_is_wireguard_with_eni_and_refused_with_chaining():
    assert load_config(CONTEXT).encryption == "wireguard"  # eni, cdk.json's null
    assert load_config({**CONTEXT, "datapath": "chaining"}).encryption == "none"
    assert load_config({**CONTEXT, "encryption": "none"}).encryption == "none"
    with pytest.raises(ConfigError, match=r"^encryption: wireguard needs datapath eni: .*cilium/cilium#15596"):
        load_config({**CONTEXT, "datapath": "chaining", "encryption": "wireguard"})
    assert load_config({**CONTEXT, "cilium_version": "1.18.5", "encryption": "none"}).cilium_version == "1.18.5"
    assert load_config({**CONTEXT, "cilium_version": "1.18.6"}).encryption == "wireguard"
