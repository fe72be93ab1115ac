"""The canary rollout: its plan, its Lambda as packaged, its limits, and its runs on the local harness.

The runs (checks/rollout_harness.py) are the Lambda as the Provider framework runs it, its kubectl calls
through aws-cdk-lib's own handler onto the live CiliumEnvoyConfig, a real Envoy with cilium-envoy's
extension set carrying the traffic, and a real Prometheus evaluating the stack's rule file as the gate.
"""

from __future__ import annotations

import io
import dataclasses
import json
import math
import re
import time
import urllib.error
import urllib.request

import pytest
import yaml
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from cilium_mesh.rollout import HANDLER_TIMEOUT, LAMBDA_FILES, PACKAGE_DIR
from cilium_mesh.rollout_plan import (
    GET_TIMEOUT_S,
    INVOKE_ATTEMPTS,
    INVOKE_READ_TIMEOUT_S,
    MAX_ROLLOUT_S,
    MIN_PAUSE_S,
    QUERY_INTERVAL_S,
    QUERY_TIMEOUT_S,
    RESOURCE_TYPE,
    SERVICE_TIMEOUT_S,
    STATE_ANNOTATION,
    KUBECTL_GRACE_S,
    VOLUME_WAIT_FACTOR,
    Reading,
    RolloutSettings,
    breach,
    gaining_versions,
    gate_queries,
    plan,
    step_weights,
    with_state,
)
from cilium_mesh.declaration import sample_service, services
from cilium_mesh.traffic import MeshService
from conftest import ROLLOUT

from checks.rollout_harness import (
    KUBECTL_HANDLER,
    LOCAL_INTERVAL_S,
    LOCAL_SETTINGS,
    PREVIOUS,
    RATE_PER_S,
    SCENARIOS,
    SUITE_SCENARIOS,
    TARGET,
    answer_aws,
    event,
    invoke_error,
    policy_of,
    rollout_lambda,
)

DEFAULT = RolloutSettings()
# The kubectl handler's get sleeps this long between its polls (aws-cdk-lib get/__init__.py).
GET_POLL_SLEEP_S = 10
# CloudFormation's limit for a custom resource (AWS::CloudFormation::CustomResource ServiceTimeout).
CLOUDFORMATION_MAX_S = 3600
LAMBDA_MAX_S = 900


def shares(weights: dict[str, int]) -> dict[str, float]:
    return {v: w / sum(weights.values()) for v, w in weights.items()}


@pytest.mark.parametrize(
    ("old", "new"),
    [({"v1": 100, "v2": 0}, {"v1": 0, "v2": 100}), ({"v1": 50, "v2": 50}, {"v1": 90, "v2": 10}), ({"v1": 1}, {"v1": 2, "v2": 1})],
)
def test_each_step_moves_its_percentage_of_the_change_and_the_last_is_the_new_weights(old, new):
    steps = plan(old, new, DEFAULT)
    assert len(steps) == len(DEFAULT.steps) and steps[-1] == new
    for percent, weights in zip(DEFAULT.steps[:-1], steps[:-1]):
        assert sum(weights.values()) == 1000
        for version in new:
            expected = shares(old).get(version, 0) + percent / 100 * (shares(new)[version] - shares(old).get(version, 0))
            assert abs(shares(weights)[version] - expected) <= 0.001, (percent, version)


def test_nothing_is_stepped_without_settings_a_previous_split_or_a_change_of_it():
    new = {"v1": 90, "v2": 10}
    assert plan(None, new, DEFAULT) == [new]  # a Create
    assert plan({"v1": 90, "v2": 10}, new, None) == [new]  # no rollout setting
    assert plan({"v1": 9, "v2": 1}, new, DEFAULT) == [new]  # the same split, written differently
    assert gaining_versions({"v1": 50, "v2": 50}, new) == ("v1",)
    assert step_weights({"v1": 100, "v3": 0}, {"v1": 50, "v2": 50}, 10) == {"v1": 950, "v2": 50, "v3": 0}


def test_the_gate_judges_errors_and_latency_only_with_enough_traffic_and_ejection_at_once():
    settings = RolloutSettings(min_request_rate=1.0)
    quiet = Reading("v2", error_ratio=0.5, p99_ms=9000.0, ejected_hosts=0.0, request_rate=0.2)
    assert breach(settings, quiet) is None
    assert "failed 50.0%" in breach(settings, Reading("v2", 0.5, 10.0, 0.0, 2.0))
    assert "p99 9000 ms" in breach(settings, Reading("v2", 0.0, 9000.0, 0.0, 2.0))
    assert "ejected 1 host" in breach(settings, Reading("v2", None, None, 1.0, None))
    assert breach(settings, Reading("v2", 0.05, 500.0, 0.0, 2.0)) is None  # at the budgets is within them
    assert gate_queries("shop", "payments", "v2")["error_ratio"] == 'mesh_service:errors:ratio2m{namespace="shop", service="payments", version="v2"}'


