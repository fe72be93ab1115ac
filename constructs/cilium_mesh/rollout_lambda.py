"""The rollout Lambda: on_event and is_complete of aws-cdk-lib's Provider framework.

Packaged with traffic.py and rollout_plan.py only (constructs/cilium_mesh/rollout.py), which it imports
as top-level modules. It owns the CiliumEnvoyConfig: it is the only thing in the stack that applies it.

on_event    Create, Update: plans the steps (rollout_plan.plan) and applies the first. No steps on a
            Create, without rollout settings, when the split stays the same, or in CloudFormation's
            rollback (the stack's status says so): then the new weights are applied at once.
            A gated rollout of a service with rollout.load also applies its load Deployment
            (rollout_load.py, in the same apply), which runs until the last step is applied or the
            rollout stops. If that apply fails, on_event still returns: is_complete applies it.
            Delete: deletes the CiliumEnvoyConfig (and any load).
is_complete reads the step and its start from the CiliumEnvoyConfig's annotation, asks AMP (SigV4)
            for the gate, and applies the next step, waits, or stops: it applies the previous
            policy again and raises, which fails the stack update with that line.

A failed call is retried at the next poll, not in the same one (every poll fits its Lambda's
timeout as it is): AMP answering 429 or 5xx, or not at all, makes the poll wait (no data is never
a pass), and the first such poll notes the time on the annotation; a step whose AMP has still not
answered when its own wait (VOLUME_WAIT_FACTOR pauses) is over stops as a breach stops. AMP
refusing a query (any other 4xx) stops at once. A failed kubectl provider call makes the poll wait
too: its handler failing, or Lambda's Invoke throttled (429), failing (5xx) or unanswered. It is
tried again until the step's own wait is over (or the rollout's deadline, its longest run plus
KUBECTL_GRACE_S, set by on_event, if that comes first), then the rollout stops as a breach stops.
The wait counts from the step's start: for a read of the rollout's state, which is where the step
is written, the start as this Lambda last read it (KNOWN), or else its first failed call. on_event's
first apply, if it failed, is tried again by each poll so. Invoke refused (any other error, e.g.
access denied) stops the rollout at once.

Every Kubernetes call is a call of the cluster's kubectl provider handler (aws-cdk-lib's own code, with
its access to the cluster), made with the event CloudFormation would send it: an Update of a
KubernetesResource (``kubectl apply``), a Delete of one (``kubectl delete``), and an Update of a
KubernetesObjectValue (``kubectl get -o jsonpath``).
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import NoReturn

import boto3
import botocore.exceptions
import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from rollout_plan import (
    GET_TIMEOUT_S,
    INVOKE_ATTEMPTS,
    INVOKE_READ_TIMEOUT_S,
    KUBECTL_GRACE_S,
    QUERY_TIMEOUT_S,
    STATE_ANNOTATION,
    VOLUME_WAIT_FACTOR,
    Reading,
    RolloutSettings,
    breach,
    describe,
    enough_traffic,
    gaining_versions,
    gate_queries,
    plan,
    with_state,
)
from traffic import MeshService

APPLY = "Custom::AWSCDK-EKS-KubernetesResource"
GET = "Custom::AWSCDK-EKS-KubernetesObjectValue"
# The status CloudFormation's rollback of an update runs in: it sends an Update with the old properties.
ROLLBACK_STATUS = "UPDATE_ROLLBACK_IN_PROGRESS"
# The annotation's note of when AMP first failed to answer in this step.
AMP_UNANSWERED = "amp_unanswered_since"

# boto3 clients by service, made on first use (tests put their own here).
CLIENTS: dict = {}
# Each rollout's state as this Lambda last read or applied it, by request (else only the time of its
# first failed call): the step a failed read of the annotation names and counts its wait from. A Lambda
# kept warm answers a rollout's polls; one new to the rollout knows nothing of it.
KNOWN: dict[str, dict] = {}


class RolloutStopped(RuntimeError):
    """The one line CloudFormation shows for the failed update."""


class KubectlError(RuntimeError):
    """A kubectl provider call that did not succeed."""


class KubectlFailed(KubectlError):
    """The kubectl provider's handler failed this call (its first line), or Lambda did not invoke it this
    time (throttled, its own fault, no answer in time): a later call may succeed."""


class KubectlRefused(KubectlError):
    """Lambda refused to invoke the kubectl provider's handler: it will not however often it is asked."""


