"""The datapath model: every shipped path of every declared service delivers in both datapaths, every request
the policies must refuse is refused, and each defect it was built for is caught."""

import copy
import dataclasses

import pytest
from checks.datapath import (
    PLACEMENTS,
    RULES,
    Deployed,
    Unmodelled,
    cec_statuses,
    evaluate_all,
    main,
    must_deny,
    paths,
)
from cilium_mesh.declaration import services
from cilium_mesh.manifests import DATAPATHS, NETWORK_POLICY_FILE, load_documents
from cilium_mesh.traffic import Caller, MeshService
from cilium_mesh.values import cilium_values
from conftest import with_health_checks

from stacks import cdk_json_context
from stacks.config import load_config

CONFIG = load_config(cdk_json_context())
SAMPLE = CONFIG.service("workshop/catalogdetail")

# Two services as a user declares them (cdk.json "services"): payments in shop, called from a third
# namespace, with three versions, a header route and a mirror; ledger with a failover order, the
# namespace's default deny, callers in its own namespace and in shop (payments' pods), and a rollout load.
PAYMENTS, LEDGER = services([
    {"name": "payments", "namespace": "shop", "port": 80, "target_port": 8080,
     "versions": {"v1": {"app": "payments", "version": "v1"}, "v2": {"app": "payments", "version": "v2"},
                  "v3": {"app": "payments", "version": "v3"}},
     "weights": {"v1": 80, "v2": 20},
     "routes": [{"headers": {"x-beta": "1"}, "to": "v3"}],
     "mirror": {"version": "v3", "percent": 10},
     "check_path": "/healthz",
     "callers": [{"labels": {"app": "checkout"}, "namespace": "storefront",
                  "http": [{"method": "GET", "path": "/healthz"}, {"method": "POST", "path": "/charges/.*"}]}]},
    {"name": "ledger", "namespace": "books", "port": 9090,
     "versions": {"v1": {"app": "ledger", "track": "stable"}, "v2": {"app": "ledger", "track": "canary"}},
     "weights": {"v1": 90, "v2": 10},
     "failover": ["v2", "v1"],
     "namespace_default_deny": True,
     "callers": [{"labels": {"app": "payments"}, "namespace": "shop"}, {"labels": {"app": "auditor"}}],
     "rollout": {"steps": [50, 100], "pause_s": 300, "load": {"path": "/ready"}}},
])  # fmt: skip
DECLARED = (PAYMENTS, LEDGER)
CHECKOUT = "storefront/app=checkout"  # the pods the model places for payments' caller


def deployed(datapath: str, services=None, sample_app: bool = True, **changes) -> Deployed:
    return Deployed.of(datapath, CONFIG.services if services is None else services, sample_app, CONFIG.cilium_version, **changes)


def declared(datapath: str, **changes) -> Deployed:
    """The two declared services without the sample app: no manifest but what their declarations render."""
    return deployed(datapath, DECLARED, sample_app=False, **changes)


def failing(model: Deployed) -> list[str]:
    """Every path that does not deliver, and every must-deny request that does."""
    return [o.line() for o in evaluate_all(model) if not o.delivered] + [
        o.line() for o in evaluate_all(model, must_deny(model)) if o.delivered
    ]


def documents_with(change) -> list[dict]:
    documents = copy.deepcopy(list(deployed("eni").documents))
    for document in documents:
        change(document)
    return documents


def policies_of(datapath: str, *declarations: MeshService) -> list[dict]:
    """The policies the stack would apply for these declarations (without the sample app)."""
    return list(deployed(datapath, declarations, sample_app=False).policies)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_every_shipped_path_delivers_and_every_must_deny_request_is_denied(datapath):
    model = deployed(datapath)
    outcomes = evaluate_all(model)
    kinds = {hop.via for hop in paths(model)}
    assert kinds == {"nlb", "ingress", "direct", "cec-eds", "cec-dns", "envoy-dns", "probe", "cilium"}
    assert {o.placement for o in outcomes} == set(PLACEMENTS)
    assert failing(model) == []
    hops = [h for h in paths(model) if datapath in h.datapaths]  # cilium-health's endpoint probes are eni's
    one_placement = sum(1 for h in hops if h.via in ("probe", "nlb"))
    # Under eni productcatalog asks both requests its L7 rules allow (GET /catalogDetail, GET /ping).
    assert len(outcomes) == 2 * (len(hops) - one_placement) + one_placement == {"chaining": 109, "eni": 135}[datapath]
    assert {o.hop.client for o in outcomes} >= {"smoke-test", "smoke-test-outsider", "productcatalog", "frontend", "ingress", "world"}
    assert {o.hop.client for o in evaluate_all(model, must_deny(model))} >= {"smoke-test-outsider", "frontend", "productcatalog"}


