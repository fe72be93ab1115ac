"""The deploy's smoke test: each declared service's routes, hit as its callers would, from inside the cluster.

Runs as the Jobs in smoke-test.yaml (Python 3.9 of the productcatalog image, standard library only)
and writes one line to the ConfigMap the stack waits on: "pass", or each failed check and what it
saw, naming the service, e.g. "workshop/catalogdetail split: v1 0/200, v2 0/200, 200 x 403". The
stack fails the deploy with that line.

The Jobs start after every manifest they check, but Cilium may still be bringing policies and the
NLB up, so each check is retried every RETRY_S until it passes or DEADLINE_S runs out. The main Job
(an identity every service admits), in this order (settings from the environment):
  ingress  with the sample app: GET / through each address of the NLB's hostname, read from the
           cilium-ingress Service unless INGRESS_HOST is set (one address per zone with a node:
           cross-zone load balancing is off, so each address reaches its zone's nodes).
  app      with the sample app: GET productcatalog /products/: its "details" are catalogdetail's answer.
  deny     with the sample app: frontend:9000 straight from this pod: no answer.
  services for each declared service (SERVICES): each weighted version's pods answer directly; then
           each probe: the split (SPLIT_REQUESTS, each version's count of the x-cilium-mesh-destination
           answers within SIGMAS binomial standard deviations of its weight), each pin (PIN_REQUESTS,
           every answer from that version), each route a GET or HEAD reaches (every answer from its
           version). An answer counts with a status below 400.
  wireguard with WIREGUARD set: every Node has its CiliumNode, and every CiliumNode has published its
           WireGuard public key (annotation network.cilium.io/wg-pub-key), so every node's agent runs
           WireGuard and is every other's peer; handshakes and per-peer state are the agent's own
           (`cilium-dbg status`), which a pod cannot see.
  outsider the outsider Job's line (OUTSIDER_KEY in the verdict ConfigMap).
The outsider Job (ROLE=outsider, an identity no service admits) asks each version's pods of each
service with callers directly: none may answer. It writes its own line under its VERDICT_KEY.
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


DESTINATION_HEADER = "x-cilium-mesh-destination"


def get(url: str, headers: dict | None = None, address: str | None = None, timeout: float = TIMEOUT_S, method: str = "GET"):
    """(status, body, the x-cilium-mesh-destination header) of one request on a new connection, or
    (0, the error, "") when there is no answer."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address or parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request(method, parts.path or "/", headers={"Host": parts.netloc, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader(DESTINATION_HEADER, "")
    except (OSError, http.client.HTTPException) as error:
        return 0, type(error).__name__.encode(), ""
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
    status, body, _ = get(settings["products_url"])
    try:
        details = json.loads(body)["details"] if status == 200 else None
    except (ValueError, KeyError, TypeError):
        details = None
    if not isinstance(details, dict) or "version" not in details:
        return f"app: {settings['products_url']} answered {status or 'nothing'} without the \"details\" it asks for"
    return None


def destinations(url: str, requests: int, method: str = "GET", headers: dict | None = None) -> tuple:
    """(versions routed to, statuses) of ``requests`` requests; a version counts only with a status below 400."""
    versions, statuses = Counter(), Counter()
    for _ in range(requests):
        status, _, destination = get(url, headers, method=method)
        statuses[status] += 1
        if 0 < status < 400 and destination:
            versions[destination] += 1
    return versions, statuses


def check_split(service: dict, probe: dict, n: int) -> str | None:
    weights = service["weights"]
    versions, statuses = destinations(service["base_url"] + probe["path"], n, probe["method"], probe["headers"])
    total = sum(weights.values())
    off = []
    for version, weight in weights.items():
        p = weight / total
        if abs(versions[version] - n * p) > SIGMAS * math.sqrt(n * p * (1 - p)):
            off.append(version)
    if off or sum(versions.values()) < n:
        counts = ", ".join(f"{v} {versions[v]}/{n}" for v in weights)
        expected = ", ".join(f"{v} {w / total:.0%}" for v, w in weights.items())
        extra = statuses_text(statuses)
        return f"{service['service']} split: {counts}{', ' + extra if extra else ''} (weights {expected})"
    return None


def check_one_version(service: dict, probe: dict, n: int) -> str | None:
    """A pin or a route: every answer from the version it names."""
    version = probe["expect"]
    versions, statuses = destinations(service["base_url"] + probe["path"], n, probe["method"], probe["headers"])
    if versions[version] != n:
        got = ", ".join(f"{v} {c}/{n}" for v, c in sorted(versions.items())) or "no answer from any version"
        extra = statuses_text(statuses)
        return f"{service['service']} {probe['check']}: {got}{', ' + extra if extra else ''} (expected only {version})"
    return None


def probe_checks(settings: dict) -> list:
    """Each probe of each declared service, as a check that returns its failures."""
    checks = []
    for service in settings["services"]:
        checks.append(lambda s=service: check_versions(s))
        for probe in service["probes"]:
            if probe["expect"] == "split":
                checks.append(lambda s=service, p=probe: [check_split(s, p, settings["split_requests"])])
            else:
                checks.append(lambda s=service, p=probe: [check_one_version(s, p, settings["pin_requests"])])
    return checks