class AmpUnavailable(RuntimeError):
    """AMP did not answer this query: throttled, a server error, or no answer in time."""


class AmpRefused(RuntimeError):
    """AMP refused the query: it will not answer it however often it is asked."""


def _client(service: str):
    if service not in CLIENTS:
        retries = {"mode": "standard", "total_max_attempts": INVOKE_ATTEMPTS}
        CLIENTS[service] = boto3.client(service, config=Config(read_timeout=INVOKE_READ_TIMEOUT_S, retries=retries))
    return CLIENTS[service]


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _transient(error: Exception) -> bool:
    """Invoke's errors (after the client's own retries) that a later call may not meet: throttling (429),
    Lambda's own faults (5xx), no connection or no answer in time; as AMP's are told apart."""
    if isinstance(error, botocore.exceptions.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status == 429 or status >= 500
    return isinstance(error, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError))


class Kubectl:
    """The cluster's kubectl provider handler, invoked as CloudFormation would invoke it."""

    def __init__(self, function: str, cluster_name: str):
        self.function, self.cluster_name = function, cluster_name

    def _call(self, request_type: str, resource_type: str, properties: dict) -> dict | None:
        event = {
            "RequestType": request_type,
            "ResourceType": resource_type,
            "ResourceProperties": {"ClusterName": self.cluster_name, **properties},
        }
        try:
            response = _client("lambda").invoke(FunctionName=self.function, Payload=json.dumps(event).encode())
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            line = f"kubectl provider not invoked: {_first_line(str(error))}"
            raise (KubectlFailed if _transient(error) else KubectlRefused)(line) from None
        payload = json.loads(response["Payload"].read() or b"null")
        if response.get("FunctionError"):
            raise KubectlFailed(f"kubectl provider: {_first_line((payload or {}).get('errorMessage'))}")
        return payload

    def apply(self, *documents: dict) -> None:
        self._call("Update", APPLY, {"Manifest": json.dumps(list(documents))})

    def delete(self, *documents: dict) -> None:
        self._call("Delete", APPLY, {"Manifest": json.dumps(list(documents))})

    def annotation(self, document: dict, key: str) -> str:
        metadata = document["metadata"]
        result = self._call("Update", GET, {
            "ObjectType": document["kind"].lower(),
            "ObjectName": metadata["name"],
            "ObjectNamespace": metadata["namespace"],
            "JsonPath": ".metadata.annotations." + key.replace(".", "\\."),
            "TimeoutSeconds": str(GET_TIMEOUT_S),
        })  # fmt: skip
        return result["Data"]["Value"]