def test_every_step_names_a_rule_with_its_source():
    for model in [deployed(datapath) for datapath in DATAPATHS] + [declared(datapath) for datapath in DATAPATHS]:
        for outcome in evaluate_all(model) + evaluate_all(model, must_deny(model)):
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
    statuses = cec_statuses(model, SAMPLE)
    assert statuses[("dns", version)] == "denied" and statuses[("eds", version)] == "delivered"


def test_both_version_services_with_cluster_ips_deny_every_split_request():
    model = deployed("eni").with_cluster_ip_version_services()
    assert {k: v for k, v in cec_statuses(model, SAMPLE).items() if v != "delivered"} == {("dns", "v1"): "denied", ("dns", "v2"): "denied"}


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
    (shared_frontend,) = [p for p in load_documents(NETWORK_POLICY_FILE) if p["metadata"]["name"] == "frontend"]  # without remote-node
    policies = [shared_frontend if p["metadata"]["name"] == "frontend" else p for p in deployed("chaining").policies]
    assert [line.split("  <-")[0] for line in failing(deployed("chaining", policies=policies))] == [
        "Ingress -> frontend:9000 [chaining, other node]: denied"
    ]


def test_l7_rules_fail_with_chaining():
    """Chained Cilium enforces no L7 rule: the model refuses to count on one."""
    eni_policies = list(deployed("eni").policies)
    broken = [line for line in failing(deployed("chaining", policies=eni_policies)) if "Ingress ->" not in line]
    assert len(broken) == 60 and all("Cilium chained onto the VPC CNI does not enforce" in line for line in broken)


def uncaught_cuts(model: Deployed) -> list[tuple]:
    """Each rule, peer and port of the model's policies whose removal no path and no must-deny request notices."""
    base = list(model.policies)
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
                    if not failing(dataclasses.replace(model, policies=tuple(changed))):
                        uncaught.append((policy["metadata"]["name"], direction, number, what))
    return sorted(uncaught)


# The outsider's egress to the API server (its result; the model has the smoke test's path there, not the
# outsider's), and the outsider's to the services, there so that its refusal tests the services' own policies
# (a request refused on its way out proves nothing): cutting any of these is caught by no path here.
SMOKE_ONLY = [("smoke-test-outsider", "egress", 1, what) for what in ("rule", "toEntities", "port")]


OUTSIDER_OUT_SAMPLE = [("smoke-test-outsider-to-services", "egress", 0, what) for what in ("rule", "toEndpoints", "toEndpoints", "port")]


# Every cut of every policy, one model run each: seconds, so in the full tier.
@pytest.mark.slow
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_removing_any_policy_rule_or_peer_or_port_is_caught(datapath):
    """Each rule, each peer in it and each port is needed by a path, or keeps a must-deny request out.
    The exceptions are default-deny's two sections: today allow-dns (every pod's egress) and each
    workload's own policy (its ingress) enable enforcement too; default-deny holds it for a new pod;
    and the smoke test's egress to frontend, there so that its deny check tests frontend's own policy."""
    to_frontend = [("smoke-test-sample", "egress", 2, what) for what in ("rule", "toEndpoints", "port")]
    assert uncaught_cuts(deployed(datapath)) == sorted([("default-deny", "ingress", 0, "rule"), ("default-deny", "egress", 0, "rule"),
                                                        *SMOKE_ONLY, *to_frontend, *OUTSIDER_OUT_SAMPLE])  # fmt: skip


