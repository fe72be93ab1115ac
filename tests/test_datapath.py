"""The datapath model: every shipped path delivers in both datapaths, and each defect it was built for is caught."""

import copy
import dataclasses

import pytest
from checks.datapath import (
    MUST_DENY,
    PLACEMENTS,
    RULES,
    Deployed,
    Unmodelled,
    cec_statuses,
    evaluate_all,
    paths,
)
from cilium_mesh.manifests import DATAPATHS, NETWORK_POLICY_FILE, load_documents
from cilium_mesh.smoke_files import smoke_documents
from cilium_mesh.traffic import MeshService
from cilium_mesh.values import cilium_values

from stacks import cdk_json_context
from stacks.config import load_config

CONFIG = load_config(cdk_json_context())
POLICY = CONFIG.traffic_policy


def deployed(datapath: str, **changes) -> Deployed:
    return Deployed.of(datapath, changes.pop("traffic", POLICY), CONFIG.cilium_version, **changes)


def failing(model: Deployed) -> list[str]:
    """Every path that does not deliver, and every must-deny request that does."""
    return [o.line() for o in evaluate_all(model) if not o.delivered] + [
        o.line() for o in evaluate_all(model, MUST_DENY) if o.delivered
    ]


def documents_with(change) -> list[dict]:
    documents = copy.deepcopy(list(deployed("eni").documents))
    for document in documents:
        change(document)
    return documents


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_every_shipped_path_delivers_and_every_must_deny_request_is_denied(datapath):
    model = deployed(datapath)
    outcomes = evaluate_all(model)
    kinds = {hop.via for hop in paths(model)}
    assert kinds == {"nlb", "ingress", "direct", "cec-eds", "cec-dns", "envoy-dns", "probe"}
    assert {o.placement for o in outcomes} == set(PLACEMENTS)
    assert failing(model) == []
    hops = paths(model)
    one_placement = sum(1 for h in hops if h.via in ("probe", "nlb"))
    assert len(outcomes) == 2 * (len(hops) - one_placement) + one_placement == 85  # the smoke test's 18 paths included
    assert {o.hop.client for o in outcomes} >= {"smoke-test", "productcatalog", "frontend", "ingress", "world"}


def test_every_step_names_a_rule_with_its_source():
    for datapath in DATAPATHS:
        for outcome in evaluate_all(deployed(datapath)) + evaluate_all(deployed(datapath), MUST_DENY):
            assert {rule for rule, _, _ in outcome.steps} <= RULES.keys()
    assert all(rule.says and rule.source for rule in RULES.values())


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_version_service_with_a_cluster_ip_again_is_denied_as_world(datapath, version):
    """Defect 1 (main before headless Services): Envoy dials the ClusterIP, which is world to the policy."""

    def cluster_ip(document):
        if document["kind"] == "Service" and document["metadata"]["name"] == f"catalogdetail{version}":
            document["spec"].pop("clusterIP")

    model = deployed(datapath, documents=documents_with(cluster_ip))
    broken = failing(model)
    assert broken and all(f"catalogdetail{version}" in line and ": denied" in line and "identity world" in line for line in broken)
    # The split and failover to that version are denied; pinned requests (EDS: pod addresses) are not.
    assert any(f"(split, catalogdetail{version})" in line for line in broken)
    assert any(f"(failover, catalogdetail{version})" in line for line in broken)
    assert not any("route pin-" in line for line in broken)
    assert cec_statuses(model)[("dns", version)] == "denied" and cec_statuses(model)[("eds", version)] == "delivered"


def test_both_version_services_with_cluster_ips_deny_every_split_request():
    model = deployed("eni").with_cluster_ip_version_services()
    assert {k: v for k, v in cec_statuses(model).items() if v != "delivered"} == {("dns", "v1"): "denied", ("dns", "v2"): "denied"}


def test_chaining_without_masquerading_cannot_reach_a_frontend_on_another_node():
    """Defect 2 (main's chaining values): the Ingress IP of Cilium's pool is dropped by the VPC."""
    values = cilium_values("api.example", "chaining", "cilium-mesh", CONFIG.cilium_version)
    values["enableIPv4Masquerade"] = False
    del values["ipv4NativeRoutingCIDR"]
    assert failing(deployed("chaining", values=values)) == [
        "Ingress -> frontend:9000 [chaining, other node]: dropped  <- vpc: source ingress-ip 100.65.0.5 is not an "
        "address of node a's ENIs"
    ]