def test_every_gate_query_reads_a_recorded_series_of_the_rule_file():
    from cilium_mesh.metrics_files import rule_file

    sample = sample_service()
    groups = yaml.safe_load(rule_file([sample]))["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    assert {q.split("{")[0] for q in gate_queries(sample.namespace, sample.name, "v2").values()} <= recorded


def test_the_lambda_package_holds_exactly_its_three_files(synth):
    """As the asset holds them: the handlers import traffic and rollout_plan as top-level modules."""
    function = synth.resource(synth.stack.traffic.functions["IsComplete"])
    asset = synth.outdir / f"asset.{function['Properties']['Code']['S3Key'].removesuffix('.zip')}"
    assert sorted(p.name for p in asset.iterdir()) == sorted(LAMBDA_FILES)
    for name in LAMBDA_FILES:
        assert (asset / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()
    handlers = {synth.resource(f)["Properties"]["Handler"] for f in synth.stack.traffic.functions.values()}
    assert handlers == {"rollout_lambda.on_event", "rollout_lambda.is_complete"}
    with rollout_lambda() as module:
        assert callable(module.on_event) and callable(module.is_complete)


def test_timeouts_and_intervals_fit_lambda_step_functions_and_cloudformation(synth):
    """One poll fits its Lambda; the waiter's attempts cover the hour; the longest rollout fits the hour."""
    traffic = synth.stack.traffic
    resource = synth.resource(traffic.resources["workshop/catalogdetail"])["Properties"]
    assert int(resource["ServiceTimeout"]) == SERVICE_TIMEOUT_S <= CLOUDFORMATION_MAX_S
    machine = next(iter(r for k, r in synth.resources("AWS::StepFunctions::StateMachine").items() if "Traffic" in k))
    definition = json.loads("".join(p if isinstance(p, str) else "<ARN>" for p in machine["Properties"]["DefinitionString"]["Fn::Join"][1]))
    (retry,) = definition["States"]["framework-isComplete-task"]["Retry"]
    assert retry["IntervalSeconds"] == QUERY_INTERVAL_S and retry["BackoffRate"] == 1
    assert retry["MaxAttempts"] * QUERY_INTERVAL_S == SERVICE_TIMEOUT_S
    for function in traffic.functions.values():
        timeout = synth.resource(function)["Properties"]["Timeout"]
        assert timeout == HANDLER_TIMEOUT.to_seconds() <= LAMBDA_MAX_S
    # One is_complete: one kubectl get (its polls, then the handler's own start) and the gate's queries
    # for two versions, then at most one apply; all within the Lambda's timeout.
    assert GET_TIMEOUT_S + GET_POLL_SLEEP_S < INVOKE_READ_TIMEOUT_S
    invoke_s = INVOKE_ATTEMPTS * INVOKE_READ_TIMEOUT_S
    assert 2 * invoke_s + 2 * len(gate_queries("workshop", "catalogdetail", "v2")) * QUERY_TIMEOUT_S < HANDLER_TIMEOUT.to_seconds()
    # The gate is read several times per pause, and the longest rollout leaves margin in the hour.
    assert QUERY_INTERVAL_S * 4 <= MIN_PAUSE_S
    assert DEFAULT.worst_case_s <= MAX_ROLLOUT_S <= SERVICE_TIMEOUT_S - 10 * 60
    # A failing kubectl provider stops the rollout, with its own line, before the waiter's hour ends.
    assert MAX_ROLLOUT_S + KUBECTL_GRACE_S + QUERY_INTERVAL_S < SERVICE_TIMEOUT_S


def test_the_rollout_may_invoke_only_the_kubectl_handler_read_only_its_stack_and_query_only_its_workspace(synth, synth_eni):
    def statements(s, name):
        role = s.resource(s.stack.traffic.functions[name])["Properties"]["Role"]["Fn::GetAtt"][0]
        policy = next(r for r in s.resources("AWS::IAM::Policy").values() if r["Properties"]["Roles"] == [{"Ref": role}])
        return {st["Action"]: st["Resource"] for st in policy["Properties"]["PolicyDocument"]["Statement"]}

    handler = {"Fn::GetAtt": [synth.logical_id(synth.stack.cluster.node.find_child("KubectlProvider").node.find_child("Handler")), "Arn"]}
    assert statements(synth, "OnEvent") == {"lambda:InvokeFunction": handler, "cloudformation:DescribeStacks": {"Ref": "AWS::StackId"}}
    workspace = {"Fn::GetAtt": [synth.logical_id(synth.stack.metrics.workspace), "Arn"]}
    assert statements(synth, "IsComplete") == {"lambda:InvokeFunction": handler, "aps:QueryMetrics": workspace}
    assert "aps:QueryMetrics" not in statements(synth_eni, "IsComplete")  # no rollout setting, no gate


def test_the_gate_properties_and_its_rules_come_only_with_a_rollout_setting(synth, synth_eni):
    with_rollout = synth.resource(synth.stack.traffic.resources["workshop/catalogdetail"])
    assert json.loads(with_rollout["Properties"]["Rollout"]) == {**ROLLOUT, "load": None}
    assert with_rollout["Properties"]["QueryUrl"]["Fn::Join"][1][1] == "api/v1/query"
    assert synth.logical_id(synth.stack.metrics.rules) in with_rollout["DependsOn"]
    at_once = synth_eni.resource(synth_eni.stack.traffic.resources["workshop/catalogdetail"])
    assert {"Rollout", "QueryUrl"}.isdisjoint(at_once["Properties"]) and at_once["Type"] == RESOURCE_TYPE


def test_gate_queries_are_signed_for_amp(monkeypatch):
    """POSTs to the workspace's query URL with SigV4 for service aps, from the Lambda's credentials."""
    sent = []

    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def read(self):
            return b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]},{"metric":{},"value":[1,"0.25"]}]}}'

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: sent.append((request, timeout)) or Answer())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    url = "https://aps-workspaces.us-west-2.amazonaws.com/workspaces/ws-1/api/v1/query"
    with rollout_lambda() as module:
        assert module.Prometheus(url, "us-west-2").value('catalogdetail:errors:ratio2m{version="v2"}') == 0.25
    ((request, timeout),) = sent
    headers = {k.lower(): v for k, v in request.header_items()}
    assert (request.full_url, request.get_method(), timeout) == (url, "POST", QUERY_TIMEOUT_S)
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/us-west-2/aps/aws4_request" in headers["authorization"] and "x-amz-date" in headers
    assert request.data == b"query=catalogdetail%3Aerrors%3Aratio2m%7Bversion%3D%22v2%22%7D"