# Every cut of every policy, one model run each: seconds, so in the full tier.
@pytest.mark.slow
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_removing_any_rule_of_the_declared_services_policies_is_caught(datapath):
    """The same of what the declarations render: each service's policies, ledger's namespace default deny (whose
    sections its other policies enforce too) and caller egress, the smoke test's and the load's egress."""
    outsider_out = [("smoke-test-outsider-to-services", "egress", n, what) for n, versions in ((0, 3), (1, 2))
                    for what in ("rule", *["toEndpoints"] * versions, "port")]  # fmt: skip
    default_deny = [("mesh-ledger-default-deny", direction, 0, "rule") for direction in ("ingress", "egress")]
    assert uncaught_cuts(declared(datapath)) == sorted([*default_deny, *SMOKE_ONLY, *outsider_out])


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
    """Across nodes the retry reuses the caller's address and port (item 3)."""
    values = cilium_values("api.example", datapath, "cilium-mesh", CONFIG.cilium_version)
    del values["extraConfig"]
    for model in (deployed(datapath, values=values), declared(datapath, values=values)):
        broken = failing(model)
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
    slower = dataclasses.replace(SAMPLE, dns_refresh_ms=15000)
    assert any("dns-staleness" in line for line in failing(deployed(datapath, (slower,))))


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
    """catalogdetail's host peer is for probes only: through the CiliumEnvoyConfig Envoy's mark carries
    productcatalog's identity even on its own node (item 4)."""
    changed = copy.deepcopy(list(deployed("eni").policies))
    for policy in (p for p in changed if p["metadata"]["name"].startswith("mesh-catalogdetail-")):
        policy["spec"]["ingress"] = [r for r in policy["spec"]["ingress"] if "fromEntities" not in r]
    broken = failing(deployed("eni", policies=changed))
    assert broken and all(line.startswith("kubelet -> catalogdetail") for line in broken)


def test_active_health_checks_would_come_from_the_node():
    """If added, they have no downstream connection: seen as remote-node across nodes, which nothing allows."""
    policy = with_health_checks(SAMPLE)
    broken = failing(deployed("eni", (policy,)))
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
    assert cec_statuses(deployed("eni"), SAMPLE) == {(kind, v): "delivered" for kind in ("eds", "dns") for v in SAMPLE.versions}


# --- Declared services -------------------------------------------------------------------------