def test_chaining_masquerades_only_to_outside_the_pool_and_frontend_must_admit_the_node():
    values = cilium_values("api.example", "chaining", "cilium-mesh", CONFIG.cilium_version)
    values["ipv4NativeRoutingCIDR"] = "10.0.0.0/8"  # the VPC inside the native routing CIDR: nothing is masqueraded
    assert [line.split("  <-")[0] for line in failing(deployed("chaining", values=values))] == [
        "Ingress -> frontend:9000 [chaining, other node]: dropped"
    ]
    smoke = [d for d in smoke_documents(POLICY, "chaining", True) if d["kind"] == "CiliumNetworkPolicy"]
    shared_frontend = load_documents(NETWORK_POLICY_FILE) + smoke  # frontend without remote-node
    assert [line.split("  <-")[0] for line in failing(deployed("chaining", policies=shared_frontend))] == [
        "Ingress -> frontend:9000 [chaining, other node]: denied"
    ]


def test_l7_rules_fail_with_chaining():
    """Chained Cilium enforces no L7 rule: the model refuses to count on one."""
    eni_policies = list(deployed("eni").policies)
    broken = [line for line in failing(deployed("chaining", policies=eni_policies)) if "Ingress ->" not in line]
    assert len(broken) == 68 and all("Cilium chained onto the VPC CNI does not enforce" in line for line in broken)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_removing_any_policy_rule_or_peer_or_port_is_caught(datapath):
    """Each rule, each peer in it and each port is needed by a path, or keeps a must-deny request out.
    The exceptions are default-deny's two sections: today allow-dns (every pod's egress) and each
    workload's own policy (its ingress) enable enforcement too; default-deny holds it for a new pod."""
    base = list(deployed(datapath).policies)
    uncaught = []
    for index, policy in enumerate(base):
        for direction in ("ingress", "egress"):
            for number, rule in enumerate(policy["spec"].get(direction, [])):
                cuts = [("rule", None)]
                cuts += [(key, i) for key in ("fromEndpoints", "toEndpoints", "fromEntities", "toEntities") for i in range(len(rule.get(key, [])))]
                cuts += [("port", (t, p)) for t, to in enumerate(rule.get("toPorts", [])) for p in range(len(to["ports"]))]
                for what, which in cuts:
                    changed = copy.deepcopy(base)
                    rules = changed[index]["spec"][direction]
                    if what == "rule":
                        del rules[number]
                    elif what == "port":
                        del rules[number]["toPorts"][which[0]]["ports"][which[1]]
                    else:
                        del rules[number][what][which]
                    if not failing(deployed(datapath, policies=changed)):
                        uncaught.append((policy["metadata"]["name"], direction, number, what))
    # The smoke test's egress to frontend exists so that its deny check tests frontend's own policy, and the
    # model has no API server to write the verdict to: cutting either is caught by no path here.
    smoke_only = [("smoke-test", "egress", n, what) for n, whats in ((3, ("rule", "toEndpoints", "port")),
                                                                    (4, ("rule", "toEntities", "port"))) for what in whats]  # fmt: skip
    assert uncaught == [("default-deny", "ingress", 0, "rule"), ("default-deny", "egress", 0, "rule"), *smoke_only]


@pytest.mark.parametrize("datapath", DATAPATHS)
@pytest.mark.parametrize("label, value", [("version", "v3"), ("app", "catalog-detail")])
def test_relabelling_a_version_is_caught(datapath, label, value):
    def relabel(document):
        if document["kind"] == "Deployment" and document["metadata"]["name"] == "catalogdetail2":
            document["spec"]["template"]["metadata"]["labels"][label] = value

    broken = failing(deployed(datapath, documents=documents_with(relabel)))
    assert any("catalogdetailv2" in line or "catalogdetail-v2" in line for line in broken)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_retry_after_a_timeout_needs_the_upstream_linger_reset(datapath):
    """Across nodes the retry reuses productcatalog's address and port (item 3)."""
    values = cilium_values("api.example", datapath, "cilium-mesh", CONFIG.cilium_version)
    del values["extraConfig"]
    broken = failing(deployed(datapath, values=values))
    assert broken and all("retry after a per-try timeout" in line and "other node]: connect fails" in line for line in broken)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_deleted_pod_must_outlive_the_dns_staleness_window(datapath):
    """Without preStop a deleted pod's address is world while Envoy may still dial it (item 4)."""

    def no_pre_stop(document):
        if document["kind"] == "Deployment" and document["metadata"]["name"] == "catalogdetail":
            for container in document["spec"]["template"]["spec"]["containers"]:
                container.pop("lifecycle")

    broken = failing(deployed(datapath, documents=documents_with(no_pre_stop)))
    assert broken and all("catalogdetailv1" in line and "dns-staleness" in line for line in broken)
    slower = dataclasses.replace(POLICY, dns_refresh_ms=15000)
    assert any("dns-staleness" in line for line in failing(deployed(datapath, traffic=slower)))