@pytest.mark.parametrize(
    ("failure", "kind", "line"),
    [
        (urllib.error.HTTPError("u", 503, "Service Unavailable", {}, None), "AmpUnavailable", "HTTP 503"),
        (urllib.error.HTTPError("u", 429, "Too Many Requests", {}, None), "AmpUnavailable", "HTTP 429"),
        (TimeoutError("timed out"), "AmpUnavailable", f"no answer in {QUERY_TIMEOUT_S} s"),
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "AmpUnavailable", "[Errno 111] Connection refused"),
        (urllib.error.HTTPError("u", 403, "Forbidden", {}, io.BytesIO(b"User is not authorized\n")), "AmpRefused",
         "AMP refused 'up' (HTTP 403: User is not authorized)"),
    ],
    ids=["503", "429", "timeout", "refused", "403"],
)
def test_amp_failures_are_told_apart_as_retried_or_final(monkeypatch, failure, kind, line):
    """Throttling, server errors and no answer are waited out; any other refusal will not heal."""

    def fail(request, timeout):
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with rollout_lambda() as module:
        with pytest.raises(getattr(module, kind)) as raised:
            module.Prometheus("https://aps-workspaces.us-west-2.amazonaws.com/workspaces/ws-1/api/v1/query", "us-west-2").value("up")
    assert str(raised.value) == line


class FailingKubectl:
    """The kubectl provider's handler failing every call (or only applies), as its FunctionError makes Kubectl raise."""

    def __init__(self, module, state: dict | None = None):
        self.module, self.state = module, state

    def __call__(self, function, cluster_name):
        return self

    def annotation(self, document, key):
        if self.state is None:
            raise self.module.KubectlFailed("kubectl provider: Unable to connect to the server: dial tcp: i/o timeout")
        return json.dumps(self.state)

    def apply(self, document):
        raise self.module.KubectlFailed("kubectl provider: error: You must be logged in to the server (Unauthorized)")


def rollout_event(deadline: float) -> dict:
    return {**event("Update", TARGET, PREVIOUS, LOCAL_SETTINGS, "https://aps.example/api/v1/query", "rollout"),
            "Data": {"Steps": json.dumps(plan(PREVIOUS.weights, TARGET.weights, LOCAL_SETTINGS)), "Gaining": '["v2"]',
                     "Deadline": json.dumps(deadline), "Applied": "true"}}  # fmt: skip


def test_a_failing_kubectl_provider_is_waited_out_at_most_until_the_rollouts_deadline(monkeypatch):
    with rollout_lambda() as module:
        monkeypatch.setattr(module, "Kubectl", FailingKubectl(module))
        assert module.is_complete(rollout_event(time.time() + 60)) == {"IsComplete": False}
        with pytest.raises(module.RolloutStopped) as stopped:
            module.is_complete(rollout_event(time.time() - 1))
    assert str(stopped.value) == (
        "rollout stopped at an unknown step of 3: its state was not read by the rollout's deadline: kubectl provider:"
        " Unable to connect to the server: dial tcp: i/o timeout; could not restore v1 100%, v2 0% (kubectl provider:"
        " error: You must be logged in to the server (Unauthorized)): CloudFormation's rollback applies them")  # fmt: skip


