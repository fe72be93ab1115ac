"""Metrics: the AMP resources, the scrape configuration and the rule file rendered for the declared services
checked by the real promtool and against AMP's quotas, the rules' unit tests (two services judged apart), and
the same rules in a real Prometheus over the real Envoy, where each fault sets off its alert."""

import base64
import datetime
import json
import math
import re
import shutil
import time

import pytest
import yaml
from cilium_mesh import MeshService
from cilium_mesh.declaration import MAX_SERVICES, sample_service
from cilium_mesh.manifests import CILIUM_VALUES_FILE, load_documents
from cilium_mesh.metrics_files import (
    AMP_RULE_FILE_MAX_BYTES,
    AMP_RULES_PER_WORKSPACE,
    DASHBOARD_FILE,
    METRICS_PORTS,
    RULES_NAMESPACE,
    SCRAPE_CONFIG_FILE,
    SCRAPER_RBAC_FILE,
    RuleFileError,
    rule_file,
    rule_file_usage,
)
from cilium_mesh.smoke_files import smoke_documents
from cilium_mesh.traffic import LOAD_HEADER
from conftest import CONTEXT, ROOT, manifest_documents, resolve_join, synth_of
from checks.cilium_envoy import build_for
from checks.envoy_harness import LOOPBACK, Fault, running, send
from checks.metrics_harness import (
    ALERT_BOUND_S,
    SCENARIOS,
    dashboard_queries,
    dashboard_variables,
    scraped_services,
    variable_queries,
)
from checks import amp_api
from checks.prometheus import amtool, promtool

RULES_TEST_FILE = ROOT / "tests" / "metrics" / "rules_test.yaml"
SAMPLE = sample_service()


def two_versions(name: str, namespace: str, port: int = 8080, weights: dict | None = None) -> MeshService:
    return MeshService(name=name, namespace=namespace, port=port, weights=weights,
                       versions={v: {"app": name, "version": v} for v in ("v1", "v2")})  # fmt: skip


# The second service of the promtool unit tests (tests/metrics/rules_test.yaml): another namespace, another split.
PAYMENTS = two_versions("payments", "shop", weights={"v1": 90, "v2": 10})
UNIT_TESTED = (SAMPLE, PAYMENTS)
# A service whose name begins the sample's, in its namespace: the closest names the rules must tell apart.
CATALOG = two_versions("catalog", "workshop")
TAG = build_for(CONTEXT["cilium_version"]).tag
# Labels the collector adds to every series (scrape-config.yaml): the job, and node and pod by relabelling.
SCRAPE_LABELS = {"job", "node", "pod"}
# Hubble's own labels after the context ones (pkg/hubble/metrics/http and drop handler.go).
HUBBLE_LABELS = {
    "hubble_http_requests_total": {"method", "protocol", "status", "reporter"},
    "hubble_http_request_duration_seconds_bucket": {"method", "reporter", "le"},
    "hubble_drop_total": {"reason", "protocol"},
}
HUBBLE_METRIC_OPTION = {"hubble_http_requests_total": "httpV2", "hubble_http_request_duration_seconds_bucket": "httpV2",
                        "hubble_drop_total": "drop"}  # fmt: skip


def rendered_rules(tmp_path, services=UNIT_TESTED):
    (tmp_path / "rules.yaml").write_text(rule_file(services, "wireguard"))
    return tmp_path / "rules.yaml"