def check_versions(service: dict) -> list:
    """Each weighted version's pods answer the smoke test directly (failover would hide one that does not)."""
    failures = []
    for version in service["weights"]:
        url = service["version_urls"][version]
        status = get(url)[0]
        if not 0 < status < 400:
            failures.append(f"{service['service']} version {version}: {url} answered {status or 'nothing'}")
    return failures


def check_refused(settings: dict) -> list:
    """The outsider's check: no version's pods of a service with callers answer it."""
    failures = []
    for service in (s for s in settings["services"] if s["refused"]):
        for version, url in service["version_urls"].items():
            status = get(url, timeout=settings["deny_timeout_s"])[0]
            if status:
                failures.append(f"{service['service']} deny {version}: {url} answered {status} to a non-caller (its policy must refuse it)")
    return failures


WG_KEY_ANNOTATION = "network.cilium.io/wg-pub-key"


def check_wireguard(nodes: list, cilium_nodes: list) -> list:
    """Each Node (the API's list) has its CiliumNode, named after it: a node whose agent never registered is no
    one's WireGuard peer, and the CiliumNodes alone would not show it; each CiliumNode has its WireGuard public
    key; at least one."""
    if not cilium_nodes:
        return ["wireguard: no CiliumNode listed"]
    registered = {n["metadata"]["name"] for n in cilium_nodes}
    failures = []
    unregistered = [n["metadata"]["name"] for n in nodes if n["metadata"]["name"] not in registered]
    if unregistered:
        failures.append(f"wireguard: {', '.join(unregistered)} of {len(nodes)} nodes have no CiliumNode (no agent registered them)")
    missing = [n["metadata"]["name"] for n in cilium_nodes if not (n["metadata"].get("annotations") or {}).get(WG_KEY_ANNOTATION)]
    if missing:
        failures.append(f"wireguard: {', '.join(missing)} of {len(cilium_nodes)} nodes published no public key ({WG_KEY_ANNOTATION})")
    return failures


def check_deny(settings: dict) -> str | None:
    if not settings["denied_url"]:
        return None  # no sample app, or no network policy applied: nothing refuses it
    status = get(settings["denied_url"], timeout=settings["deny_timeout_s"])[0]
    if status and status != 403:
        return f"deny: {settings['denied_url']} answered {status} to the smoke test (its policy must refuse it)"
    return None


def run_checks(settings: dict, resolve=None, ingress_host=None, outsider=None, list_nodes=None) -> list:
    """Every check, each retried every RETRY_S until it passes or DEADLINE_S runs out (policies and the
    NLB may still be on their way); the failures' lines. ``outsider`` reads the outsider Job's line,
    ``list_nodes`` lists the Nodes and the CiliumNodes (with WIREGUARD)."""
    resolve = resolve or (lambda host: {info[4][0] for info in socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM)})
    deadline = time.monotonic() + settings["deadline_s"]
    if settings["role"] == "outsider":
        checks = [lambda: check_refused(settings)]
    else:
        checks = []
        if settings["ingress_service"] or settings["ingress_host"]:
            def ingress():
                if not settings["ingress_host"] and ingress_host:
                    settings["ingress_host"] = ingress_host()
                return [check_ingress(settings, resolve)]

            checks.append(ingress)
        if settings["products_url"]:
            checks.append(lambda: [check_app(settings)])
        checks += [lambda: [check_deny(settings)], *probe_checks(settings)]
        if settings["wireguard"] and list_nodes is not None:
            checks.append(lambda: check_wireguard(*list_nodes()))
        if outsider is not None:
            checks.append(lambda: outsider())
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
        "role": environ.get("ROLE", "main"),
        "ingress_service": environ.get("INGRESS_SERVICE", ""),
        "ingress_host": environ.get("INGRESS_HOST", ""),
        "ingress_port": int(environ.get("INGRESS_PORT", "80")),
        "deadline_s": float(environ.get("DEADLINE_S", "330")),
        "retry_s": float(environ.get("RETRY_S", "5")),
        "products_url": environ.get("PRODUCTS_URL", ""),
        "denied_url": environ.get("DENIED_URL", ""),
        "deny_timeout_s": float(environ.get("DENY_TIMEOUT_S", "3")),
        "services": json.loads(environ.get("SERVICES", "[]")),
        "wireguard": environ.get("WIREGUARD", "") == "true",
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


def outsider_line(environ) -> list:
    """The outsider Job's failures, once it has written its line ("outsider: no line yet" until then)."""
    with open(f"{ACCOUNT}/namespace") as namespace:
        ns = namespace.read().strip()
    configmap = api_request("GET", f"/api/v1/namespaces/{ns}/configmaps/{environ['VERDICT_CONFIGMAP']}")
    line = (configmap.get("data") or {}).get(environ["OUTSIDER_KEY"])
    if line is None:
        return ["outsider: the non-caller's Job has written no line yet"]
    return [] if line == "pass" else line.split("; ")


def main() -> int:
    settings = settings_from(os.environ)
    outsider = (lambda: outsider_line(os.environ)) if settings["role"] == "main" and os.environ.get("OUTSIDER_KEY") else None
    lists = ("/api/v1/nodes", "/apis/cilium.io/v2/ciliumnodes")
    nodes = lambda: tuple(api_request("GET", path).get("items", []) for path in lists)  # noqa: E731
    line = verdict(run_checks(settings, ingress_host=lambda: service_hostname(os.environ), outsider=outsider, list_nodes=nodes))
    print(line, flush=True)
    publish(line, os.environ)
    return 0 if line == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