def test_a_stop_that_cannot_restore_says_so_and_leaves_it_to_cloudformations_rollback(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    with rollout_lambda() as module:
        now = time.time()
        state = {"request": "rollout", "step": 0, "since": now - 12, module.AMP_UNANSWERED: now - 11.6}
        monkeypatch.setattr(module, "Kubectl", FailingKubectl(module, state))
        monkeypatch.setattr(module.Prometheus, "value", lambda self, expr: (_ for _ in ()).throw(module.AmpUnavailable("HTTP 503")))
        with pytest.raises(module.RolloutStopped) as stopped:
            module.is_complete(rollout_event(time.time() + 60))
    assert str(stopped.value) == (
        "rollout stopped at step 1 of 3 (v1 90%, v2 10%): AMP did not answer for 12 s (HTTP 503); could not restore"
        " v1 100%, v2 0% (kubectl provider: error: You must be logged in to the server (Unauthorized)):"
        " CloudFormation's rollback applies them")  # fmt: skip


# What the gate reads of a healthy version with enough traffic.
HEALTHY = {"error_ratio": 0.0, "p99_ms": 10.0, "ejected_hosts": 0.0, "request_rate": 5.0}


class RecordingKubectl:
    """The kubectl provider answering, each apply recorded (its state annotation)."""

    def __init__(self, state: dict):
        self.state, self.applied = state, []

    def __call__(self, function, cluster_name):
        return self

    def annotation(self, document, key):
        return json.dumps(self.state)

    def apply(self, document):
        self.applied.append(json.loads(document["metadata"]["annotations"][STATE_ANNOTATION]))


@pytest.mark.parametrize(("elapsed_s", "applies"), [(2, [{"step": 0}]), (60, [{"step": 1}])], ids=["waits", "passes"])
def test_a_poll_makes_at_most_one_apply_when_amp_answers_again(monkeypatch, elapsed_s, applies):
    """The note of AMP's silence goes with the poll's one apply: the cleared note while the step waits, or the
    next step's fresh state; so a poll stays a get and one apply, as its Lambda's timeout is sized."""
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    with rollout_lambda() as module:
        now = time.time()
        kubectl = RecordingKubectl({"request": "rollout", "step": 0, "since": now - elapsed_s, module.AMP_UNANSWERED: now - 30})
        monkeypatch.setattr(module, "Kubectl", kubectl)
        monkeypatch.setattr(module.Prometheus, "reading", lambda self, service, version: Reading(version, **HEALTHY))
        assert module.is_complete(rollout_event(now + 600)) == {"IsComplete": False}
    assert [{k: v for k, v in a.items() if k == "step"} for a in kubectl.applied] == applies
    assert all(module.AMP_UNANSWERED not in a for a in kubectl.applied)


@pytest.mark.parametrize("elapsed_s", [6, 60], ids=["in the step's wait", "after it"])
def test_a_next_step_that_cannot_be_applied_waits_only_until_the_end_of_the_steps_wait(monkeypatch, elapsed_s):
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    with rollout_lambda() as module:
        monkeypatch.setattr(module, "Kubectl", FailingKubectl(module, {"request": "rollout", "step": 0, "since": time.time() - elapsed_s}))
        monkeypatch.setattr(module.Prometheus, "reading", lambda self, service, version: Reading(version, **HEALTHY))
        if elapsed_s < VOLUME_WAIT_FACTOR * LOCAL_SETTINGS.pause_s:
            assert module.is_complete(rollout_event(time.time() + 600)) == {"IsComplete": False}
            return
        with pytest.raises(module.RolloutStopped) as stopped:
            module.is_complete(rollout_event(time.time() + 600))
    assert str(stopped.value).startswith(
        "rollout stopped at step 1 of 3 (v1 90%, v2 10%): step 2 was not applied by the end of the step's wait (60 s):"
        " kubectl provider: error: You must be logged in to the server (Unauthorized); could not restore v1 100%, v2 0%")


class Handler:
    """The kubectl provider's handler behind Lambda's Invoke (answer_aws: botocore's Lambda model), over
    CiliumEnvoyConfigs by namespace and name: an apply puts its documents (each one recorded), a get
    answers the state annotation. A call whose resource type is in ``failing`` (module.GET: a read,
    module.APPLY: an apply) fails, as the handler's exception reaches Kubectl: a FunctionError."""

    def __init__(self, *documents: dict):
        self.objects = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in documents}
        self.applied: list[dict] = []
        self.failing: set[str] = set()

    def invoke(self, event: dict) -> dict | None:
        properties = event["ResourceProperties"]
        if event["ResourceType"] in self.failing:
            raise RuntimeError("Unable to connect to the server: dial tcp: i/o timeout")
        if "ObjectName" in properties:
            document = self.objects[properties["ObjectNamespace"], properties["ObjectName"]]
            return {"Data": {"Value": document["metadata"]["annotations"][STATE_ANNOTATION]}}
        for document in json.loads(properties["Manifest"]):
            self.objects[document["metadata"]["namespace"], document["metadata"]["name"]] = document
            self.applied.append(document)
        return None

    def states(self) -> list[dict]:
        return [json.loads(d["metadata"]["annotations"][STATE_ANNOTATION]) for d in self.applied]


def deployed(service: MeshService) -> dict:
    """The service's CiliumEnvoyConfig as the last deploy left it."""
    return with_state(service.cilium_envoy_config(), {"request": "previous-deploy", "step": 0, "since": 0})


class Clock:
    """The Lambda's time.time(), which the test moves on: a step's wait in no time."""

    def __init__(self):
        self.now = time.time()

    def time(self) -> float:
        return self.now


QUERY_URL = "https://aps.example/api/v1/query"
THROTTLED = invoke_error("TooManyRequestsException", 429, "Rate Exceeded.")
DENIED = invoke_error("AccessDeniedException", 403, "User is not authorized to perform: lambda:InvokeFunction")


def started(module, monkeypatch, handler: Handler, failures: list | None = None):
    """The Lambda answered by ``handler`` (Invoke's ``failures`` first), its clock, and PREVIOUS -> TARGET's
    on_event done: the event its polls get (the framework's: on_event's result merged in)."""
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    answer_aws(module, handler, lambda: "UPDATE_IN_PROGRESS", failures)
    clock = Clock()
    monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(module.Prometheus, "reading", lambda self, service, version: Reading(version, **HEALTHY))
    update = event("Update", TARGET, PREVIOUS, LOCAL_SETTINGS, QUERY_URL, "rollout")
    return {**update, **module.on_event(update)}, clock


NOT_INVOKED = "kubectl provider not invoked: An error occurred ({}) when calling the Invoke operation: {}"