@pytest.mark.prometheus
def test_scrape_configuration_passes_promtool():
    result = promtool("check", "config", str(SCRAPE_CONFIG_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.prometheus
def test_rule_file_passes_promtool(tmp_path):
    """What promtool counts is what the AMP quota check counts."""
    path = rendered_rules(tmp_path)
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # Per service 15 rules of service-rules.yaml and a weight per version; 5 over the namespaces; 4 of WireGuard.
    assert rule_file_usage(path.read_text()) == (path.stat().st_size, 2 * (15 + 2) + 5 + 4)
    assert f"SUCCESS: {2 * (15 + 2) + 5 + 4} rules found" in result.stdout


@pytest.mark.prometheus
def test_rules_unit_tests_pass_with_promtool(tmp_path):
    rendered_rules(tmp_path)
    shutil.copy(RULES_TEST_FILE, tmp_path / "rules_test.yaml")
    result = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_policy_drop_alert_leaves_out_exactly_the_smoke_tests_own_pods():
    """The alert's exception names the namespace and app labels the smoke test's two pods carry (the main
    one and the outsider): Hubble's source_app is the pod's app label, as no app.kubernetes.io/name or
    k8s-app label takes precedence."""
    jobs = [d for d in smoke_documents(UNIT_TESTED, "eni", True, True) if d["kind"] == "Job"]
    pods = set()
    for job in jobs:
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert not {"app.kubernetes.io/name", "k8s-app"} & set(labels)
        pods.add((job["metadata"]["namespace"], labels["app"]))
    assert len(pods) == 2
    (alert,) = [r for g in yaml.safe_load(rule_file(UNIT_TESTED))["groups"] for r in g["rules"]
                if r.get("alert") == "MeshNamespacePolicyDrops"]  # fmt: skip
    namespace, apps = re.search(r'\{source_namespace="([^"]+)", source_app=~"([^"]+)"\}', alert["expr"]).groups()
    assert {(namespace, app) for app in apps.split("|")} == pods


# Each a rule broken as a mistake would break it, and the unit test that notices.
BROKEN_RULES = {
    "the error budget raised from 5% to 50% lets 30% pass": (
        "> 0.05", "> 0.5", "alertname: MeshServiceErrorBudgetExceeded"),
    "the outsider no longer left out: its refusals at every deploy fire": (
        'source_app=~"smoke-test|smoke-test-outsider"', 'source_app=~"smoke-test"', "alertname: MeshNamespacePolicyDrops"),
    "catalogdetail's failures read without its selector: payments' errors move catalogdetail's": (
        'mesh_service:attempts_failed:rate2m{namespace="workshop", service="catalogdetail"}',
        "mesh_service:attempts_failed:rate2m", 'expr: "mesh_service:errors:ratio2m"'),
}  # fmt: skip


@pytest.mark.prometheus
@pytest.mark.parametrize("broken", BROKEN_RULES)
def test_rules_unit_tests_fail_when_a_rule_breaks(tmp_path, broken):
    text, replacement, noticed_by = BROKEN_RULES[broken]
    rules = rule_file(UNIT_TESTED)
    assert text in rules
    (tmp_path / "rules.yaml").write_text(rules.replace(text, replacement))
    shutil.copy(RULES_TEST_FILE, tmp_path / "rules_test.yaml")
    result = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert noticed_by in result.stdout + result.stderr


def test_each_service_records_its_own_configured_weights():
    groups = yaml.safe_load(rule_file((SAMPLE.with_weights({"v1": 70, "v2": 30}), PAYMENTS)))["groups"]
    weights = {(r["labels"]["service"], r["labels"]["version"]): r["expr"]
               for g in groups for r in g["rules"] if r.get("record") == "mesh_service:weight:ratio"}  # fmt: skip
    assert weights == {("catalogdetail", "v1"): "vector(0.7)", ("catalogdetail", "v2"): "vector(0.3)",
                       ("payments", "v1"): "vector(0.9)", ("payments", "v2"): "vector(0.1)"}  # fmt: skip


def test_every_rule_of_a_service_carries_its_namespace_and_name():
    """The generic series and alerts of any number of services are told apart by these two labels alone."""
    groups = yaml.safe_load(rule_file(UNIT_TESTED))["groups"]
    assert [g["name"] for g in groups] == ["workshop/catalogdetail", "shop/payments", "mesh-namespaces"]
    for service, group in zip(UNIT_TESTED, groups):
        for rule in group["rules"]:
            assert rule.get("record", "mesh_service:").startswith("mesh_service:")
            assert (rule["labels"]["namespace"], rule["labels"]["service"]) == (service.namespace, service.name)
    namespaces = groups[-1]["rules"][0]["expr"]
    assert 'destination_namespace=~"shop|workshop"' in namespaces


def many_services(count: int, versions: int, long_names: bool) -> list[MeshService]:
    """Distinct services; with long_names, the longest names a declaration allows (a DNS label of 63 for the
    namespace, and the name plus its longest version within 63)."""
    names = [f"s{i:03d}".ljust(60 if long_names else 4, "x") for i in range(count)]
    return [MeshService(name=name, namespace=name.ljust(63, "n") if long_names else "apps", port=8080,
                        versions={f"v{j}": {"app": name, "version": f"v{j}"} for j in range(1, versions + 1)})
            for name in names]  # fmt: skip


# Hundreds of services rendered and counted: seconds, so in the full tier.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("count", "versions", "long_names", "quota"),
    [(90, 2, True, "-byte rule groups namespace (quota L-C62641E3)"),
     (60, 20, False, "rules per workspace (quota L-3D15CDB4, adjustable)")],
    ids=["over the namespace's size", "over the workspace's rules"],
)  # fmt: skip
def test_the_rule_file_refuses_what_amp_would_refuse(count, versions, long_names, quota):
    """At synth, one line naming the quota, rather than a failed deploy."""
    services = many_services(count, versions, long_names=long_names)
    with pytest.raises(RuleFileError) as refused:
        rule_file(services)
    message = str(refused.value)
    assert "\n" not in message and quota in message and f"for {len(services)} services" in message


def test_the_most_services_a_deploy_carries_fit_in_amp():
    """declaration.MAX_SERVICES promises AMP's quotas: that many services of two versions, with the longest
    names, fit in the rule groups namespace and the workspace's rules."""
    size, rules = rule_file_usage(rule_file(many_services(MAX_SERVICES, 2, long_names=True)))
    assert size <= AMP_RULE_FILE_MAX_BYTES and rules <= AMP_RULES_PER_WORKSPACE


def input_series() -> list[tuple[str, set[str]]]:
    """(metric name, label names) of every input series in the promtool unit tests."""
    series = []
    for test in yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]:
        for item in test["input_series"]:
            name, _, labels = item["series"].partition("{")
            series.append((name, set(re.findall(r'(\w+)="', labels))))
    return series


