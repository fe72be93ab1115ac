"""The rollout Lambda, run the way the Provider framework runs it, against the local harness.

What is real:
  the Lambda           rollout.LAMBDA_FILES, imported from a directory of their own as the Lambda
                       package holds them (top-level modules rollout_lambda, rollout_plan, traffic);
  its Kubernetes calls each Lambda invocation of the kubectl provider is handed to aws-cdk-lib's own
                       kubectl handler (checks/provider_dry_run.py), whose subprocess answers from a
                       live CiliumEnvoyConfig: an apply (validated against Cilium's CRD schema) changes
                       the object and hands its resources to the running Envoy; a get prints the
                       annotation with the kubectl layer's real jsonpath printer;
  the traffic          cilium-envoy's extension set in a real Envoy, routes and clusters over xDS from
                       files (changed in place at each step, as Cilium's xDS changes them), stand-in
                       versions with the faults of each scenario, a paced client;
  the gate             a real Prometheus scraping that Envoy and evaluating the stack's rule file,
                       served under an AMP workspace's path, queried with SigV4-signed POSTs;
  the AWS calls        botocore clients with the services' real models (Lambda Invoke, CloudFormation
                       DescribeStacks), answered in process; Invoke's own errors (answer_aws's
                       failures) raised as the model's exceptions.

What differs from AWS: the framework's waiter is this module's loop (framework.js semantics: on_event,
then is_complete at once and every interval; an error fails the resource with its message; MaxAttempts
exhausted is "Operation timed out"), and time is shorter: pauses of seconds, scrapes and evaluations
every second, the gate polled every second. The rules' 2-minute rate windows divide by 2 minutes, so a
few seconds of a step read as a lower request rate than AMP reads after a full pause: the local
minimum rate is scaled down to match (LOCAL_SETTINGS); the error ratio, latency and ejection read the same.
AMP's outages are a loopback front of that Prometheus (AmpFront) answering 503 Service Unavailable, as
AMP answers when it cannot serve; a throttle (429) or a timeout reaches the Lambda's same path, which its
unit tests cover with urllib's own errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import subprocess
import urllib.parse
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import botocore.session
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody

from cilium_mesh.metrics_files import rule_file
from cilium_mesh.rollout import LAMBDA_FILES, PACKAGE_DIR
from cilium_mesh.rollout_load import load_documents_of
from cilium_mesh.rollout_plan import RESOURCE_TYPE, STATE_ANNOTATION, RolloutLoad, RolloutSettings, resource_properties, with_state
from cilium_mesh.declaration import sample_service
from cilium_mesh.traffic import MeshService
from checks import prometheus
from checks.cilium_envoy import build_for
from checks.envoy_harness import LOOPBACK, Fault, LoopbackHandler, LoopbackServer, running
from checks.metrics_harness import SCRAPE_INTERVAL_S, PacedClient
from checks.provider_dry_run import (
    Cluster,
    Recorder,
    Step,
    call_handler,
    cloudformation_strings,
    handler_modules,
    without_option,
)
from checks.schemas import validate_object

REGION = "us-west-2"
STACK_ID = f"arn:aws:cloudformation:{REGION}:123456789012:stack/CiliumMeshEks/0a1b2c3d-4e5f-6789-abcd-ef0123456789"
KUBECTL_HANDLER = f"arn:aws:lambda:{REGION}:123456789012:function:CiliumMeshEks-ClusterKubectlProviderHandler"
WORKSPACE_PATH = "/workspaces/ws-0123abcd-4567-89ef-0123-456789abcdef"
LAMBDA_MODULES = ("rollout_lambda", "rollout_plan", "traffic")
CLUSTER = Cluster(logical_id="Cluster", name="cilium-mesh", kubernetes_version="1.35")
# The canary the scenarios roll out: from v1 alone to v2 alone.
PREVIOUS = sample_service(weights={"v1": 100, "v2": 0})
TARGET = PREVIOUS.with_weights({"v1": 0, "v2": 100})
# Seconds instead of minutes, and the minimum rate scaled to a step of seconds in a 2-minute window:
# 0.375/s in rate2m is 45 requests, enough to tell 30% failures from the 5% budget (at most 2 of 45
# fail with a probability of 2e-5); at 100 requests/s, 10% reaches it after about 5 s, within the
# step's volume wait of 2 x 5 s.
LOCAL_SETTINGS = RolloutSettings(steps=(10, 50, 100), pause_s=5, min_request_rate=0.375, min_pause_s=1)
LOCAL_INTERVAL_S = 1.0
RATE_PER_S = 100.0
# The framework's attempts at the local interval: the longest rollout (every step waiting out its
# volume wait) plus margin, as SERVICE_TIMEOUT_S / QUERY_INTERVAL_S is for AWS.
LOCAL_MAX_ATTEMPTS = 60


@contextmanager
def rollout_lambda():
    """The Lambda's package, imported from a copy of its files (and nothing else) in a directory of its own."""
    with tempfile.TemporaryDirectory(prefix="rollout-lambda-") as directory:
        for name in LAMBDA_FILES:
            shutil.copy(PACKAGE_DIR / name, directory)
        saved = {name: sys.modules.pop(name) for name in LAMBDA_MODULES if name in sys.modules}
        sys.path.insert(0, directory)
        try:
            module = importlib.import_module("rollout_lambda")
        finally:
            sys.path.remove(directory)
            for name in LAMBDA_MODULES:
                sys.modules.pop(name, None)
            sys.modules.update(saved)
        yield module


