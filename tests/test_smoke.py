"""The deploy's smoke test: its Job and policy as the stack applies them, the wait on its verdict through
aws-cdk-lib's own kubectl handler, the relay that fails the stack, and its script against the harness."""

import importlib.util
import json
import threading
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import celpy
import pytest
import dataclasses

from cilium_mesh import MeshService
from cilium_mesh.declaration import sample_service
from cilium_mesh.mesh import PROVIDER_LAMBDA_TIMEOUT
from cilium_mesh.manifests import load_documents
from cilium_mesh.smoke_files import (
    RESULT_CONFIGMAP,
    SMOKE_SCRIPT_FILE,
    SMOKE_TEST_FILE,
    VERDICT_WAIT_S,
    result_document,
    service_checks,
    smoke_documents,
)
from conftest import CONTEXT, manifest_documents, synth_of
from checks.cilium_envoy import build_for
from checks.datapath import Deployed, cec_statuses
from checks.envoy_harness import LOOPBACK, Blackhole, Fault, running
from checks.provider_dry_run import VirtualClock, find_step, refused_apply, smoke_verdict_object, wait_step

TAG = build_for(CONTEXT["cilium_version"]).tag
POLICY = sample_service(weights={"v1": 50, "v2": 50})


def load_script():
    spec = importlib.util.spec_from_file_location("smoke_test", SMOKE_SCRIPT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = load_script()


def job_of(documents, app="smoke-test"):
    (job,) = [d for d in documents if d["kind"] == "Job" and d["metadata"]["labels"]["app"] == app]
    return job


def env_of(job) -> dict:
    return {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


# --- the stack -------------------------------------------------------------------------------------


@pytest.mark.parametrize("datapath", ["chaining", "eni"])
def test_the_job_follows_the_manifests_and_its_verdict_decides_the_deploy(request, datapath):
    synth = synth_of(request, datapath)
    smoke, mesh = synth.stack.smoke_test, synth.stack.mesh
    job_resource = synth.resource(smoke.job)
    assert {synth.logical_id(c) for c in mesh.manifests_after} <= set(job_resource["DependsOn"])
    assert {synth.logical_id(m) for m in mesh.manifests.values()} <= set(job_resource["DependsOn"])
    assert synth.logical_id(smoke.job) in synth.resource(smoke.verdict)["DependsOn"]
    verdict = synth.resource(smoke.verdict)["Properties"]
    job = job_of(manifest_documents(job_resource))
    assert (verdict["ObjectType"], verdict["ObjectName"], verdict["JsonPath"]) == (
        "configmap", "smoke-test-verdict", f".data.{job['metadata']['name']}")  # fmt: skip
    (result,) = manifest_documents(synth.resource(smoke.result))
    assert result["metadata"]["name"] == "smoke-test-result" and result["data"]["verdict"] == "<TOKEN>"
    assert synth.logical_id(smoke.verdict) in synth.resource(smoke.result)["DependsOn"]
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= {d["kind"] for d in manifest_documents(job_resource)}
    env = env_of(job)
    (checks,) = json.loads(env["SERVICES"])
    assert checks == service_checks(synth.stack.config.service("workshop/catalogdetail"), True)
    assert checks["weights"] == dict(synth.stack.config.service("workshop/catalogdetail").weights)
    assert env["INGRESS_SERVICE"] == "kube-system/cilium-ingress" and env["VERDICT_KEY"] == job["metadata"]["name"]
    outsider = env_of(job_of(manifest_documents(job_resource), "smoke-test-outsider"))
    assert outsider["ROLE"] == "outsider" and env["OUTSIDER_KEY"] == outsider["VERDICT_KEY"] != env["VERDICT_KEY"]
    script = next(d for d in manifest_documents(job_resource) if d["metadata"]["name"] == "smoke-test-script")
    assert script["data"]["smoke_test.py"] == SMOKE_SCRIPT_FILE.read_text()
    policies = {d["metadata"]["name"]: d for d in manifest_documents(job_resource) if d["kind"] == "CiliumNetworkPolicy"}
    assert policies.keys() == {"smoke-test", "smoke-test-outsider", "smoke-test-sample", "smoke-test-to-productcatalog",
                               "smoke-test-to-services", "smoke-test-outsider-to-services"}  # fmt: skip
    # The smoke test's egress reaches each version's pods; whether they answer is their own policy's decision.
    (to_catalogdetail,) = policies["smoke-test-outsider-to-services"]["spec"]["egress"]
    assert [s["matchLabels"]["version"] for s in to_catalogdetail["toEndpoints"]] == ["v1", "v2"]


def test_deadlines_nest_inside_the_provider_lambda(synth_eni):
    smoke = synth_eni.stack.smoke_test
    job = job_of(smoke.documents)
    wait = int(synth_eni.resource(smoke.verdict)["Properties"]["TimeoutSeconds"])
    assert job["spec"]["activeDeadlineSeconds"] < wait == VERDICT_WAIT_S < PROVIDER_LAMBDA_TIMEOUT.to_seconds() - 240
    assert job["spec"]["backoffLimit"] == 0
    assert float(env_of(job)["DEADLINE_S"]) + 60 < job["spec"]["activeDeadlineSeconds"]
    assert job_of(smoke.documents, "smoke-test-outsider")["spec"]["activeDeadlineSeconds"] == job["spec"]["activeDeadlineSeconds"]


def test_a_changed_configuration_names_a_new_job():
    """A Job's pod template cannot change; a new name makes an update run the smoke test again."""
    def name(policy, network_policy=True, sample_app=True):
        return job_of(smoke_documents([policy], "eni", network_policy, sample_app))["metadata"]["name"]

    canary = POLICY.with_weights({"v1": 90, "v2": 10})
    assert len({name(POLICY), name(canary), name(POLICY, network_policy=False), name(POLICY, sample_app=False)}) == 4
    assert name(POLICY) == name(sample_service(weights={"v1": 50, "v2": 50}))


def test_smoke_test_off_leaves_it_out(synth_variant):
    assert not hasattr(synth_variant.stack, "smoke_test")
    assert "smoke-test-verdict" not in json.dumps(synth_variant.template)


# --- the wait, with aws-cdk-lib's handler (checks/provider_dry_run.py) -----------------------------------


def test_the_wait_returns_the_verdict_once_written_and_keeps_polling_while_the_job_runs(synth_eni):
    stack, template = synth_eni.stack, synth_eni.template
    verdict_id = synth_eni.logical_id(stack.smoke_test.verdict)
    passed = wait_step(template, stack, verdict_id, smoke_verdict_object(stack, "pass"))
    assert passed.result == {"Data": {"Value": "pass"}}
    command = passed.commands[-1]
    assert command[command.index("get") :][:5] == ["get", "-n", "cilium-mesh", "configmap", "smoke-test-verdict"]
    failure = "workshop/catalogdetail split: v1 0/200, v2 0/200, 200 x 403 (weights v1 50%, v2 50%)"
    failed = wait_step(template, stack, verdict_id, smoke_verdict_object(stack, failure))
    assert failed.result == {"Data": {"Value": failure}}
    # While the Job runs the ConfigMap has no verdict: the handler asks every 10 s; here with the
    # timeout cut to 30 s on a virtual clock, then it gives up (in the stack after VERDICT_WAIT_S).
    clock = VirtualClock()
    with pytest.raises(RuntimeError, match="Timeout waiting for output"):
        wait_step(template, stack, verdict_id, smoke_verdict_object(stack, None), timeout_s=30, clock=clock)
    assert clock.sleeps == [10, 10, 10]


def test_the_dry_run_applies_the_job_once_cilium_is_ready_and_then_waits(provider_steps_eni, synth_eni):
    stack = synth_eni.stack
    order = [s.logical_id for s in provider_steps_eni if s.request_type == "Create"]
    job_id, verdict_id = synth_eni.logical_id(stack.smoke_test.job), synth_eni.logical_id(stack.smoke_test.verdict)
    assert order.index(job_id) > max(order.index(synth_eni.logical_id(c)) for c in stack.mesh.manifests_after)
    assert order.index(verdict_id) > order.index(job_id)
    applied = find_step(provider_steps_eni, job_id).manifests
    assert {d["kind"] for d in applied} >= {"Job", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CiliumNetworkPolicy"}
    assert find_step(provider_steps_eni, verdict_id).result == {"Data": {"Value": "pass"}}


def admission_policy():
    (policy,) = [d for d in load_documents(SMOKE_TEST_FILE) if d["kind"] == "ValidatingAdmissionPolicy"]
    return policy


def admits(verdict_object: dict) -> tuple[bool, str]:
    """The policy's CEL expression and message (cel-python), on the ConfigMap as the API server sees it."""
    (validation,) = admission_policy()["spec"]["validations"]
    env, activation = celpy.Environment(), {"object": celpy.json_to_cel(verdict_object)}
    allowed = env.program(env.compile(validation["expression"])).evaluate(activation)
    return bool(allowed), str(env.program(env.compile(validation["messageExpression"])).evaluate(activation))


def test_the_admission_policy_admits_only_a_pass_and_says_what_failed():
    line = "split: v1 0/200, v2 0/200, 200 x 403 (weights v1 50%, v2 50%)"
    assert admits(result_document("workshop", "pass")) == (True, "smoke test failed: pass")
    assert admits(result_document("cilium-mesh", line)) == (False, f"smoke test failed: {line}")
    assert admits({"metadata": {"name": "smoke-test-result"}}) == (False, "smoke test failed: no verdict")
    rule = admission_policy()["spec"]["matchConstraints"]["resourceRules"][0]
    assert rule["resourceNames"] == [RESULT_CONFIGMAP] and set(rule["operations"]) == {"CREATE", "UPDATE"}


def test_a_refused_verdict_fails_the_stack_with_its_line(synth_eni):
    """aws-cdk-lib's handler applying the verdict the policy refuses: the error CloudFormation shows carries
    the line. kubectl's output as the API server words a ValidatingAdmissionPolicy denial (Kubernetes docs,
    "Validating Admission Policy": 'The deployments "nginx" is invalid: : ValidatingAdmissionPolicy ...')."""
    stack, template = synth_eni.stack, synth_eni.template
    line = "workshop/catalogdetail pin v2: v1 20/20 (expected only v2)"
    result_id = synth_eni.logical_id(stack.smoke_test.result)
    properties = {**template["Resources"][result_id]["Properties"], "Manifest": json.dumps([result_document("cilium-mesh", line)])}
    _, message = admits(result_document("cilium-mesh", line))
    kubectl_says = (f'The configmaps "{RESULT_CONFIGMAP}" is invalid: : ValidatingAdmissionPolicy \'smoke-test-verdict\' '
                    f"with binding 'smoke-test-verdict' denied request: {message}\n")  # fmt: skip
    error = refused_apply(template, stack, result_id, properties, kubectl_says)
    assert f"smoke test failed: {line}" in str(error) and "\n" not in str(error).replace("\\n", "")


# --- the script against the harness -----------------------------------------------------------------


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(stack: ExitStack, address: str, body: bytes, port: int = 0) -> str:
    """A loopback server answering every GET with ``body``, stopped with ``stack``; its "address:port"."""
    server = ThreadingHTTPServer((address, port), _Page)
    server.body = body
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return f"{address}:{server.server_address[1]}"


def settings_for(envoy_port: int, ingress: str, products: str, denied: str, stand_ins: dict, policy=POLICY,
                 split: int = 100) -> dict:  # fmt: skip
    """The Job's settings with the service reached through the harness's Envoy, and each version's pods
    at its stand-in (in the cluster: the headless version Service's pod addresses); a version that is down
    has none, and its pods' address answers nothing (``denied``: a dropped address)."""
    checks = service_checks(policy, True)
    checks["base_url"] = f"http://{LOOPBACK}:{envoy_port}"
    pods = {v: "{}:{}".format(*stand_ins[v].server_address[:2]) if v in stand_ins else denied for v in policy.versions}
    checks["version_urls"] = {v: f"http://{address}{policy.check_path}" for v, address in pods.items()}
    return {
        "role": "main",
        "ingress_service": "kube-system/cilium-ingress",
        "ingress_host": "nlb.example",
        "ingress_port": int(ingress.rsplit(":", 1)[1]),
        "deadline_s": 0.0,
        "retry_s": 0.0,
        "products_url": f"http://{products}/products/",
        "denied_url": f"http://{denied}/",
        "deny_timeout_s": 0.5,
        "services": [checks],
        "wireguard": False,
        "split_requests": split,
        "pin_requests": 5,
        "timeout_s": 0.5,
    }


@pytest.fixture
def app_stand_ins():
    """Two "NLB addresses" serving frontend's page, productcatalog's answer, a dropped and an answering address."""
    with ExitStack() as stack:
        details = json.dumps({"products": {}, "details": {"version": "1", "vendors": ["ABC.com"]}}).encode()
        page = b"<html><title>Product Catalog</title></html>"
        port_holder = serve(stack, "127.0.0.11", page)
        port = int(port_holder.rsplit(":", 1)[1])
        serve(stack, "127.0.0.12", page, port)  # the NLB's second address, on the same port
        dropped = ("127.0.0.13", port)
        stack.callback(Blackhole(dropped).stop)
        yield {
            "ingress": port_holder,
            "addresses": ["127.0.0.11", "127.0.0.12"],
            "dropped": "127.0.0.13",
            "dropped_at": f"127.0.0.13:{port}",
            "products": serve(stack, "127.0.0.14", details),
            "answering": serve(stack, "127.0.0.15", page),
        }


def run_script(settings: dict, addresses: list[str]) -> str:
    return SMOKE.verdict(SMOKE.run_checks(settings, resolve=lambda host: set(addresses)))


@pytest.mark.envoy
def test_script_passes_and_names_each_failure_it_can_see_without_envoy_changes(app_stand_ins):
    apps = app_stand_ins
    with running(POLICY, TAG) as (envoy, _, stand_ins):
        healthy = settings_for(envoy.port, apps["ingress"], apps["products"], apps["dropped_at"], stand_ins)
        assert run_script(healthy, apps["addresses"]) == "pass"
        one_node = run_script(healthy, [apps["addresses"][0], apps["dropped"]])
        allowed = run_script({**healthy, "denied_url": f"http://{apps['answering']}/"}, apps["addresses"])
    assert one_node == (f"ingress: http://nlb.example/ not 200 from every NLB address: "
                        f"{apps['addresses'][0]} 200, {apps['dropped']} no answer")  # fmt: skip
    assert allowed == f"deny: http://{apps['answering']}/ answered 200 to the smoke test (its policy must refuse it)"


@pytest.mark.envoy
def test_script_fails_when_cilium_denies_the_split(app_stand_ins):
    apps = app_stand_ins
    statuses = cec_statuses(Deployed.of("eni", (POLICY,)).with_cluster_ip_version_services(), POLICY)
    with running(POLICY, TAG, statuses=statuses) as (envoy, _, stand_ins):
        line = run_script(settings_for(envoy.port, apps["ingress"], apps["products"], apps["dropped_at"], stand_ins, split=200),
                          apps["addresses"])  # fmt: skip
    assert line == "workshop/catalogdetail split: v1 0/200, v2 0/200, 200 x 403 (weights v1 50%, v2 50%)"


@pytest.mark.envoy
def test_script_fails_when_a_version_is_down(app_stand_ins):
    apps = app_stand_ins
    with running(POLICY, TAG, {"v2": Fault("down")}) as (envoy, _, stand_ins):
        line = run_script(settings_for(envoy.port, apps["ingress"], apps["products"], apps["dropped_at"], stand_ins), apps["addresses"])
    failures = line.split("; ")
    # Failover hides v2 from the split (its share is answered by v1, under v2's destination); asked
    # directly, and pinned, v2 does not answer. On a loaded machine a request may also run out of
    # retries before v2's host is ejected, and the split's line then says so.
    assert failures[0].startswith("workshop/catalogdetail version v2: http://") and failures[0].endswith(" answered nothing")
    assert failures[-1].startswith("workshop/catalogdetail pin v2: no answer from any version, 5 x ") and failures[-1].endswith("(expected only v2)")
    assert all(f.startswith("workshop/catalogdetail split: ") for f in failures[1:-1]), failures


@pytest.mark.envoy
def test_script_fails_when_a_pin_reaches_the_wrong_version(app_stand_ins, monkeypatch):
    """A route that pins v1 to v2's Service (a broken render; the header says where the route sent it):
    the pin check names it."""
    apps = app_stand_ins
    original = MeshService.route_configuration

    def crossed(self):
        config = original(self)
        for route in config["virtual_hosts"][0]["routes"]:
            if route["name"].startswith("pin-v1"):
                route["route"]["cluster"] = self.eds_cluster("v2")
                route["response_headers_to_add"][0]["header"]["value"] = "v2"
        return config

    monkeypatch.setattr(MeshService, "route_configuration", crossed)
    with running(POLICY, TAG) as (envoy, _, stand_ins):
        line = run_script(settings_for(envoy.port, apps["ingress"], apps["products"], apps["dropped_at"], stand_ins), apps["addresses"])
    assert line == "workshop/catalogdetail pin v1: v2 5/5 (expected only v1)"


def test_split_check_tells_the_weights_apart_from_a_plain_round_robin():
    """200 requests: a 90/10 policy's band (4.5 standard deviations) excludes the 100/100 a plain Service gives."""
    policy = POLICY.with_weights({"v1": 90, "v2": 10})
    n, p = 200, 0.9
    band = SMOKE.SIGMAS * (n * p * (1 - p)) ** 0.5
    assert abs(100 - n * p) > band
    assert abs(n * policy.weights["v1"] / sum(policy.weights.values()) - n * p) == 0


def test_the_outsider_passes_only_when_no_version_answers_it(app_stand_ins):
    """The non-caller's check: each version's pods, asked directly, must not answer (a dropped SYN)."""
    apps = app_stand_ins
    checks = service_checks(POLICY, True)
    settings = {**SMOKE.settings_from({"ROLE": "outsider"}), "deadline_s": 0.0, "retry_s": 0.0, "deny_timeout_s": 0.1}
    settings["services"] = [{**checks, "version_urls": {"v1": f"http://{apps['dropped_at']}/", "v2": f"http://{apps['dropped_at']}/"}}]
    assert run_script(settings, apps["addresses"]) == "pass"
    settings["services"][0]["version_urls"]["v2"] = f"http://{apps['answering']}/"
    assert run_script(settings, apps["addresses"]) == (
        f"workshop/catalogdetail deny v2: http://{apps['answering']}/ answered 200 to a non-caller (its policy must refuse it)")


def test_the_main_job_reports_the_outsiders_failures_with_its_own():
    settings = {**SMOKE.settings_from({}), "deadline_s": 0.0, "retry_s": 0.0}
    line = SMOKE.verdict(SMOKE.run_checks(settings, outsider=lambda: ["a/b deny v1: http://x/ answered 200 to a non-caller"]))
    assert line == "a/b deny v1: http://x/ answered 200 to a non-caller"
    assert SMOKE.verdict(SMOKE.run_checks(settings, outsider=lambda: [])) == "pass"


def test_without_callers_nothing_is_refused_and_without_the_sample_no_sample_check():
    open_service = dataclasses.replace(POLICY, callers=None)
    assert service_checks(open_service, True)["refused"] is False and service_checks(POLICY, False)["refused"] is False
    assert service_checks(POLICY, True)["refused"] is True
    env = env_of(job_of(smoke_documents([POLICY], "eni", True, sample_app=False)))
    assert (env["INGRESS_SERVICE"], env["PRODUCTS_URL"], env["DENIED_URL"]) == ("", "", "")


def node(name: str, key: str | None = None) -> dict:
    """A Node, or with ``key`` a CiliumNode, as the API lists it (CiliumNodes are named after their Nodes)."""
    return {"metadata": {"name": name, "annotations": {} if key is None else {"network.cilium.io/wg-pub-key": key}}}


def test_with_wireguard_every_node_must_have_published_its_key():
    """The CiliumNodes as the API lists them: a node without network.cilium.io/wg-pub-key fails the check."""
    nodes = [node("ip-10-0-128-10"), node("ip-10-0-160-10")]
    keyed, also_keyed, bare = node("ip-10-0-128-10", "q7bA..."), node("ip-10-0-160-10", "Zx9c..."), node("ip-10-0-160-10", "")
    settings = {**SMOKE.settings_from({"WIREGUARD": "true"}), "deadline_s": 0.0, "retry_s": 0.0}
    assert SMOKE.verdict(SMOKE.run_checks(settings, list_nodes=lambda: (nodes, [keyed, also_keyed]))) == "pass"
    assert SMOKE.verdict(SMOKE.run_checks(settings, list_nodes=lambda: (nodes, [keyed, bare]))) == (
        "wireguard: ip-10-0-160-10 of 2 nodes published no public key (network.cilium.io/wg-pub-key)")
    assert SMOKE.verdict(SMOKE.run_checks(settings, list_nodes=lambda: (nodes, []))) == "wireguard: no CiliumNode listed"
    plain = {**settings, "wireguard": False}
    assert SMOKE.verdict(SMOKE.run_checks(plain, list_nodes=lambda: (nodes, [bare]))) == "pass"


def test_with_wireguard_every_node_must_have_a_ciliumnode():
    """The Nodes against the CiliumNodes: a node no agent registered is no one's WireGuard peer, though every
    CiliumNode listed has its key; the failure names the node."""
    nodes = [node("ip-10-0-128-10"), node("ip-10-0-160-10"), node("ip-10-0-192-10")]
    cilium_nodes = [node("ip-10-0-128-10", "q7bA..."), node("ip-10-0-160-10", "Zx9c...")]
    settings = {**SMOKE.settings_from({"WIREGUARD": "true"}), "deadline_s": 0.0, "retry_s": 0.0}
    assert SMOKE.verdict(SMOKE.run_checks(settings, list_nodes=lambda: (nodes, cilium_nodes))) == (
        "wireguard: ip-10-0-192-10 of 3 nodes have no CiliumNode (no agent registered them)")
    cilium_nodes.append(node("ip-10-0-192-10", ""))
    assert SMOKE.verdict(SMOKE.run_checks(settings, list_nodes=lambda: (nodes, cilium_nodes))) == (
        "wireguard: ip-10-0-192-10 of 3 nodes published no public key (network.cilium.io/wg-pub-key)")


def test_the_wireguard_check_comes_with_its_read_of_the_nodes_only_with_wireguard():
    on, off = (smoke_documents([POLICY], "eni", True, True, encryption) for encryption in ("wireguard", "none"))
    assert env_of(job_of(on))["WIREGUARD"] == "true" and env_of(job_of(off))["WIREGUARD"] == ""
    (role,) = [d for d in on if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": ["cilium.io"], "resources": ["ciliumnodes"], "verbs": ["list"]},
                             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]  # fmt: skip
    assert not [d for d in off if d["kind"].startswith("ClusterRole")]