@pytest.mark.envoy
def test_envoy_input_series_are_shaped_like_the_real_envoys():
    """Names and labels exactly as the real Envoy exposes them for the service's clusters, listener and route."""
    with running(SAMPLE, TAG) as (envoy, _, _):
        send((LOOPBACK, envoy.port), 50)
        envoy.get(envoy.admin, "/stats/prometheus")  # histograms are flushed on an interval
        exposed = envoy.get(envoy.admin, "/stats/prometheus")
    real = {}
    for line in exposed.splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.partition("{")
            real.setdefault(name, []).append(set(re.findall(r'(\w+)="', labels)))
    envoy_series = [(n, labels) for n, labels in input_series() if n.startswith("envoy_")]
    assert envoy_series
    for name, labels in envoy_series:
        assert labels - SCRAPE_LABELS in real.get(name, []), f"{name} with {sorted(labels - SCRAPE_LABELS)} not exposed"
    assert 'envoy_endpoint_hostname="catalogdetailv1.workshop.svc.cluster.local"' in exposed
    assert 'envoy_cluster_name="workshop/catalogdetail-traffic/catalogdetail-v2"' in exposed
    assert 'envoy_virtual_cluster="load",envoy_virtual_host="workshop/catalogdetail-traffic/catalogdetail"' in exposed


def test_hubble_input_series_carry_the_configured_context_labels():
    (values,) = load_documents(CILIUM_VALUES_FILE)
    options = dict(item.partition(":")[::2] for item in values["hubble"]["metrics"]["enabled"])
    for name, labels in input_series():
        if not name.startswith("hubble_"):
            continue
        context = set(re.search(r"labelsContext=([\w,]+)", options[HUBBLE_METRIC_OPTION[name]]).group(1).split(","))
        # An empty label is stored as no label: only a peer outside the cluster (the world has no
        # namespace, app or workload) leaves its labels out, and only that one peer's.
        assert labels - SCRAPE_LABELS <= context | HUBBLE_LABELS[name], name
        assert HUBBLE_LABELS[name] <= labels, name
        assert len({label.split("_")[0] for label in context - labels}) <= 1, name


