"""The deploy's smoke test: the paths checks/datapath.py lists, hit as a user would, from inside the cluster.

Runs as the Job in smoke-test.yaml (Python 3.9 of the productcatalog image, standard library only)
and writes one line to the ConfigMap the stack waits on: "pass", or each failed check and what it
saw, e.g. "split: v1 0/200, v2 0/200, 200 x 403". The stack fails the deploy with that line.

It starts beside the app, so each check is retried every RETRY_S until it passes or DEADLINE_S
runs out, in this order (settings from the environment):
  ingress  GET / through each address of the NLB's hostname, read from the cilium-ingress Service
           unless INGRESS_HOST is set (one address per zone with a node: cross-zone
           load balancing is off, so each address reaches its zone's nodes and, from one of them,
           frontend on another node); frontend answers only once productcatalog has.
  app      GET productcatalog /products/: its "details" are catalogdetail's answer.
  split    SPLIT_REQUESTS to catalogdetail through the traffic policy: each version's count within
           SIGMAS binomial standard deviations of its weight.
  pin      PIN_REQUESTS per version with the pin header: every answer from that version.
  deny     frontend:9000 straight from this pod: no answer (the app's policy admits only the Ingress).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter

SIGMAS = 4.5
TIMEOUT_S = 5.0


def get(url: str, headers: dict | None = None, address: str | None = None, timeout: float = TIMEOUT_S):
    """(status, body) of one GET on a new connection, or (0, the error) when there is no answer."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address or parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/", headers={"Host": parts.netloc, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as error:
        return 0, type(error).__name__.encode()
    finally:
        connection.close()


def statuses_text(statuses: Counter) -> str:
    return ", ".join(f"{n} x {code or 'no answer'}" for code, n in sorted(statuses.items()) if code != 200)


def check_ingress(settings: dict, resolve) -> str | None:
    """Each address of the NLB's hostname answers GET / with 200."""
    host, port = settings["ingress_host"], settings["ingress_port"]
    if not host:
        return "ingress: the cilium-ingress Service has no load balancer hostname yet"
    try:
        addresses = sorted(resolve(host))
    except OSError as error:
        return f"ingress: {host} does not resolve ({type(error).__name__})"
    seen = {a: get(f"http://{host}:{port}/", address=a, timeout=settings["timeout_s"])[0] for a in addresses}
    if not addresses or any(status != 200 for status in seen.values()):
        saw = ", ".join(f"{a} {s or 'no answer'}" for a, s in seen.items()) or "no address"
        return f"ingress: http://{host}/ not 200 from every NLB address: {saw}"
    return None


def check_app(settings: dict) -> str | None:
    status, body = get(settings["products_url"])
    try:
        details = json.loads(body)["details"] if status == 200 else None
    except (ValueError, KeyError, TypeError):
        details = None
    if not isinstance(details, dict) or "version" not in details:
        return f"app: {settings['products_url']} answered {status or 'nothing'} without catalogdetail's details"
    return None


def versions_of(url: str, requests: int, headers: dict | None = None) -> tuple:
    versions, statuses = Counter(), Counter()
    for _ in range(requests):
        status, body = get(url, headers)
        statuses[status] += 1
        if status == 200:
            versions["v" + str(json.loads(body)["version"])] += 1
    return versions, statuses


def check_split(settings: dict) -> str | None:
    weights, n = settings["weights"], settings["split_requests"]
    versions, statuses = versions_of(settings["catalogdetail_url"], n)
    total = sum(weights.values())
    off = []
    for version, weight in weights.items():
        p = weight / total
        if abs(versions[version] - n * p) > SIGMAS * math.sqrt(n * p * (1 - p)):
            off.append(version)
    if off or statuses[200] < n:
        counts = ", ".join(f"{v} {versions[v]}/{n}" for v in weights)
        expected = ", ".join(f"{v} {w / total:.0%}" for v, w in weights.items())
        extra = statuses_text(statuses)
        return f"split: {counts}{', ' + extra if extra else ''} (weights {expected})"
    return None


def check_pins(settings: dict) -> list:
    if not settings["pin_header"]:
        return []  # the traffic policy pins nothing
    failures = []
    for version in settings["weights"]:
        n = settings["pin_requests"]
        versions, statuses = versions_of(settings["catalogdetail_url"], n, {settings["pin_header"]: version})
        if versions[version] != n:
            got = ", ".join(f"{v} {c}/{n}" for v, c in sorted(versions.items())) or "no answer from any version"
            extra = statuses_text(statuses)
            failures.append(f"pin {version}: {got}{', ' + extra if extra else ''} (expected only {version})")
    return failures


def check_deny(settings: dict) -> str | None:
    if not settings["denied_url"]:
        return None  # no network policy applied: nothing refuses it
    status, _ = get(settings["denied_url"], timeout=settings["deny_timeout_s"])
    if status and status != 403:
        return f"deny: {settings['denied_url']} answered {status} to the smoke test (its policy must refuse it)"
    return None


def run_checks(settings: dict, resolve=None, ingress_host=None) -> list:
    """Every check, each retried every RETRY_S until it passes or DEADLINE_S runs out (the Job starts
    beside the app, so pods, policies and the NLB may still be on their way); the failures' lines."""
    resolve = resolve or (lambda host: {info[4][0] for info in socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM)})
    deadline = time.monotonic() + settings["deadline_s"]

    def ingress():
        if not settings["ingress_host"] and ingress_host:
            settings["ingress_host"] = ingress_host()
        return [check_ingress(settings, resolve)]

    checks = [ingress, lambda: [check_app(settings)], lambda: [check_split(settings)], lambda: check_pins(settings),
              lambda: [check_deny(settings)]]  # fmt: skip
    failures = []
    for check in checks:
        while True:
            found = [f for f in check() if f]
            if not found or time.monotonic() >= deadline:
                failures += found
                break
            time.sleep(settings["retry_s"])
    return failures