@pytest.mark.parametrize(("key", "value"), [
    ("service.beta.kubernetes.io/aws-load-balancer-nlb-target-type", "ip"),
    ("service.beta.kubernetes.io/aws-load-balancer-type", None),
])
def test_the_nlb_needs_instance_targets_from_the_load_balancer_controller(key, value):
    """The cilium-ingress Service selects no pods: IP targets would have nothing to register."""
    values = cilium_values("api.example", "eni", "cilium-mesh", CONFIG.cilium_version)
    values["ingressController"]["service"]["annotations"][key] = value
    broken = failing(deployed("eni", values=values))
    assert [line.split("  <-")[0] for line in broken] == ["the internet -> NLB -> a node's NodePort -> Cilium's Ingress Envoy [eni, same node]: dropped"]


def test_cilium_envoy_must_use_cluster_dns():
    values = cilium_values("api.example", "eni", "cilium-mesh", CONFIG.cilium_version)
    del values["envoy"]["dnsPolicy"]
    broken = failing(deployed("eni", values=values))
    assert any(line.startswith("cilium-envoy -> DNS") and "no address" in line for line in broken)
    assert any("(split, catalogdetailv1)" in line and "no address" in line for line in broken)


def test_same_node_requests_carry_productcatalogs_identity_not_the_hosts():
    """catalogdetail's host peer is for probes only: through the traffic policy Envoy's mark carries
    productcatalog's identity even on its own node (item 4)."""
    changed = copy.deepcopy(list(deployed("eni").policies))
    catalogdetail = next(p for p in changed if p["metadata"]["name"] == "catalogdetail")
    catalogdetail["spec"]["ingress"] = [r for r in catalogdetail["spec"]["ingress"] if "fromEntities" not in r]
    broken = failing(deployed("eni", policies=changed))
    assert broken and all(line.startswith("kubelet -> catalogdetail") for line in broken)


class _WithHealthChecks(MeshService):
    def envoy_resources(self):
        resources = super().envoy_resources()
        for resource in resources:
            if resource.get("type") == "STRICT_DNS":
                resource["health_checks"] = [{"timeout": "1s", "interval": "5s", "http_health_check": {"path": "/ping"}}]
        return resources


def test_active_health_checks_would_come_from_the_node():
    """If added, they have no downstream connection: seen as remote-node across nodes, which nothing allows."""
    policy = _WithHealthChecks(**{f.name: getattr(POLICY, f.name) for f in dataclasses.fields(POLICY)})
    broken = failing(deployed("eni", traffic=policy))
    assert broken and all("active health check" in line and "other node]: denied" in line and "remote-node" in line for line in broken)


@pytest.mark.parametrize("change", [
    lambda spec: spec["ingress"][0].update(toCIDR=["10.0.0.0/8"]),
    lambda spec: spec.update(ingressDeny=[{"fromEntities": ["world"]}]),
    lambda spec: spec["endpointSelector"].update(matchExpressions=[{"key": "app", "operator": "Exists"}]),
])
def test_a_policy_field_the_model_does_not_evaluate_is_refused(change):
    """Rather than judge it wrongly: the model stops, naming what it cannot evaluate."""
    policies = copy.deepcopy(list(deployed("eni").policies))
    change(next(p for p in policies if p["metadata"]["name"] == "frontend")["spec"])
    with pytest.raises(Unmodelled, match="policy frontend uses"):
        deployed("eni", policies=policies)


def test_the_harness_gets_the_models_verdicts():
    assert cec_statuses(deployed("eni")) == {(kind, v): "delivered" for kind in ("eds", "dns") for v in POLICY.versions}