def test_scraper_rbac_only_lists_pods():
    role, binding = load_documents(SCRAPER_RBAC_FILE)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["subjects"] == [{"kind": "User", "name": "aps-collector-user", "apiGroup": "rbac.authorization.k8s.io"}]
    jobs = load_documents(SCRAPE_CONFIG_FILE)[0]["scrape_configs"]
    assert {sd["role"] for job in jobs for sd in job["kubernetes_sd_configs"]} == {"pod"}


# --- the stack ----------------------------------------------------------------------------------


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_stack_stores_metrics_in_amp_with_the_files(request, datapath):
    synth = synth_of(request, datapath)
    metrics = synth.stack.metrics
    scraper = synth.resource(metrics.scraper)["Properties"]
    assert scraper["ScrapeConfiguration"]["ConfigurationBlob"] == SCRAPE_CONFIG_FILE.read_text()
    source = scraper["Source"]["EksConfiguration"]
    assert source["ClusterArn"] == {"Fn::GetAtt": [synth.logical_id(synth.stack.cluster), "Arn"]}
    private = {synth.logical_id(s) for s in synth.stack.private_subnets}
    assert {s["Ref"] for s in source["SubnetIds"]} == {f"{i}" for i in private}
    rules = synth.resource(metrics.rules)["Properties"]
    assert rules["Name"] == RULES_NAMESPACE
    assert rules["Data"] == rule_file(synth.stack.config.services, synth.stack.config.encryption)
    assert not synth.resources("AWS::Grafana::Workspace")


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_collector_reaches_only_the_metrics_ports_and_the_api_server(request, datapath):
    synth = synth_of(request, datapath)
    collector = synth.logical_id(synth.stack.metrics.scraper_security_group)
    cluster_sg = {"Fn::GetAtt": [synth.logical_id(synth.stack.cluster), "ClusterSecurityGroupId"]}
    ingress = [r["Properties"] for r in synth.resources("AWS::EC2::SecurityGroupIngress").values()
               if r["Properties"].get("SourceSecurityGroupId") == {"Fn::GetAtt": [collector, "GroupId"]}]  # fmt: skip
    egress = [r["Properties"] for r in synth.resources("AWS::EC2::SecurityGroupEgress").values()
              if r["Properties"]["GroupId"] == {"Fn::GetAtt": [collector, "GroupId"]}]  # fmt: skip
    expected = {("tcp", METRICS_PORTS[0], METRICS_PORTS[1]), ("tcp", 443, 443)}
    assert {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in ingress} == expected
    assert all(r["GroupId"] == cluster_sg for r in ingress)
    assert {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in egress} == expected
    assert all(r["DestinationSecurityGroupId"] == cluster_sg for r in egress)
    group = synth.resource(synth.stack.metrics.scraper_security_group)["Properties"]
    assert all(rule.get("CidrIp") != "0.0.0.0/0" for rule in group.get("SecurityGroupEgress", []))


TOPIC_ARN = "arn:aws:sns:us-west-2:123456789012:CiliumMeshEks-MetricsAlerts0123ABCD-0123abcd"


@pytest.mark.prometheus
def test_the_collector_gets_the_scrape_configuration_as_cloudformation_passes_it(synth, tmp_path):
    """The template's ConfigurationBlob, through the handler and the SDK's wire format to what the
    collector reads, passes promtool; the base64 text it once held is refused there."""
    blob = synth.resource(synth.stack.metrics.scraper)["Properties"]["ScrapeConfiguration"]["ConfigurationBlob"]
    assert isinstance(blob, str), "a plain string: no token can reach the collector's document"
    received = tmp_path / "scrape-config.yaml"
    received.write_bytes(amp_api.scrape_configuration(blob))
    result = promtool("check", "config", str(received))
    assert result.returncode == 0, result.stdout + result.stderr
    received.write_bytes(amp_api.scrape_configuration(base64.b64encode(blob.encode()).decode()))
    refused = promtool("check", "config", str(received))
    assert refused.returncode != 0 and "cannot unmarshal !!str" in refused.stdout + refused.stderr