def service_hostname(environ) -> str:
    """The NLB's hostname from the cilium-ingress Service's status (empty until the controller sets it)."""
    namespace, name = environ["INGRESS_SERVICE"].split("/")
    service = api_request("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
    ingress = (service.get("status", {}).get("loadBalancer", {}).get("ingress") or [{}])[0]
    return ingress.get("hostname", "")


def verdict(failures: list) -> str:
    return "pass" if not failures else "; ".join(failures)


def settings_from(environ) -> dict:
    return {
        "ingress_host": environ.get("INGRESS_HOST", ""),
        "ingress_port": int(environ.get("INGRESS_PORT", "80")),
        "deadline_s": float(environ.get("DEADLINE_S", "330")),
        "retry_s": float(environ.get("RETRY_S", "5")),
        "products_url": environ["PRODUCTS_URL"],
        "catalogdetail_url": environ["CATALOGDETAIL_URL"],
        "denied_url": environ["DENIED_URL"],
        "deny_timeout_s": float(environ.get("DENY_TIMEOUT_S", "3")),
        "weights": json.loads(environ["WEIGHTS"]),
        "pin_header": environ["PIN_HEADER"],
        "split_requests": int(environ.get("SPLIT_REQUESTS", "200")),
        "pin_requests": int(environ.get("PIN_REQUESTS", "20")),
        "timeout_s": float(environ.get("TIMEOUT_S", str(TIMEOUT_S))),
    }


ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def api_request(method: str, path: str, body: dict | None = None) -> dict:
    """One call of the Kubernetes API with this pod's token."""
    with open(f"{ACCOUNT}/token") as token:
        bearer = token.read().strip()
    request = urllib.request.Request(
        f"https://kubernetes.default.svc{path}", method=method, data=json.dumps(body).encode() if body else None,
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/merge-patch+json"},
    )
    context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        return json.loads(response.read() or b"{}")


def publish(line: str, environ) -> None:
    """Write the verdict into the ConfigMap VERDICT_CONFIGMAP (this pod's namespace) under VERDICT_KEY (the
    Job's name when the stack runs it)."""
    with open(f"{ACCOUNT}/namespace") as namespace:
        ns = namespace.read().strip()
    body = {"data": {environ.get("VERDICT_KEY", "verdict"): line}}
    api_request("PATCH", f"/api/v1/namespaces/{ns}/configmaps/{environ['VERDICT_CONFIGMAP']}", body)


def main() -> int:
    line = verdict(run_checks(settings_from(os.environ), ingress_host=lambda: service_hostname(os.environ)))
    print(line, flush=True)
    publish(line, os.environ)
    return 0 if line == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