def _cec_outcomes(model: Deployed, service: MeshService) -> list:
    return [o for o in evaluate_all(model) if o.hop.service == service.key and o.hop.via.startswith("cec-")]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_declared_services_deliver_every_path_and_refuse_every_must_deny_request(datapath):
    """Two services with no manifest here: the model places their pods from the declarations alone."""
    model = declared(datapath)
    # The version Services, the smoke test's Jobs and ledger's rollout load: nothing of the services' own.
    assert sorted((d["kind"], d["metadata"]["name"].split("-")[0]) for d in model.documents) == [
        ("Deployment", "load"), ("Job", "smoke"), ("Job", "smoke"), *sorted(("Service", f"{s.name}{v}") for s in DECLARED for v in s.versions)]  # fmt: skip
    assert failing(model) == []
    payments, ledger = _cec_outcomes(model, PAYMENTS), _cec_outcomes(model, LEDGER)
    assert {o.hop.client for o in payments} == {CHECKOUT, "smoke-test"}
    assert {o.hop.client for o in ledger} == {"shop/payments-v1", "books/app=auditor", "smoke-test", "load-books-ledger"}
    names = [o.hop.name for o in payments + ledger]
    # The header route to v3, the split over v1 and v2 with failover to each other, the mirror to v3.
    assert any(n.startswith(f"{CHECKOUT} -> payments (GET /healthz): route route-0-retried-get, cluster shop/paymentsv3") for n in names)
    assert any("route split-retried-get, cluster payments-v1 priority 1 (failover, paymentsv2)" in n for n in names)
    assert any("route split-retried-get, mirror, cluster shop/paymentsv3" in n for n in names)
    # Under eni the caller asks what its L7 rules allow: POST is not retried, so it takes the routes without retries.
    assert any(n.startswith(f"{CHECKOUT} -> payments (POST /charges/): route split,") for n in names) == (datapath == "eni")
    # ledger fails over in the declared order; its load takes the one route its request matches.
    assert any("cluster ledger-v1 priority 1 (failover, ledgerv2)" in n for n in names)
    assert {n.split(": route ")[1].split(",")[0] for n in names if n.startswith("load-books-ledger")} == {"split-retried-get"}
    probes = {o.hop.name for o in evaluate_all(model) if o.hop.via == "probe"}
    assert probes == {f"kubelet -> {s.namespace}/{s.name}-{v} probe on {s.pod_port}" for s in DECLARED for v in s.versions}
    refused = evaluate_all(model, must_deny(model))
    assert {o.hop.client for o in refused} == {"smoke-test-outsider", *((CHECKOUT, "smoke-test") if datapath == "eni" else ())}
    assert {o.hop.target for o in refused if o.hop.via == "direct"} == {
        f"{s.namespace}/{s.version_service(v)}" for s in DECLARED for v in s.versions}  # fmt: skip
    if datapath == "eni":
        assert any(o.hop.name.startswith(f"{CHECKOUT} -> paymentsv1: DELETE /healthz") for o in refused)
    assert cec_statuses(model, PAYMENTS) == {("eds", "v3"): "delivered", ("dns", "v1"): "delivered", ("dns", "v2"): "delivered"}
    assert set(cec_statuses(model, LEDGER).values()) == {"delivered"}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_declared_services_deliver_beside_the_sample(datapath):
    model = deployed(datapath, (*CONFIG.services, *DECLARED))
    assert failing(model) == []
    assert {o.hop.service for o in evaluate_all(model)} == {None, SAMPLE.key, PAYMENTS.key, LEDGER.key}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_caller_dropped_from_the_declaration_is_refused(datapath):
    """The policy follows the declaration: checkout, no longer declared, is refused on every path."""
    alone = dataclasses.replace(PAYMENTS, callers=())
    broken = failing(declared(datapath, policies=policies_of(datapath, alone, LEDGER)))
    assert broken and all(line.startswith(f"{CHECKOUT} -> payments") and ": denied  <- policy: no ingress rule" in line for line in broken)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_declared_services_version_services_with_cluster_ips_are_denied_as_world(datapath):
    """Envoy checks a caller's egress on the ClusterIP it dials: world. ledger's clients with an egress policy
    (auditor under the namespace's default deny, the smoke test, the rollout load) are refused; payments' pods
    have none, so the socket LB would take theirs on to a pod (rule "envoy-socket-lb", on trust)."""
    model = declared(datapath).with_cluster_ip_version_services(LEDGER)
    broken = failing(model)
    assert broken and all(" -> ledger (" in line and "identity world" in line and ": denied" in line for line in broken)
    assert {line.split(" -> ")[0] for line in broken} == {"books/app=auditor", "smoke-test", "load-books-ledger"}
    assert cec_statuses(model, LEDGER) == {("dns", "v1"): "denied", ("dns", "v2"): "denied"}
    assert set(cec_statuses(model, PAYMENTS).values()) == {"delivered"}


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_envoy_enforces_a_callers_egress_under_namespace_default_deny(datapath):
    """With ledger's namespace default deny, auditor's own egress to ledger's pods is what Envoy checks on the
    pod it dials: without it every request is refused before it leaves (403 before connect)."""
    policies = [p for p in declared(datapath).policies if p["metadata"]["name"] != "mesh-ledger-caller-1"]
    broken = failing(declared(datapath, policies=policies))
    assert broken and all(line.startswith("books/app=auditor -> ledger") and "dial-identity" in line for line in broken)


def test_a_caller_without_l7_rules_lets_a_refused_method_through_under_eni():
    """Under eni a caller's http rules are its L7 rules: without them DELETE reaches payments."""
    any_request = dataclasses.replace(PAYMENTS, callers=(dataclasses.replace(PAYMENTS.callers[0], http=()),))
    broken = failing(declared("eni", policies=policies_of("eni", any_request, LEDGER)))
    assert broken and all(line.startswith(f"{CHECKOUT} -> payments") and "DELETE /healthz" in line and ": delivered" in line for line in broken)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_the_outsider_admitted_as_a_caller_is_caught(datapath):
    """The smoke test's outsider must be refused by every service with callers."""
    admitting = dataclasses.replace(LEDGER, callers=(*LEDGER.callers, Caller(labels={"app": "smoke-test-outsider"}, namespace="cilium-mesh")))
    broken = failing(declared(datapath, policies=policies_of(datapath, PAYMENTS, admitting)))
    assert broken and all(line.startswith("smoke-test-outsider -> ledger") and ": delivered" in line for line in broken)


def test_the_module_prints_every_path_of_every_service(capsys):
    assert main([]) == 0
    printed = capsys.readouterr().out.splitlines()
    for datapath in DATAPATHS:
        model = deployed(datapath)
        lines = {o.line() for o in evaluate_all(model) + evaluate_all(model, must_deny(model))}
        assert lines <= {line.strip().removeprefix("must deny, ") for line in printed}
    assert f"-- {SAMPLE.key}: " in "\n".join(printed)