@functools.cache
def _session() -> botocore.session.Session:
    """One botocore session, so that each service's model is read once (each client's events are its own)."""
    return botocore.session.get_session()


def _answering(service: str, operation: str, answer):
    """A botocore client of ``service`` (its real model validates every call) whose ``operation`` is
    answered by ``answer(params) -> parsed response`` instead of AWS (an error answer, as ``invoke_error``
    makes one, raises the model's exception for it; an exception ``answer`` raises, the client raises)."""
    client = _session().create_client(service, region_name=REGION, aws_access_key_id="AKIDLOCALHARNESS", aws_secret_access_key="local")

    def before_call(params, **_):
        parsed = answer(params)
        return AWSResponse(None, parsed.get("ResponseMetadata", {}).get("HTTPStatusCode", 200), {}, None), parsed

    client.meta.events.register(f"before-call.{service}.{operation}", before_call)
    return client


class LiveCluster:
    """The cluster as the kubectl provider's handler sees it: its objects (shared with the dry run's
    ready objects), changed by applies and deletes; each applied CiliumEnvoyConfig goes to ``on_apply``,
    each applied or deleted object of the rollout's load to ``on_load``."""

    def __init__(self, modules: dict, objects: dict, base: MeshService, on_apply=None, on_load=None):
        self.modules, self.objects, self.base = modules, objects, base
        self.on_apply = on_apply or (lambda policy, state: None)
        self.on_load = on_load or (lambda document, running: None)
        self.applied: list[tuple[float, dict[str, int], dict]] = []
        self.calls: list[Step] = []

    @property
    def key(self) -> tuple[str, str]:
        return ("ciliumenvoyconfig", self.base.cec_name)

    def apply(self, document: dict) -> None:
        validate_object(document, CLUSTER.kubernetes_version)
        if document["kind"] != "CiliumEnvoyConfig":  # the rollout's load: its Deployment and policy
            self.objects[(document["kind"].lower(), document["metadata"]["name"])] = document
            self.on_load(document, True)
            return
        policy = policy_of(document, self.base)
        self.objects[self.key] = document
        state = json.loads(document["metadata"]["annotations"][STATE_ANNOTATION])
        self.applied.append((time.monotonic(), dict(policy.weights), state))
        self.on_apply(policy, state)

    def delete(self, documents: list[dict]) -> None:
        for document in documents:
            if document["kind"] == "CiliumEnvoyConfig":
                self.objects.pop(self.key, None)
            elif self.objects.pop((document["kind"].lower(), document["metadata"]["name"]), None) is not None:
                self.on_load(document, False)

    @property
    def live(self) -> dict:
        return self.objects[self.key]

    def invoke(self, event: dict) -> dict | None:
        """One invocation of aws-cdk-lib's kubectl handler with this event."""
        step = Step(event["ResourceType"], event["ResourceType"], event["RequestType"])
        self.calls.append(step)
        return call_handler(self.modules, event, _LiveRecorder(step, self)).result