@pytest.mark.parametrize(
    ("failure", "kind", "line"),
    [
        (THROTTLED, "KubectlFailed", NOT_INVOKED.format("TooManyRequestsException", "Rate Exceeded.")),
        (invoke_error("ServiceException", 500, "Internal error"), "KubectlFailed", NOT_INVOKED.format("ServiceException", "Internal error")),
        (ReadTimeoutError(endpoint_url="https://lambda.us-west-2.amazonaws.com/x"), "KubectlFailed",
         'kubectl provider not invoked: Read timeout on endpoint URL: "https://lambda.us-west-2.amazonaws.com/x"'),
        (EndpointConnectionError(endpoint_url="https://lambda.us-west-2.amazonaws.com/x"), "KubectlFailed",
         'kubectl provider not invoked: Could not connect to the endpoint URL: "https://lambda.us-west-2.amazonaws.com/x"'),
        (DENIED, "KubectlRefused", NOT_INVOKED.format("AccessDeniedException", "User is not authorized to perform: lambda:InvokeFunction")),
        (invoke_error("ResourceNotFoundException", 404, f"Function not found: {KUBECTL_HANDLER}"), "KubectlRefused",
         NOT_INVOKED.format("ResourceNotFoundException", f"Function not found: {KUBECTL_HANDLER}")),
    ],
    ids=["429", "500", "read timeout", "no connection", "403", "404"],
)  # fmt: skip
def test_invoke_failures_are_told_apart_as_retried_or_final(failure, kind, line):
    """Invoke's own errors, after the client's retries: throttling, Lambda's faults and no answer are waited
    out as a failing handler is; a refusal will not heal. Either is one line, never botocore's traceback."""
    with rollout_lambda() as module:
        answer_aws(module, Handler(), lambda: "UPDATE_IN_PROGRESS", [failure])
        with pytest.raises(getattr(module, kind)) as raised:
            module.Kubectl(KUBECTL_HANDLER, "cilium-mesh").apply(PREVIOUS.cilium_envoy_config())
    assert str(raised.value) == line


@pytest.mark.parametrize(
    ("failure", "stop"),
    [(THROTTLED, " by the end of the step's wait (11 s): {}; restored v1 100%, v2 0%"),
     (DENIED, ": {}; could not restore v1 100%, v2 0%: CloudFormation's rollback applies them")],
    ids=["throttled: waited out", "refused: at once"],
)  # fmt: skip
def test_an_invoke_that_fails_in_a_step_is_waited_out_as_the_handler_is_and_a_refused_one_stops_at_once(monkeypatch, failure, stop):
    """Throttled, the two reads of the step's wait; refused, the read and the restore (it refuses every call)."""
    with rollout_lambda() as module:
        handler = Handler(deployed(PREVIOUS))
        failures = []
        polled, clock = started(module, monkeypatch, handler, failures)
        clock.now += 1
        assert module.is_complete(polled) == {"IsComplete": False}  # step 1's pause
        failures += [failure, failure]
        with pytest.raises(module.RolloutStopped) as stopped:
            if failure is THROTTLED:
                clock.now += 5
                assert module.is_complete(polled) == {"IsComplete": False}
                clock.now += 5
            module.is_complete(polled)
    error = NOT_INVOKED.format(failure["Error"]["Code"], failure["Error"]["Message"])
    assert str(stopped.value) == "rollout stopped at step 1 of 3 (v1 90%, v2 10%): its state was not read" + stop.format(error)
    assert not failures
    restored = [dict(policy_of(d, PREVIOUS).weights) for d in handler.applied[1:]]
    assert restored == ([dict(PREVIOUS.weights)] if failure is THROTTLED else [])


@pytest.mark.parametrize("known", [True, False], ids=["the step read before", "a Lambda new to the rollout"])
def test_a_state_that_cannot_be_read_is_waited_out_only_until_the_end_of_the_steps_wait(monkeypatch, known):
    """Not the rollout's deadline: the read fails as a next step's apply or AMP does, and stops as they do.
    A Lambda that has not read the step counts from its first failed read (the step began before it)."""
    with rollout_lambda() as module:
        handler = Handler(deployed(PREVIOUS))
        polled, clock = started(module, monkeypatch, handler)
        clock.now += 1
        if known:
            assert module.is_complete(polled) == {"IsComplete": False}
        handler.failing.add(module.GET)
        assert module.is_complete(polled) == {"IsComplete": False}
        clock.now += 8
        assert module.is_complete(polled) == {"IsComplete": False}
        clock.now += 2
        with pytest.raises(module.RolloutStopped) as stopped:
            module.is_complete(polled)
    where, waited = ("step 1 of 3 (v1 90%, v2 10%)", 11) if known else ("an unknown step of 3", 10)
    assert str(stopped.value) == (
        f"rollout stopped at {where}: its state was not read by the end of the step's wait ({waited} s):"
        " kubectl provider: Unable to connect to the server: dial tcp: i/o timeout; restored v1 100%, v2 0%")  # fmt: skip
    assert dict(policy_of(handler.applied[-1], PREVIOUS).weights) == dict(PREVIOUS.weights)


def test_a_first_apply_that_fails_is_tried_again_by_the_polls(monkeypatch):
    """on_event returns at once (the framework's waiter does the waiting); the first poll applies step 1."""
    with rollout_lambda() as module:
        handler = Handler(deployed(PREVIOUS))
        handler.failing.add(module.APPLY)
        polled, clock = started(module, monkeypatch, handler)
        assert not handler.applied and polled["Data"]["Applied"] == "false"
        handler.failing.clear()
        clock.now += 1
        assert module.is_complete(polled) == {"IsComplete": False}
        clock.now += 1
        assert module.is_complete(polled) == {"IsComplete": False}  # it reads step 1, in its pause
    assert [dict(policy_of(d, PREVIOUS).weights) for d in handler.applied] == [PROMOTED[0]]
    assert [(s["request"], s["step"]) for s in handler.states()] == [("rollout", 0)]


def test_a_first_apply_that_keeps_failing_stops_at_the_end_of_the_steps_wait(monkeypatch):
    with rollout_lambda() as module:
        handler = Handler(deployed(PREVIOUS))
        handler.failing.add(module.APPLY)
        polled, clock = started(module, monkeypatch, handler)
        clock.now += 1
        assert module.is_complete(polled) == {"IsComplete": False}
        clock.now += 10
        with pytest.raises(module.RolloutStopped) as stopped:
            module.is_complete(polled)
    assert str(stopped.value) == (
        "rollout stopped at step 1 of 3 (v1 90%, v2 10%): step 1 was not applied by the end of the step's wait (10 s):"
        " kubectl provider: Unable to connect to the server: dial tcp: i/o timeout; could not restore v1 100%, v2 0%:"
        " CloudFormation's rollback applies them")  # fmt: skip
    assert not handler.applied