@pytest.mark.prometheus
def test_the_ruler_gets_the_rule_file_as_cloudformation_passes_it(synth, tmp_path):
    data = synth.resource(synth.stack.metrics.rules)["Properties"]["Data"]
    received = tmp_path / "rules.yaml"
    received.write_bytes(amp_api.rule_groups(data))
    result = promtool("check", "rules", str(received))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.prometheus
def test_the_alert_manager_gets_a_configuration_amtool_accepts(synth, tmp_path):
    """AMP's definition format (the Alertmanager configuration under alertmanager_config), the topic's
    ARN in place of its token, as the workspace's handler passes it."""
    definition = synth.resource(synth.stack.metrics.workspace)["Properties"]["AlertManagerDefinition"]
    text = resolve_join(definition).replace("<TOKEN>", TOPIC_ARN)
    received = yaml.safe_load(amp_api.alert_manager_definition(text))
    assert set(received) == {"alertmanager_config"}
    (tmp_path / "alertmanager.yaml").write_text(received["alertmanager_config"])
    result = amtool("check-config", str(tmp_path / "alertmanager.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Found:" in result.stdout and "- 1 receivers" in result.stdout


def test_alerts_go_to_an_encrypted_topic_only_amp_of_this_workspace_may_publish_to(synth_eni):
    metrics = synth_eni.stack.metrics
    topic = synth_eni.resource(metrics.alerts_topic)["Properties"]
    assert "KmsMasterKeyId" in topic
    definition = yaml.safe_load(resolve_join(synth_eni.resource(metrics.workspace)["Properties"]["AlertManagerDefinition"]))
    alertmanager = yaml.safe_load(definition["alertmanager_config"])
    (receiver,) = alertmanager["receivers"]
    assert alertmanager["route"]["receiver"] == receiver["name"]
    assert {"namespace", "service"} <= set(alertmanager["route"]["group_by"]), "two services' alerts are notified apart"
    (sns,) = receiver["sns_configs"]
    assert sns["sigv4"] == {"region": CONTEXT["region"]} and sns["topic_arn"] == "<TOKEN>"
    (policy,) = synth_eni.resources("AWS::SNS::TopicPolicy").values()
    (allow,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert allow["Principal"] == {"Service": "aps.amazonaws.com"}
    assert allow["Condition"]["ArnEquals"]["aws:SourceArn"] == {"Fn::GetAtt": [synth_eni.logical_id(metrics.workspace), "Arn"]}
    assert not synth_eni.resources("AWS::SNS::Subscription")


def test_metrics_off_creates_no_amp_resource_and_an_email_subscribes(synth_variant, synth):
    assert not [r for r in synth_variant.template["Resources"].values() if r["Type"].startswith("AWS::APS::")]
    assert "PrometheusEndpoint" not in synth_variant.template["Outputs"]
    (subscription,) = synth.resources("AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == "oncall@example.com"


def test_the_collector_rbac_is_applied_before_the_scraper(synth_eni):
    metrics = synth_eni.stack.metrics
    applied = manifest_documents(synth_eni.resource(metrics.scraper_rbac))
    for document in applied:
        document["metadata"].pop("labels")  # CDK's prune label
    assert applied == load_documents(SCRAPER_RBAC_FILE)
    assert synth_eni.logical_id(metrics.scraper_rbac) in synth_eni.resource(metrics.scraper)["DependsOn"]


# --- the rules in a real Prometheus over the real Envoy (checks/metrics_harness.py) -----------------


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "healthy"])
def test_each_fault_sets_off_its_alerts_within_the_bound(alert_observations, scenario):
    observed = alert_observations[scenario]
    fired = observed["first_fired_s"]
    missing = set(observed["expected"]) - set(fired)
    assert not missing, f"{scenario}: {sorted(missing)} did not fire; fired: {fired}"
    late = {alert: s for alert, s in fired.items() if alert in observed["expected"] and s > ALERT_BOUND_S}
    assert not late, f"{scenario}: fired later than {ALERT_BOUND_S} s: {late}"
    assert not observed["unexpected"], f"{scenario}: also fired {observed['unexpected']}"


def test_nothing_fires_while_healthy(alert_observations):
    observed = alert_observations["healthy"]
    assert observed["first_fired_s"] == {}
    assert observed["statuses"] == {"200": observed["requests"]}


def test_recorded_share_is_within_the_measured_splits_interval(alert_observations):
    observed = alert_observations["healthy"]
    recorded = {r["metric"]["version"]: r["value"] for r in observed["recorded"]["mesh_service:share:ratio2m"]}
    assert set(recorded) == {"v1", "v2"}
    for version, share in recorded.items():
        low, high = observed["intervals"][version]
        assert low <= share <= high, f"{version}: recorded {share:.4f}, measured 95% interval [{low:.4f}, {high:.4f}]"


@pytest.mark.envoy
@pytest.mark.prometheus
def test_two_services_are_judged_apart_in_one_prometheus():
    """The sample and catalog (whose name begins the sample's, in its namespace), each in its own Envoy,
    scraped by one Prometheus with the one rule file for both: catalog's v2 answers 503 on half its
    requests and the sample alone gets the rollout's load; each service's series show its own traffic only."""
    with scraped_services((SAMPLE, CATALOG), TAG, {CATALOG.key: {"v2": Fault("errors", 0.5)}}) as (envoys, server):
        send((LOOPBACK, envoys[SAMPLE.key].port), 60, {LOAD_HEADER: "1"}, SAMPLE.check_path)
        send((LOOPBACK, envoys[CATALOG.key].port), 60, path=CATALOG.check_path)
        server.wait_for_evaluation_after(time.time())
        errors = {(r["metric"]["service"], r["metric"]["version"]): r["value"] for r in server.query("mesh_service:errors:ratio2m")}
        load = {r["metric"]["service"]: r["value"] for r in server.query("mesh_service:load_requests:rate2m")}
        assert server.rule_health() == []
    assert errors[("catalogdetail", "v1")] == errors[("catalogdetail", "v2")] == 0, errors
    assert errors[("catalog", "v2")] > 0.05 and errors[("catalog", "v1")] == 0, errors
    assert load["catalogdetail"] > 0 and load["catalog"] == 0, load


def test_rules_evaluate_without_errors(alert_observations):
    assert {name: o["rule_errors"] for name, o in alert_observations.items() if o["rule_errors"]} == {}


def test_every_dashboard_query_is_evaluated_and_the_envoy_ones_return_data(alert_observations):
    """Each panel's query as Grafana sends it with the sample chosen."""
    queries = dashboard_queries(SAMPLE)
    assert len(queries) == len(set(queries)) >= 10
    for expr in queries:
        results = [o["recorded"][expr] for o in alert_observations.values()]
        if expr.startswith("mesh_namespace:"):
            continue  # Hubble's: no cluster here (README); their rules are unit-tested above
        assert any(results), f"{expr}: no data in any scenario"


def test_the_dashboards_variables_offer_the_service(alert_observations):
    """Grafana lists the choices of $namespace, then $service, from the recorded weights (there with or
    without traffic): the harness's Prometheus offers exactly the sample's."""
    recorded = alert_observations["healthy"]["recorded"]
    variables = dashboard_variables(SAMPLE)
    for name, (selector, label) in variable_queries(SAMPLE).items():
        assert {r["metric"][label] for r in recorded[selector]} == {variables[name]}, name


def test_dashboard_is_importable_with_the_amp_data_source_and_serves_every_service():
    """Every query reads recorded series only, a service's through both template variables, a namespace's
    through $namespace: one dashboard for every declared service."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    (source,) = dashboard["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    uid = "${" + source["name"] + "}"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    assert [v["datasource"]["uid"] for v in dashboard["templating"]["list"]] == [uid, uid]
    recorded = {r.get("record") for g in yaml.safe_load(rule_file(UNIT_TESTED))["groups"] for r in g["rules"]}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    selected = [m for expr in exprs for m in re.findall(r"(mesh_\w+:[\w:]+)(\{[^}]*\})?", expr)]
    assert len(selected) == len(exprs) + 1  # the policy drops from or to the namespace: two selectors
    for name, selector in selected:
        assert name in recorded, f"{name}: not a recorded series"
        if name.startswith("mesh_service:"):
            assert selector == '{namespace="$namespace", service="$service"}', name
        else:
            assert '_namespace="$namespace"' in selector, name


def plot_run():
    """A plotted run: v1 and v2 share the requests until v2 goes down at 30 s, then v1 answers all of them,
    while the 2-minute rule (as AMP records it) still shows v2's share decaying."""
    from checks.envoy_harness import RunResult
    from checks.metrics_harness import Timeline

    samples = [(t / 40, 200, "v1" if t % 2 or t >= 1200 else "v2") for t in range(2400)]  # 40 requests/s for 60 s

    def series(labels, value=0.5):
        return [{"metric": label, "values": [(1000.0 + t, value) for t in range(60)]} for label in labels]

    labels = {"mesh_service:share:ratio2m": [{"version": "v1"}, {"version": "v2"}],
              "mesh_service:answered:ratio2m": [{}],
              "mesh_service:ejections_active": [{"destination": "v1"}, {"destination": "v2"}]}  # fmt: skip
    return Timeline(1000.0, 30.0, {q: series(v) for q, v in labels.items()}, {"MeshServiceFailoverActive": 32.0},
                    RunResult(SAMPLE, {}, len(samples)), samples), labels  # fmt: skip


def test_the_plot_shows_what_the_requests_saw_within_seconds_of_the_fault():
    """Counted every 2 s from the run: v2's share is 0 from the first window after it went down, not the
    2-minute rule's slow decay."""
    run_, _ = plot_run()
    middles, shares, answered = run_.seen(2.0)
    assert len(middles) == 30 and answered == [1.0] * 30
    assert [shares["v2"][i] for i, m in enumerate(middles) if m < 30] == [0.5] * 15
    assert [shares["v2"][i] for i, m in enumerate(middles) if m > 30] == [0.0] * 15


@pytest.mark.slow
def test_plot_draws_both_views_and_every_weight_visibly(tmp_path):
    from checks.metrics_harness import PLOTTED
    from tools.preview import draw

    run_, labels = plot_run()
    assert set(labels) == set(PLOTTED)
    path = tmp_path / "plot.png"
    legend = draw(run_, SAMPLE, "v2 down", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    for version in ("v1", "v2"):
        assert f"{version}: requests answered by it" in legend
        assert f"{version}: as AMP's 2-minute rule records it" in legend
    assert [label for label in legend if label.startswith("weight")] == ["weight of v1, v2: 50% each"]
    legend_90_10 = draw(run_, SAMPLE.with_weights({"v1": 90, "v2": 10}), "v2 down", path)
    assert [label for label in legend_90_10 if label.startswith("weight")] == ["weight of v2: 10%", "weight of v1: 90%"]


class PhasedPrometheus:
    """A Prometheus API whose rule groups are evaluated every second 1 ms before its targets are scraped,
    on a clock that moves only when waited on (0.1 s a poll): an evaluation is never the latest event
    when polled, so a wait that compares with the latest scrape never ends."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def latest(self, phase: float) -> str:
        stamp = math.floor(self.now - phase) + phase
        return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def get(self, path: str, **_) -> dict:
        if path == "/api/v1/targets":
            return {"activeTargets": [{"lastScrape": self.latest(0.5), "health": "up"}]}
        return {"groups": [{"lastEvaluation": self.latest(0.499)}]}


def test_waiting_for_an_evaluation_ends_whatever_the_phase_of_scrapes_and_evaluations(monkeypatch):
    from checks import prometheus

    clock = PhasedPrometheus()
    monkeypatch.setattr(prometheus, "time", clock)
    server = prometheus.PrometheusServer("127.0.0.1:9")
    monkeypatch.setattr(server, "_get", clock.get)
    started = clock.now
    server.wait_for_evaluation_after(started)
    assert clock.now - started < 3, "one scrape after the moment, then one evaluation after it"