class _LiveRecorder(Recorder):
    """The dry run's recorder, whose applies and deletes change the live cluster."""

    def __init__(self, step: Step, cluster: LiveCluster):
        super().__init__(step, CLUSTER, cluster.objects)
        self.live = cluster

    def _answer(self, argv: list[str]) -> bytes:
        output = super()._answer(argv)
        verb = without_option(argv[1:], "--kubeconfig")[0] if argv[0] == "kubectl" else None
        if verb in ("apply", "create"):
            for document in self.step.manifests:
                self.live.apply(document)
        elif verb == "delete":
            self.live.delete(self.step.manifests)
        return output


def policy_of(document: dict, base: MeshService) -> MeshService:
    """The policy an applied CiliumEnvoyConfig renders: its split's weights on ``base``'s settings. Raises
    unless the document is exactly that policy's rendering (nothing but the weights may differ)."""
    versions = [s["name"].removeprefix(base.name) for s in document["spec"]["backendServices"]]
    (route,) = [r for r in document["spec"]["resources"] if r["@type"].endswith("RouteConfiguration")]
    split = route["virtual_hosts"][0]["routes"][-1]["route"]["weighted_clusters"]["clusters"]
    weighted = {c["name"].removeprefix(f"{base.name}-"): c["weight"] for c in split}
    policy = base.with_weights({v: weighted.get(v, 0) for v in versions})
    if policy.cilium_envoy_config()["spec"] != document["spec"]:
        raise AssertionError(f"the applied CiliumEnvoyConfig is not the rendering of weights {dict(policy.weights)}")
    return policy


@dataclass
class Outcome:
    """One custom-resource operation, as CloudFormation would see it."""

    status: str
    reason: str | None
    polls: int
    seconds: float


def operate(module, event: dict, interval_s: float, max_attempts: int) -> Outcome:
    """framework.js: onEvent, then isComplete at once and after each interval until it says complete;
    an exception fails the resource with its message; attempts exhausted is 'Operation timed out'."""
    started = time.monotonic()

    def outcome(status: str, reason: str | None, polls: int) -> Outcome:
        return Outcome(status, reason, polls, time.monotonic() - started)

    try:
        result = module.on_event(event)
    except Exception as error:  # noqa: BLE001 (safeHandler reports any error)
        return outcome("FAILED", str(error), 0)
    resource_event = {**event, **result}
    for polls in range(1, max_attempts + 2):
        try:
            if module.is_complete(resource_event)["IsComplete"]:
                return outcome("SUCCESS", None, polls)
        except Exception as error:  # noqa: BLE001
            return outcome("FAILED", str(error), polls)
        if polls <= max_attempts:
            time.sleep(interval_s)
    return outcome("FAILED", "Operation timed out", max_attempts + 1)


def event(request_type: str, new: MeshService, old: MeshService | None, settings: RolloutSettings | None,
          query_url: str, request_id: str) -> dict:  # fmt: skip
    """What CloudFormation sends the framework for the scenarios' rollout resource (with the load's
    documents when the settings ask for a load, as the stack renders them)."""
    def properties(policy: MeshService) -> dict:
        load = load_documents_of(dataclasses.replace(policy, rollout=settings), network_policy=True)
        return {"ServiceToken": "<framework onEvent>",
                **resource_properties(CLUSTER.name, KUBECTL_HANDLER, policy.to_json(), settings, query_url, load)}  # fmt: skip

    return _cloudformation_event(request_type, request_id, "TrafficRolloutC34CA7CD", properties(new),
                                 None if old is None else properties(old))  # fmt: skip