def test_a_first_apply_that_lambda_refuses_fails_the_update_at_once(monkeypatch):
    with rollout_lambda() as module:
        with pytest.raises(module.RolloutStopped) as stopped:
            started(module, monkeypatch, Handler(deployed(PREVIOUS)), [DENIED])
    assert str(stopped.value) == ("rollout stopped at step 1 of 3 (v1 90%, v2 10%): step 1 was not applied: "
                                  + NOT_INVOKED.format("AccessDeniedException", DENIED["Error"]["Message"]))  # fmt: skip


def test_two_services_rolling_out_in_one_deploy_are_judged_apart(monkeypatch):
    """Each service has its own resource, polled side by side against one AMP: each reads only its own series
    (its namespace and service labels) and writes only its own CiliumEnvoyConfig. catalogdetail's v2 fails
    30% and stops, restoring catalogdetail's previous weights; payments' v2 is healthy and completes."""
    payments = dataclasses.replace(PREVIOUS, name="payments", namespace="shop")
    rollouts = {"CatalogdetailRollout": (PREVIOUS, TARGET), "PaymentsRollout": (payments, payments.with_weights(TARGET.weights))}
    series = {("workshop", "catalogdetail"): {**HEALTHY, "error_ratio": 0.3}, ("shop", "payments"): HEALTHY}
    recorded = {expr.split("{")[0]: name for name, expr in gate_queries("n", "s", "v").items()}

    def amp(self, expr):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', expr))
        return series[labels["namespace"], labels["service"]][recorded[expr.split("{")[0]]]

    with rollout_lambda() as module:
        handler = Handler(*(deployed(old) for old, _ in rollouts.values()))
        monkeypatch.setenv("AWS_REGION", "us-west-2")
        answer_aws(module, handler, lambda: "UPDATE_IN_PROGRESS")
        clock = Clock()
        monkeypatch.setattr(module, "time", clock)
        monkeypatch.setattr(module.Prometheus, "value", amp)
        running = {}
        for logical_id, (old, new) in rollouts.items():
            update = {**event("Update", new, old, LOCAL_SETTINGS, QUERY_URL, f"request-{logical_id}"), "LogicalResourceId": logical_id}
            running[logical_id] = {**update, **module.on_event(update)}
        outcomes = {}
        for _ in range(len(PROMOTED)):  # polls after each pause, both resources in each
            clock.now += LOCAL_SETTINGS.pause_s + 1
            for logical_id, polled in list(running.items()):
                try:
                    outcomes[logical_id] = module.is_complete(polled)["IsComplete"] or None
                except module.RolloutStopped as stopped:
                    outcomes[logical_id] = str(stopped)
                if outcomes[logical_id] is not None:
                    del running[logical_id]
    assert outcomes == {
        "CatalogdetailRollout": "rollout stopped at step 1 of 3 (v1 90%, v2 10%): v2 failed 30.0% of its requests"
                                " (budget 5.0%); restored v1 100%, v2 0%",
        "PaymentsRollout": True,
    }  # fmt: skip
    for logical_id, (old, _) in rollouts.items():
        mine = [(d, s) for d, s in zip(handler.applied, handler.states()) if s["owner"] == logical_id]
        assert {(d["metadata"]["namespace"], d["metadata"]["name"]) for d, _ in mine} == {(old.namespace, old.cec_name)}
        assert {s["request"] for _, s in mine} == {f"request-{logical_id}"}
    applied = {name: [dict(policy_of(d, old).weights) for d in handler.applied if d["metadata"]["name"] == old.cec_name]
               for name, (old, _) in rollouts.items()}  # fmt: skip
    assert applied == {"CatalogdetailRollout": [PROMOTED[0], dict(PREVIOUS.weights)], "PaymentsRollout": PROMOTED}


def test_the_dry_run_creates_the_envoy_config_at_once_and_deletes_it(synth, provider_steps):
    """Create (even with a rollout setting) applies the policy at once: nothing deployed to step from."""
    rollout = synth.logical_id(synth.stack.traffic.resources["workshop/catalogdetail"])
    created = next(s for s in provider_steps if s.logical_id == rollout and s.request_type == "Create")
    verbs = [c[1] if c[0] == "kubectl" and c[1] != "--kubeconfig" else c[3] if c[0] == "kubectl" else c[0] for c in created.commands]
    assert verbs == ["aws", "apply", "aws", "get"] and created.result.polls == 1
    (cec,) = created.manifests
    assert json.loads(cec["metadata"]["annotations"][STATE_ANNOTATION])["step"] == 0
    deleted = next(s for s in provider_steps if s.logical_id == rollout and s.request_type == "Delete")
    # The delete reads who owns the CiliumEnvoyConfig first (this resource: it deletes it).
    assert [c[1] if c[1] != "--kubeconfig" else c[3] for c in deleted.commands if c[0] == "kubectl"] == ["get", "delete"]


def test_local_settings_differ_from_the_stacks_only_in_time():
    assert (LOCAL_SETTINGS.steps, LOCAL_SETTINGS.max_error_ratio, LOCAL_SETTINGS.max_p99_ms) == (
        DEFAULT.steps, DEFAULT.max_error_ratio, DEFAULT.max_p99_ms)  # fmt: skip
    assert LOCAL_SETTINGS.pause_s < MIN_PAUSE_S and LOCAL_SETTINGS.min_request_rate < DEFAULT.min_request_rate