class Prometheus:
    """Instant queries of the AMP workspace's Prometheus API, signed with SigV4 (service ``aps``)."""

    def __init__(self, query_url: str, region: str):
        self.query_url, self.region = query_url, region

    def value(self, expr: str) -> float | None:
        """The query's largest value, or None when it has no series (or only NaN: a quantile of no requests)."""
        body = urllib.parse.urlencode({"query": expr}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        signed = AWSRequest(method="POST", url=self.query_url, data=body, headers=headers)
        SigV4Auth(botocore.session.get_session().get_credentials(), "aps", self.region).add_auth(signed)
        request = urllib.request.Request(self.query_url, data=body, headers=dict(signed.headers.items()), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=QUERY_TIMEOUT_S) as response:
                result = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 429 or error.code >= 500:
                raise AmpUnavailable(f"HTTP {error.code}") from None
            raise AmpRefused(f"AMP refused {expr!r} (HTTP {error.code}: {_first_line(error.read().decode(errors='replace'))})") from None
        except TimeoutError:
            raise AmpUnavailable(f"no answer in {QUERY_TIMEOUT_S} s") from None
        except OSError as error:  # urllib.error.URLError among them: no connection
            raise AmpUnavailable(_first_line(str(getattr(error, "reason", error)))) from None
        if result.get("status") != "success":
            raise AmpRefused(f"AMP refused {expr!r}: {result.get('error', result)}")
        values = [v for series in result["data"]["result"] if math.isfinite(v := float(series["value"][1]))]
        return max(values) if values else None

    def reading(self, service: MeshService, version: str) -> Reading:
        queries = gate_queries(service.namespace, service.name, version)
        return Reading(version, **{name: self.value(expr) for name, expr in queries.items()})


def _policy(properties: dict) -> MeshService:
    return MeshService.from_json(properties["Policy"])


def _owner(kubectl: Kubectl, target: MeshService) -> str | None:
    """The logical ID of the rollout resource that last applied the CiliumEnvoyConfig (None: none, or unknown)."""
    try:
        return json.loads(kubectl.annotation(target.cilium_envoy_config(), STATE_ANNOTATION)).get("owner")
    except (KubectlFailed, ValueError):
        return None


def _load(properties: dict) -> list[dict]:
    """The rollout's synthetic load (rollout_load.py), if its settings ask for one."""
    return json.loads(properties.get("Load", "[]"))


def _stop_load(kubectl: Kubectl, properties: dict) -> None:
    """The load ends with its rollout; if the delete fails, the next deploy's apply or the stack's delete removes it."""
    if _load(properties):
        try:
            kubectl.delete(*_load(properties))
        except KubectlError as error:
            _log(load_not_deleted=str(error))


def _settings(properties: dict) -> RolloutSettings | None:
    """The rollout settings, checked at synth against AMP's minimum pause (min_pause_s=1 here)."""
    text = properties.get("Rollout")
    return RolloutSettings.from_mapping(json.loads(text), min_pause_s=1) if text else None


def _rolling_back(event: dict) -> bool:
    stacks = _client("cloudformation").describe_stacks(StackName=event["StackId"])["Stacks"]
    return stacks[0]["StackStatus"] == ROLLBACK_STATUS


def _document(policy: MeshService, state: dict) -> dict:
    """The CiliumEnvoyConfig rendered from the policy, with the rollout's progress as an annotation."""
    return with_state(policy.cilium_envoy_config(), state)


def _state(event: dict, step: int, **notes) -> dict:
    """The progress this request writes: its step, since now, and the resource that owns the CiliumEnvoyConfig."""
    return {"request": event["RequestId"], "step": step, "since": time.time(), **notes, "owner": event["LogicalResourceId"]}


def _first(event: dict, target: MeshService, steps: list, state: dict) -> list[dict]:
    """Step 1's CiliumEnvoyConfig, and a gated rollout's load, which runs until its last step or its stop."""
    load = _load(event["ResourceProperties"]) if len(steps) > 1 else []
    return [_document(target.with_weights(steps[0]), state), *load]


def _where(steps: list, step: int | None) -> str:
    if step is None:
        return f"rollout stopped at an unknown step of {len(steps)}"
    return f"rollout stopped at step {step + 1} of {len(steps)} ({describe(steps[step])})"


def _log(**fields) -> None:
    print(json.dumps({"rollout": fields}, sort_keys=True))


def on_event(event: dict, _context=None) -> dict:
    properties = event["ResourceProperties"]
    target = _policy(properties)
    kubectl = Kubectl(properties["KubectlHandler"], properties["ClusterName"])
    if event["RequestType"] == "Delete":
        owner = _owner(kubectl, target)
        if owner not in (None, event["LogicalResourceId"]):
            # Another resource applied it since (a new logical ID for the same service, whose Create comes
            # before this old one's Delete): it is that one's to delete.
            _log(event="Delete", kept=f"the CiliumEnvoyConfig {target.cec_name} is owned by {owner}")
            if _load(properties):
                kubectl.delete(*_load(properties))
        else:
            kubectl.delete(target.cilium_envoy_config(), *_load(properties))
        return {"PhysicalResourceId": event["PhysicalResourceId"]}
    previous = None
    if event["RequestType"] == "Update" and not _rolling_back(event):
        previous = _policy(event["OldResourceProperties"]).weights
    settings = _settings(properties)
    steps = plan(previous, target.weights, settings)
    first, applied = _state(event, 0), True
    try:
        kubectl.apply(*_first(event, target, steps, first))
        _log(event=event["RequestType"], steps=steps, applied=0)
    except KubectlFailed as error:  # on_event returns at once: is_complete's polls apply it
        applied = False
        _log(event=event["RequestType"], steps=steps, kubectl_failed=str(error))
    except KubectlRefused as error:
        raise RolloutStopped(f"{_where(steps, 0)}: step 1 was not applied: {error}") from None
    longest = settings.worst_case_s if len(steps) > 1 else 0
    return {
        "PhysicalResourceId": f"{target.namespace}/{target.cec_name}",
        "Data": {
            "Steps": json.dumps(steps),
            "Gaining": json.dumps(gaining_versions(previous, target.weights) if previous else []),
            "Deadline": json.dumps(first["since"] + longest + KUBECTL_GRACE_S),
            "Applied": json.dumps(applied),
        },
    }


def is_complete(event: dict, _context=None) -> dict:
    if event["RequestType"] == "Delete":
        return {"IsComplete": True}
    properties = event["ResourceProperties"]
    target = _policy(properties)
    kubectl = Kubectl(properties["KubectlHandler"], properties["ClusterName"])
    steps = json.loads(event["Data"]["Steps"])
    request = event["RequestId"]
    try:
        state = json.loads(kubectl.annotation(target.cilium_envoy_config(), STATE_ANNOTATION))
    except KubectlError as error:
        return _wait_for_kubectl(event, kubectl, steps, KNOWN.get(request, {}).get("step"), "its state was not read", error)
    if state.get("request") != request:
        if not json.loads(event["Data"]["Applied"]):  # on_event's apply failed: until it shows, each poll applies it
            return _apply_first(event, kubectl, target, steps)
        raise RolloutStopped(f"rollout: the CiliumEnvoyConfig {target.cec_name} was applied by another request ({state.get('request')})")
    if "stopped" in state:
        raise RolloutStopped(f"rollout stopped: {state['stopped']}")
    KNOWN[request] = state
    step = state["step"]
    if step == len(steps) - 1:
        _stop_load(kubectl, properties)
        return {"IsComplete": True}
    settings = _settings(properties)
    now = time.time()
    elapsed = now - state["since"]

    def stop(reason: str) -> NoReturn:
        _stop(event, kubectl, _where(steps, step), reason)

    current = _document(target.with_weights(steps[step]), state)
    prometheus = Prometheus(properties["QueryUrl"], os.environ["AWS_REGION"])
    try:
        readings = [prometheus.reading(target, version) for version in json.loads(event["Data"]["Gaining"])]
    except AmpRefused as error:
        stop(str(error))
    except AmpUnavailable as error:
        since = state.get(AMP_UNANSWERED, now)
        _log(step=step, elapsed_s=round(elapsed, 3), amp_unavailable=str(error), since=since)
        if elapsed >= VOLUME_WAIT_FACTOR * settings.pause_s:
            stop(f"AMP did not answer for {now - since:.0f} s ({error})")
        if AMP_UNANSWERED not in state:
            _apply_or_wait(kubectl, with_state(current, {**state, AMP_UNANSWERED: now}))
        return {"IsComplete": False}
    reasons = [reason for reading in readings if (reason := breach(settings, reading))]
    quiet = [reading for reading in readings if not enough_traffic(settings, reading)]
    _log(step=step, elapsed_s=round(elapsed, 3), readings=[r.__dict__ for r in readings], breaches=reasons)
    if not reasons and quiet and elapsed >= VOLUME_WAIT_FACTOR * settings.pause_s:
        reasons = [
            f"{r.version} was asked {r.request_rate or 0:.2f} requests/s in {elapsed:.0f} s"
            f" (at least {settings.min_request_rate:g} needed)"
            for r in quiet
        ]
    if reasons:
        stop("; ".join(reasons))
    if elapsed < settings.pause_s or quiet:
        if AMP_UNANSWERED in state:  # AMP answers again: the note goes (a stop or the next step replaces it anyway)
            _apply_or_wait(kubectl, with_state(current, {k: v for k, v in state.items() if k != AMP_UNANSWERED}))
        return {"IsComplete": False}
    following = step + 1
    applied = _state(event, following)
    try:
        kubectl.apply(_document(target.with_weights(steps[following]), applied))
    except KubectlError as error:
        return _wait_for_kubectl(event, kubectl, steps, step, f"step {following + 1} was not applied", error)
    KNOWN[request] = applied
    _log(step=following, applied=steps[following])
    if following == len(steps) - 1:
        _stop_load(kubectl, properties)
        return {"IsComplete": True}
    return {"IsComplete": False}


def _apply_first(event: dict, kubectl: Kubectl, target: MeshService, steps: list) -> dict:
    """Step 1 (and a gated rollout's load) that on_event could not apply, tried again as a next step is."""
    state = _state(event, 0)
    try:
        kubectl.apply(*_first(event, target, steps, state))
    except KubectlError as error:
        return _wait_for_kubectl(event, kubectl, steps, 0, "step 1 was not applied", error)
    KNOWN[event["RequestId"]] = state
    _log(step=0, applied=steps[0])
    return {"IsComplete": False}  # the next poll reads it, as it reads what on_event applied


def _stop(event: dict, kubectl: Kubectl, where: str, reason: str) -> NoReturn:
    """Restore the previous weights, then fail the update with the one line."""
    previous = _policy(event["OldResourceProperties"])
    _stop_load(kubectl, event["ResourceProperties"])
    try:
        kubectl.apply(_document(previous, _state(event, -1, stopped=reason)))
    except KubectlError as error:
        cause = "" if str(error) in reason else f" ({error})"  # a refused invoke refuses the restore too
        raise RolloutStopped(f"{where}: {reason}; could not restore {describe(previous.weights)}{cause}: CloudFormation's rollback applies them") from None
    raise RolloutStopped(f"{where}: {reason}; restored {describe(previous.weights)}")


def _end(event: dict, kubectl: Kubectl, steps: list, where: str, reason: str) -> NoReturn:
    """Stop as a breach stops. Without steps there is nothing to restore (a Create, an unchanged split,
    CloudFormation's rollback): the update fails with the line, and the rollback applies the old policy."""
    if len(steps) > 1:
        _stop(event, kubectl, where, reason)
    raise RolloutStopped(f"{where}: {reason}")


def _apply_or_wait(kubectl: Kubectl, document: dict) -> None:
    """An apply only of the rollout's notes: if it fails, the next poll writes them again (or meets the refusal)."""
    try:
        kubectl.apply(document)
    except KubectlError as error:
        _log(kubectl_failed=str(error))


def _wait_for_kubectl(event: dict, kubectl: Kubectl, steps: list, step: int | None, what: str, error: KubectlError) -> dict:
    """A refused call stops at once. A failed one waits for the next poll until the step's own wait is over,
    counted from the step's start as this Lambda knows it (else from its first failed call), or until the
    rollout's deadline if that comes first; then the rollout stops, naming the step (if known) and the call."""
    now = time.time()
    since = KNOWN.setdefault(event["RequestId"], {"since": now})["since"]
    deadline = json.loads(event["Data"]["Deadline"])
    _log(step=step, kubectl_failed=str(error), waited_s=round(now - since, 3), deadline=deadline)
    where = _where(steps, step)
    if isinstance(error, KubectlRefused):
        _end(event, kubectl, steps, where, f"{what}: {error}")
    if len(steps) > 1 and now - since >= VOLUME_WAIT_FACTOR * _settings(event["ResourceProperties"]).pause_s:
        _end(event, kubectl, steps, where, f"{what} by the end of the step's wait ({now - since:.0f} s): {error}")
    if now >= deadline:
        _end(event, kubectl, steps, where, f"{what} by the rollout's deadline: {error}")
    return {"IsComplete": False}
