"""Bad input: every case fails synth with one line that names the key, no traceback, nothing written."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CONTEXT, ROOT
from stacks.config import KEYS, ConfigError, load_config

BAD = [
    ("kubernetes_version", "1.29", "retired on EKS"),
    ("kubernetes_version", "1.99", "not an EKS version"),
    ("kubernetes_version", "latest", "supported: 1.32, 1.33, 1.34, 1.35, 1.36"),
    ("cilium_version", "1.14.7", "end-of-life"),
    ("cilium_version", "1.19.99", "not published"),
    ("cilium_version", "1.25.0", "not published"),
    ("cilium_version", "v1.19", "not a release"),
    ("endpoint_public_cidrs", ["10.0.0.0/33"], "not an IPv4 CIDR"),
    ("endpoint_public_cidrs", ["203.0.113.7/24"], "host bits zero"),
    ("endpoint_public_cidrs", [], "non-empty list"),
    ("node_count", 0, "whole number from 2 to 50"),
    ("node_count", "three", "whole number from 2 to 50"),
    ("node_count", 1, "whole number from 2 to 50"),
    ("node_instance_type", "x9z.large", "x86_64 family"),
    ("node_instance_type", "m7g.large", "x86_64 family"),
    ("traffic_weights", {"v1": -10, "v2": 110}, "non-negative integer"),
    ("traffic_weights", {"v1": 0, "v2": 0}, "positive sum"),
    ("traffic_weights", {"v1": 50, "v3": 50}, "no Service catalogdetailv3"),
    ("traffic_weights", {"V_1": 100}, "DNS-1123"),
    ("traffic_weights", {"v1": 50.5, "v2": 49.5}, "non-negative integer"),
    ("cluster_name", "my_cluster!", "cluster_name"),
    ("admin_principal_arn", "", "IAM role or user ARN"),
    ("admin_principal_arn", "arn:aws:iam::12345:role/x", "IAM role or user ARN"),
    ("region", "us-west", "not an AWS region"),
    ("region", "US-WEST-2", "not an AWS region"),
    ("availability_zones", ["us-west-2a", "us-west-2b", "us-east-1c"], "not a zone of us-west-2"),
    ("availability_zones", ["us-west-2a", "us-west-2b"], "list of 3 different zones"),
    ("kube_proxy", "maybe", "true or false"),
    ("node_cout", 3, "not a configuration key"),
]


def run_app(context: dict, outdir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(context), "CDK_OUTDIR": str(outdir)}
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Each bad configuration through the real app.py, two at a time."""

    def run(case):
        key, value, _ = case
        outdir = tmp_path_factory.mktemp("bad")
        return run_app({**CONTEXT, key: value}, outdir), outdir

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(range(len(BAD)), pool.map(run, BAD)))


@pytest.mark.parametrize("index", range(len(BAD)), ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_fails_synth_with_one_clear_line(bad_runs, index):
    key, _, expected = BAD[index]
    result, outdir = bad_runs[index]
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip() and "!!" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Configuration error: {key}: "), lines[0]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert list(outdir.iterdir()) == []


def test_catalogue_covers_at_least_fifteen_cases_and_every_required_kind():
    assert len(BAD) >= 15
    covered = {key for key, _, _ in BAD}
    assert covered >= {
        "kubernetes_version", "cilium_version", "endpoint_public_cidrs", "node_count", "node_instance_type",
        "traffic_weights", "cluster_name", "admin_principal_arn", "region", "availability_zones",
    }  # fmt: skip


def test_missing_key_is_named():
    context = {k: v for k, v in CONTEXT.items() if k != "node_count"}
    with pytest.raises(ConfigError, match=r"^node_count: missing from cdk.json context"):
        load_config(context)


def test_command_line_strings_are_read_like_cdk_json():
    """`cdk deploy -c node_count=3 -c traffic_weights='{"v1":90,"v2":10}'` passes strings."""
    context = {
        **CONTEXT,
        "node_count": "3",
        "kube_proxy": "true",
        "traffic_weights": '{"v1": 90, "v2": 10}',
        "endpoint_public_cidrs": '["203.0.113.0/24"]',
    }
    config = load_config(context)
    assert config.node_count == 3 and config.kube_proxy is True
    assert dict(config.traffic_policy.weights) == {"v1": 90, "v2": 10}
    assert config.endpoint_public_cidrs == ("203.0.113.0/24",)


def test_defaults_in_cdk_json_are_valid_and_complete():
    assert set(CONTEXT) == set(KEYS)
    config = load_config(CONTEXT)
    assert config.kubernetes_version == "1.35" and config.region == "us-west-2"
    assert dict(config.traffic_policy.weights) == {"v1": 50, "v2": 50}