def _cloudformation_event(request_type: str, request_id: str, logical_id: str, properties: dict,
                          old_properties: dict | None = None) -> dict:  # fmt: skip
    """A custom-resource request as CloudFormation sends it: properties as strings (the Policy and
    Rollout are JSON text), the old ones with an Update, a physical ID after a Create."""
    payload = {
        "RequestType": request_type,
        "RequestId": request_id,
        "StackId": STACK_ID,
        "LogicalResourceId": logical_id,
        "ResourceType": RESOURCE_TYPE,
        "ResponseURL": "https://cloudformation-custom-resource-response-uswest2.s3.amazonaws.com/...",
        "ResourceProperties": properties,
    }
    if old_properties is not None:
        payload["OldResourceProperties"] = old_properties
    if request_type != "Create":
        policy = MeshService.from_json(properties["Policy"])
        payload["PhysicalResourceId"] = f"{policy.namespace}/{policy.cec_name}"
    return payload


@dataclass
class RolloutRun:
    """A scenario's rollout, then CloudFormation's rollback of it (as after a failure of any resource)."""

    name: str
    outcome: Outcome
    steps: list[dict[str, int]] = field(default_factory=list)
    requests: int = 0
    failed: int = 0
    served: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    detection_s: float | None = None
    rollback: Outcome | None = None
    rollback_applies: list[dict[str, int]] = field(default_factory=list)
    live_weights: dict[str, int] = field(default_factory=dict)
    amp_failed_queries: int = 0
    load: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.outcome.status,
            "reason": self.outcome.reason,
            "polls": self.outcome.polls,
            "total_s": round(self.outcome.seconds, 1),
            "steps": self.steps,
            "requests": self.requests,
            "failed": self.failed,
            "served": self.served,
            "statuses": self.statuses,
            "detection_s": None if self.detection_s is None else round(self.detection_s, 1),
            "rollback": None if self.rollback is None else {"status": self.rollback.status, "polls": self.rollback.polls},
            "rollback_applies": self.rollback_applies,
            "live_weights": self.live_weights,
            "amp_failed_queries": self.amp_failed_queries,
            "load": self.load,
            "log": self.log,
        }


def changes(applied: list[dict[str, int]]) -> list[dict[str, int]]:
    """The weights of each apply that changed them (an apply of the rollout's notes alone keeps them)."""
    return [weights for index, weights in enumerate(applied) if index == 0 or weights != applied[index - 1]]


@dataclass(frozen=True)
class Scenario:
    """v2's fault and the step (1-based) at whose apply it begins (0: from the start); AMP's: "one 503"
    answers 503 to the first query sent once the first step's pause is over (the poll that would pass
    it), "down" answers 503 to every query; the callers' rate (0: a quiet service); and the rollout's
    own load (rollout.load's rate_per_s; None: no load)."""

    fault: Fault = field(default_factory=Fault)
    fault_step: int = 0
    amp: str | None = None
    callers_rate_per_s: float = RATE_PER_S
    load_rate_per_s: float | None = None


SCENARIOS: dict[str, Scenario] = {
    "healthy v2": Scenario(),
    "v2 answers 503 on 30%": Scenario(Fault("errors", 0.3)),
    "v2 goes down at step 2": Scenario(Fault("down"), 2),
    "v2 without endpoints": Scenario(Fault("empty")),
    "AMP answers 503 once": Scenario(amp="one 503"),
    "AMP down throughout": Scenario(amp="down"),
    "a quiet service": Scenario(callers_rate_per_s=0),
    "a quiet service with the rollout's load": Scenario(callers_rate_per_s=0, load_rate_per_s=RATE_PER_S),
}
# What the suite runs: all but v2 without endpoints (a step that never gets its minimum traffic, as the
# quiet service's), which is for `python -m checks.rollout_harness`.
SUITE_SCENARIOS = tuple(name for name in SCENARIOS if name != "v2 without endpoints")