# What each run must show: its outcome, the weights it applied, and where the rollout left the split.
PROMOTED = plan(PREVIOUS.weights, TARGET.weights, LOCAL_SETTINGS)
EXPECTED = {
    "healthy v2": ("SUCCESS", None, PROMOTED, TARGET.weights),
    "v2 answers 503 on 30%": ("FAILED", "rollout stopped at step 1 of 3 (v1 90%, v2 10%): ", [PROMOTED[0], PREVIOUS.weights], PREVIOUS.weights),
    "v2 goes down at step 2": ("FAILED", "rollout stopped at step 2 of 3 (v1 50%, v2 50%): Envoy ejected ", [*PROMOTED[:2], PREVIOUS.weights], PREVIOUS.weights),
    "AMP answers 503 once": ("SUCCESS", None, PROMOTED, TARGET.weights),
    "AMP down throughout": ("FAILED", "rollout stopped at step 1 of 3 (v1 90%, v2 10%): AMP did not answer for ", [PROMOTED[0], PREVIOUS.weights], PREVIOUS.weights),
    "a quiet service": ("FAILED", "rollout stopped at step 1 of 3 (v1 90%, v2 10%): v2 was asked 0.00 requests/s in ", [PROMOTED[0], PREVIOUS.weights], PREVIOUS.weights),
    "a quiet service with the rollout's load": ("SUCCESS", None, PROMOTED, TARGET.weights),
}  # fmt: skip
# Retries and failover hide v2's failures from the callers: at most this share of requests failed
# (measured: 0 to 0.75%, the requests caught between v2 going down and its ejection, or by the restore,
# which removes v2's cluster before the route that names it is replaced).
MAX_FAILED_SHARE = 0.02
# A poll here: one scrape, one evaluation, one poll interval, each a second; and slack for a loaded machine.
POLL_BOUND_S = 3 * LOCAL_INTERVAL_S + 5.0


def test_the_suite_runs_the_issues_scenarios():
    assert set(EXPECTED) == set(SUITE_SCENARIOS) < set(SCENARIOS)


@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_each_scenario_promotes_or_stops_where_it_must(rollout_runs, scenario):
    run = rollout_runs[scenario]
    status, reason, steps, live = EXPECTED[scenario]
    assert run["status"] == status, run["reason"]
    assert (run["reason"] or "").startswith(reason or ""), run["reason"]
    assert run["reason"] is None or run["reason"].endswith("restored v1 100%, v2 0%")
    if scenario == "v2 answers 503 on 30%":  # its error ratio, or Envoy's ejection after 5 errors in a row
        assert ": v2 failed " in run["reason"] or ": Envoy ejected " in run["reason"], run["reason"]
    assert run["steps"] == [dict(s) for s in steps]
    assert run["live_weights"] == dict(live)
    assert run["failed"] <= MAX_FAILED_SHARE * run["requests"], run


def test_the_rollouts_load_lets_a_quiet_service_be_judged_and_ends_with_it(rollout_runs):
    """No caller sends anything: without a load the step has no evidence and stops; with rollout.load the
    Lambda applies its Deployment (run here as the process the pod would run), the gate judges v2 on its
    requests, counted apart in Envoy (the virtual cluster "load"), and the load is deleted at the end."""
    quiet, loaded = rollout_runs["a quiet service"], rollout_runs["a quiet service with the rollout's load"]
    assert quiet["requests"] == loaded["requests"] == 0
    assert quiet["load"] == {"started": 0, "stopped": 0, "still_running": 0, "counted_apart": 0}
    load = loaded["load"]
    assert (load["started"], load["stopped"], load["still_running"]) == (1, 1, 0)
    assert load["counted_apart"] >= 100, load


def test_one_unanswered_query_only_delays_the_step_it_falls_in(rollout_runs):
    """AMP's 503 fell on the poll that would have passed step 1: that poll waited, the next passed."""
    run = rollout_runs["AMP answers 503 once"]
    assert run["amp_failed_queries"] == 1
    (unanswered,) = [e for e in run["log"] if "amp_unavailable" in e]
    assert unanswered["amp_unavailable"] == "HTTP 503" and unanswered["step"] == 0
    assert unanswered["elapsed_s"] >= LOCAL_SETTINGS.pause_s
    later = [e for e in run["log"] if e.get("step") == 0 and "readings" in e and e["elapsed_s"] > unanswered["elapsed_s"]]
    assert later and not later[-1]["breaches"]


def test_amp_down_throughout_stops_at_the_end_of_the_steps_wait_with_one_line(rollout_runs):
    """No data is never a pass: every poll waited, and when step 1's own wait (2 pauses) was over the
    rollout stopped as a breach stops: the previous weights restored, one line naming what failed."""
    run = rollout_runs["AMP down throughout"]
    assert re.fullmatch(r"rollout stopped at step 1 of 3 \(v1 90%, v2 10%\): AMP did not answer for \d+ s \(HTTP 503\);"
                        r" restored v1 100%, v2 0%", run["reason"]), run["reason"]
    waited = int(re.search(r"for (\d+) s", run["reason"]).group(1))
    unanswered = [e for e in run["log"] if "amp_unavailable" in e]
    first, last = unanswered[0], unanswered[-1]
    # The stop came at the end of the step's wait; the line counts from the first poll AMP left unanswered.
    assert first["elapsed_s"] <= POLL_BOUND_S
    assert VOLUME_WAIT_FACTOR * LOCAL_SETTINGS.pause_s <= last["elapsed_s"] <= VOLUME_WAIT_FACTOR * LOCAL_SETTINGS.pause_s + POLL_BOUND_S
    assert abs(waited - (last["elapsed_s"] - first["elapsed_s"])) <= 1
    assert run["amp_failed_queries"] == len(unanswered) >= waited - 1
    assert not [e for e in run["log"] if "readings" in e]