class AmpFront:
    """AMP's query endpoint as the Lambda reaches it: a loopback HTTP server that hands each POST to the
    local Prometheus, or answers 503 Service Unavailable as the scenario's AMP fault says."""

    def __init__(self, upstream: str, mode: str | None, pause_s: float):
        self.upstream, self.mode, self.pause_s = upstream, mode, pause_s
        self.first_query: float | None = None
        self.failed = 0
        front = self

        class Handler(LoopbackHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if front.fails_now():
                    front.failed += 1
                    self.reply(503, b"Service Unavailable", "text/plain")
                    return
                request = urllib.request.Request(f"{front.upstream}{self.path}", data=body, method="POST",
                                                 headers={"Content-Type": self.headers["Content-Type"]})  # fmt: skip
                with urllib.request.urlopen(request, timeout=10) as answer:
                    self.reply(200, answer.read())

        self.server = LoopbackServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fails_now(self) -> bool:
        now = time.monotonic()
        self.first_query = self.first_query if self.first_query is not None else now
        if self.mode == "down":
            return True
        return self.mode == "one 503" and not self.failed and now - self.first_query >= self.pause_s

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def __enter__(self) -> AmpFront:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_scenarios(names: list[str], tag: str, settings: RolloutSettings = LOCAL_SETTINGS,
                  rate_per_s: float = RATE_PER_S, interval_s: float = LOCAL_INTERVAL_S) -> list[RolloutRun]:  # fmt: skip
    """Each scenario: roll PREVIOUS out to TARGET with v2's fault, then CloudFormation's rollback of that
    update. Their Envoys and Prometheus servers start together (a Prometheus takes seconds to discover
    its target); the scenarios then run one after another."""
    with ExitStack() as stack:
        harnesses = [(name, _harness(stack, name, tag)) for name in names]
        return [run_scenario(name, harness, settings, rate_per_s, interval_s) for name, harness in harnesses]


def _harness(stack: ExitStack, name: str, tag: str) -> tuple:
    """The scenario's Envoy (v2 faulty from the start if the fault starts at once) and its Prometheus."""
    scenario = SCENARIOS[name]
    start_faults = {"v2": scenario.fault} if scenario.fault_step == 0 and scenario.fault.kind != "ok" else {}
    envoy, _, stand_ins = stack.enter_context(running(PREVIOUS, tag, start_faults, dynamic_clusters=True))
    job = prometheus.scrape_job("cilium-envoy", [envoy.admin], "/stats/prometheus", SCRAPE_INTERVAL_S)
    server = stack.enter_context(prometheus.running([job], rule_file([TARGET]), SCRAPE_INTERVAL_S, WORKSPACE_PATH))
    return envoy, stand_ins, server


def run_scenario(name: str, harness: tuple, settings: RolloutSettings, rate_per_s: float, interval_s: float) -> RolloutRun:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):  # the handlers' logs, as CloudWatch would keep them
        run = _run_scenario(name, harness, settings, rate_per_s, interval_s)
    run.log = [json.loads(line)["rollout"] for line in output.getvalue().splitlines() if line.startswith('{"rollout"')]
    return run


def _run_scenario(name: str, harness: tuple, settings: RolloutSettings, rate_per_s: float, interval_s: float) -> RolloutRun:
    scenario = SCENARIOS[name]
    fault, fault_step = scenario.fault, scenario.fault_step
    envoy, stand_ins, server = harness
    with ExitStack() as stack:
        module = stack.enter_context(rollout_lambda())
        server.wait_for_scrape()
        fault_at: list[float] = []

        def on_apply(policy: MeshService, state: dict) -> None:
            envoy.apply_policy(policy)
            if fault_step and state.get("step") == fault_step - 1 and not fault_at:
                stand_ins["v2"].fail(fault)
                fault_at.append(time.monotonic())

        load = LoadProcesses(envoy.port)
        stack.callback(load.stop_all)
        if scenario.load_rate_per_s is not None:
            settings = dataclasses.replace(settings, load=RolloutLoad(rate_per_s=scenario.load_rate_per_s))
        previous = {("ciliumenvoyconfig", PREVIOUS.cec_name): with_state(PREVIOUS.cilium_envoy_config(), {"request": "previous-deploy", "step": 0, "since": 0})}
        cluster = LiveCluster(stack.enter_context(handler_modules()), previous, PREVIOUS, on_apply, load.on_load)
        status = {"value": "UPDATE_IN_PROGRESS"}
        answer_aws(module, cluster, lambda: status["value"])
        stack.enter_context(_credentials())
        amp = stack.enter_context(AmpFront(f"http://{server.address}", scenario.amp, settings.pause_s))
        query_url = f"{amp.url}{WORKSPACE_PATH}/api/v1/query"
        client = PacedClient((LOOPBACK, envoy.port), scenario.callers_rate_per_s or rate_per_s, PREVIOUS, {})
        if scenario.callers_rate_per_s:
            client.start()
            stack.callback(client.stop)
        outcome = operate(module, event("Update", TARGET, PREVIOUS, settings, query_url, "rollout"), interval_s, LOCAL_MAX_ATTEMPTS)
        measured = client.stop() if scenario.callers_rate_per_s else client.result
        run = RolloutRun(name, outcome, changes([weights for _, weights, _ in cluster.applied]), measured.requests,
                         measured.requests - measured.statuses[200], dict(measured.versions),
                         {str(status): count for status, count in measured.statuses.items()})  # fmt: skip
        run.load = load.record(envoy)
        run.amp_failed_queries = amp.failed
        if outcome.status == "FAILED" and cluster.applied:
            began = fault_at[0] if fault_at else cluster.applied[0][0]
            run.detection_s = cluster.applied[-1][0] - began
        run.live_weights = dict(policy_of(cluster.live, PREVIOUS).weights)
        # CloudFormation's rollback: after this failure, or after a later resource of the same update fails.
        applied_before = len(cluster.applied)
        status["value"] = "UPDATE_ROLLBACK_IN_PROGRESS"
        rollback = event("Update", PREVIOUS, TARGET, settings, query_url, "rollback")
        run.rollback = operate(module, rollback, interval_s, LOCAL_MAX_ATTEMPTS)
        run.rollback_applies = [weights for _, weights, _ in cluster.applied[applied_before:]]
        return run