def test_a_step_passes_only_after_its_pause_with_its_minimum_traffic(rollout_runs):
    """Each gated step of the healthy run passed at a poll after its pause with enough traffic, and no
    poll before it had both (the step waits for the later of the two)."""
    run = rollout_runs["healthy v2"]
    for step in range(len(PROMOTED) - 1):
        polls = [e for e in run["log"] if e.get("step") == step and "readings" in e]
        passing = polls[-1]
        assert passing["elapsed_s"] >= LOCAL_SETTINGS.pause_s and not passing["breaches"]
        assert passing["readings"][0]["request_rate"] >= LOCAL_SETTINGS.min_request_rate, passing
        for poll in polls[:-1]:
            assert poll["elapsed_s"] < LOCAL_SETTINGS.pause_s or (poll["readings"][0]["request_rate"] or 0) < LOCAL_SETTINGS.min_request_rate


def test_a_stopped_rollout_is_stopped_at_the_first_poll_that_can_judge_it(rollout_runs):
    """Ejection counts at once; an error ratio once the minimum traffic is there (about 11 s at 10%)."""
    assert rollout_runs["v2 goes down at step 2"]["detection_s"] <= POLL_BOUND_S
    to_volume_s = LOCAL_SETTINGS.min_request_rate * 120 / (RATE_PER_S * PROMOTED[0]["v2"] / 1000)
    assert rollout_runs["v2 answers 503 on 30%"]["detection_s"] <= to_volume_s + POLL_BOUND_S


@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_cloudformations_rollback_restores_the_previous_weights_at_once(rollout_runs, scenario):
    """The Update with the old properties, while the stack rolls back: one apply, no steps, no gate."""
    run = rollout_runs[scenario]
    assert run["rollback"] == {"status": "SUCCESS", "polls": 1}
    assert run["rollback_applies"] == [dict(PREVIOUS.weights)]


def test_every_poll_logs_what_the_gate_read(rollout_runs):
    run = rollout_runs["v2 answers 503 on 30%"]
    polls = [entry for entry in run["log"] if "readings" in entry]
    assert polls and polls[-1]["breaches"] and polls[-1]["readings"][0]["version"] == "v2"
    assert all(r["p99_ms"] is None or math.isfinite(r["p99_ms"]) for p in polls for r in p["readings"])


def test_the_policy_survives_its_trip_through_cloudformation():
    plain = dataclasses.replace(sample_service(weights={"v1": 90, "v2": 10}), pin_header=None, failover_to_drained=True)
    declared = services([{"name": "payments", "namespace": "shop", "port": 80, "target_port": 8080,
                          "versions": {v: {"app": "payments", "version": v} for v in ("v1", "v2", "v3")},
                          "routes": [{"headers": {"x-beta": "true"}, "methods": ["GET"], "to": "v3"}],
                          "mirror": {"version": "v3", "percent": 2.5}, "failover": ["v2", "v1"],
                          "retries": {"methods": ["GET", "POST"], "non_idempotent": True},
                          "callers": [{"namespace": "web", "labels": {"app": "shop"}, "http": [{"method": "GET", "path": "/.*"}]}]}])[0]  # fmt: skip
    for policy in (plain, declared):
        assert MeshService.from_json(policy.to_json()) == policy


class DeletingKubectl(RecordingKubectl):
    """The kubectl provider answering the annotation of a CiliumEnvoyConfig, each delete recorded (kinds)."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.deleted = []

    def delete(self, *documents):
        self.deleted.append([d["kind"] for d in documents])


@pytest.mark.parametrize(("owner", "deleted"), [("ServiceNew", []), ("ServiceOld", [["CiliumEnvoyConfig"]]), (None, [["CiliumEnvoyConfig"]])],
                         ids=["a newer resource owns it", "its own", "written before owners"])  # fmt: skip
def test_a_delete_removes_the_envoy_config_only_when_it_still_owns_it(monkeypatch, owner, deleted):
    """An upgrade that gives a service's rollout a new logical ID creates the new resource (which applies the
    CiliumEnvoyConfig) before it deletes the old one: the old one's Delete must not take the policy away."""
    state = {"request": "earlier", "step": 0, "since": 0, **({"owner": owner} if owner else {})}
    with rollout_lambda() as module:
        kubectl = DeletingKubectl(state)
        monkeypatch.setattr(module, "Kubectl", kubectl)
        delete = {**event("Delete", PREVIOUS, None, None, "https://aps.example/api/v1/query", "delete"), "LogicalResourceId": "ServiceOld"}
        module.on_event(delete)
    assert kubectl.deleted == deleted


def test_every_state_the_rollout_writes_names_its_owner(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    with rollout_lambda() as module:
        now = time.time()
        kubectl = RecordingKubectl({"request": "rollout", "step": 0, "since": now - 60})
        monkeypatch.setattr(module, "Kubectl", kubectl)
        monkeypatch.setattr(module.Prometheus, "reading", lambda self, service, version: Reading(version, **HEALTHY))
        module.is_complete(rollout_event(now + 600))
    assert kubectl.applied and all(a["owner"] == rollout_event(0)["LogicalResourceId"] for a in kubectl.applied)