class LoadProcesses:
    """The rollout's load as the cluster would run it: manifests/mesh/rollout_load.py, as a process per
    applied Deployment with its environment, its URL pointed at the loopback Envoy; stopped on delete."""

    def __init__(self, envoy_port: int):
        self.envoy_port = envoy_port
        self.running: dict[str, subprocess.Popen] = {}
        self.started = self.stopped = 0

    def on_load(self, document: dict, running: bool) -> None:
        if document["kind"] != "Deployment":
            return
        name = document["metadata"]["name"]
        if not running:
            self._stop(name)
            self.stopped += 1
            return
        container = document["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        path = urllib.parse.urlsplit(env["URL"]).path
        env["URL"] = f"http://{LOOPBACK}:{self.envoy_port}{path}"
        self.running[name] = subprocess.Popen([sys.executable, "-c", container["args"][0]], env={**os.environ, **env},
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.started += 1

    def _stop(self, name: str) -> None:
        process = self.running.pop(name, None)
        if process is not None:
            process.terminate()
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.running):
            self._stop(name)

    def record(self, envoy) -> dict:
        """Started and stopped Deployments, and Envoy's count of the requests that carried the load's header."""
        counted = sum(v for k, v in envoy.counters().items() if ".vcluster.load.upstream_rq_" in k and k.rsplit("_", 1)[-1].isdigit())
        return {"started": self.started, "stopped": self.stopped, "still_running": len(self.running), "counted_apart": counted}


def answer_aws(module, cluster: LiveCluster, stack_status, failures: list | None = None) -> None:
    """The Lambda's AWS calls answered here: Invoke by aws-cdk-lib's kubectl handler on ``cluster`` (or by
    anything with its ``invoke(event)``), DescribeStacks with ``stack_status()``. While ``failures`` has
    any, each Invoke takes the first instead: Invoke's own error as the Lambda meets it after the client's
    retries, an error answer (``invoke_error``) or an exception (botocore's, e.g. ReadTimeoutError)."""
    pending = failures if failures is not None else []

    def invoked(params: dict) -> dict:
        if not pending:
            return _invoked(cluster, params)
        failure = pending.pop(0)
        if isinstance(failure, Exception):
            raise failure
        return failure

    module.CLIENTS.update(
        {
            "lambda": _answering("lambda", "Invoke", invoked),
            "cloudformation": _answering("cloudformation", "DescribeStacks", lambda _: _stack(stack_status())),
        }
    )


def invoke_error(code: str, status: int, message: str) -> dict:
    """Lambda's error answer to an Invoke, as botocore parses it: the model's exception for ``code``."""
    return {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


def dry_run_step(modules: dict, cluster: Cluster, name: str, resource: dict, request_type: str,
                 ready_objects: dict) -> Step:  # fmt: skip
    """The dry run's view of one request of the rollout resource: run as the framework runs it (no gate:
    a Create or Delete never steps), with every kubectl handler call it makes recorded into one Step."""
    properties = cloudformation_strings(cluster.resolve(resource["Properties"]))
    policy = MeshService.from_json(properties["Policy"])
    payload = _cloudformation_event(request_type, f"dry-run-{request_type.lower()}", name, properties)
    with rollout_lambda() as module:
        live = LiveCluster(modules, ready_objects, policy)
        answer_aws(module, live, lambda: "DELETE_IN_PROGRESS")
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            outcome = operate(module, payload, 0, 0)
    if outcome.status != "SUCCESS":
        raise RuntimeError(f"{request_type} {name}: {outcome.reason}")
    step = Step(name, resource["Type"], request_type, result=outcome)
    for call in live.calls:
        step.commands += call.commands
        step.manifests = call.manifests if call.manifests is not None else step.manifests
    return step


def _invoked(cluster: LiveCluster, params: dict) -> dict:
    """Lambda's Invoke answer: the handler's return value as the payload, or its error as FunctionError."""
    try:
        payload, error = cluster.invoke(json.loads(params["body"])), None
    except Exception as exc:  # noqa: BLE001 (Lambda reports any unhandled exception)
        payload, error = {"errorMessage": str(exc), "errorType": type(exc).__name__}, "Unhandled"
    data = json.dumps(payload).encode()
    answer = {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": StreamingBody(io.BytesIO(data), len(data))}
    if error:
        answer["FunctionError"] = error
    return answer


def _stack(status: str) -> dict:
    created = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    return {"Stacks": [{"StackName": "CiliumMeshEks", "StackId": STACK_ID, "CreationTime": created, "StackStatus": status}]}


@contextlib.contextmanager
def _credentials():
    """What the Lambda's environment gives it: a region and (here, made-up) credentials to sign with."""
    environ = os.environ
    saved = {k: environ.get(k) for k in ("AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    environ.update({"AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "AKIDLOCALHARNESS", "AWS_SECRET_ACCESS_KEY": "local"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all, one after another ({'; '.join(SCENARIOS)})")
    parser.add_argument("--cilium-version", default="1.19.6")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; scenarios: {'; '.join(SCENARIOS)}")
    for run in run_scenarios(args.scenarios or list(SCENARIOS), build_for(args.cilium_version).tag):
        print(json.dumps(run.as_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
