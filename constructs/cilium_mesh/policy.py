"""The network policy of a declared service, rendered from its ``callers``: exactly those workloads (and
the kubelet's probes, the smoke test and the rollout's load) reach its pods on their port.

A CiliumNetworkPolicy per version selects that version's pods by their labels (a selector cannot say
"any of these label sets"). With the cilium-envoy L7 load balancer in front of the Service, the
backend's ingress sees the caller's own identity east/west (cilium/proxy bpf_metadata.cc), so a rule
that admits the caller admits its requests through the CiliumEnvoyConfig too; checks/datapath.py
evaluates every path. Under datapath eni a caller's ``http`` rules become Cilium's L7 rules; the
probes stay L4 (their paths are the user's Deployment's, not the declaration's, and an L7 rule
would fail any other).

Nothing else in the service's namespace changes, unless ``namespace_default_deny``: then the mesh
denies everything else in and out of the namespace (DNS to kube-dns stays allowed) and lets the
callers there out to the service's pods.

Standard library only (checks/datapath.py loads it without the CDK).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .rollout_plan import RolloutLoad
from .traffic import MANAGED_BY, MESH_NAMESPACE, SMOKE_TEST_LABELS, HttpRule, MeshService

NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"
LOAD_LABELS = {"app": "cilium-mesh-load"}


def load_labels(service: MeshService) -> dict[str, str]:
    """The rollout load's pods: their own identity per service, so a policy admits one service's load only."""
    return {**LOAD_LABELS, "cilium-mesh.eks/service": f"{service.namespace}.{service.name}"}


def dns_egress() -> dict:
    """An egress rule to kube-dns on UDP and TCP 53."""
    return {"toEndpoints": [{"matchLabels": {NAMESPACE_LABEL: "kube-system", "k8s:k8s-app": "kube-dns"}}],
            "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}]}]}  # fmt: skip


def egress_to_pods(service: MeshService) -> dict:
    """An egress rule to every version's pods of the service, on their port (from any namespace)."""
    return {"toEndpoints": [{"matchLabels": {**dict(labels), NAMESPACE_LABEL: service.namespace}} for labels in service.versions.values()],
            "toPorts": [{"ports": [{"port": str(service.pod_port), "protocol": "TCP"}]}]}  # fmt: skip


def _peer(labels, namespace: str, service: MeshService) -> dict:
    """A selector of pods by labels; the namespace named only when it is not the policy's own."""
    selector = dict(labels)
    if namespace != service.namespace:
        selector[NAMESPACE_LABEL] = namespace
    return {"matchLabels": selector}


def _port(service: MeshService, http: list[HttpRule] | tuple[HttpRule, ...], datapath: str) -> list[dict]:
    port = {"ports": [{"port": str(service.pod_port), "protocol": "TCP"}]}
    if datapath == "eni" and http:
        port["rules"] = {"http": [{"method": rule.method, "path": rule.path} for rule in http]}
    return [port]


def _metadata(name: str, namespace: str, service: MeshService) -> dict:
    return {"name": name, "namespace": namespace, "labels": {**MANAGED_BY, "cilium-mesh.eks/service": service.name}}


def ingress_rules(service: MeshService, datapath: str) -> list[dict]:
    """Who reaches the service's pods: its callers, the smoke test, the rollout's load, and the probes."""
    rules = [
        {"fromEndpoints": [_peer(c.labels, c.namespace or service.namespace, service)], "toPorts": _port(service, c.http, datapath)}
        for c in service.callers
    ]
    asked = sorted({(probe.method, probe.path) for probe in smoke_probes(service)})
    rules.append({"fromEndpoints": [_peer(SMOKE_TEST_LABELS, MESH_NAMESPACE, service)],
                  "toPorts": _port(service, [HttpRule(m, re.escape(p)) for m, p in asked], datapath)})  # fmt: skip
    load = service.rollout.load if service.rollout else None
    if load is not None:
        rules.append({"fromEndpoints": [_peer(load_labels(service), MESH_NAMESPACE, service)],
                      "toPorts": _port(service, [HttpRule(load.method, _load_path(service, load))], datapath)})  # fmt: skip
    rules.append({"fromEntities": ["host"], "toPorts": _port(service, (), datapath)})
    return rules


@dataclass(frozen=True)
class Probe:
    """One request of the smoke test to a service, and where the mesh must route it: a version, or "split"."""

    check: str
    path: str
    expect: str
    method: str = "GET"
    headers: dict = field(default_factory=dict)


def routed_to(service: MeshService, path: str, method: str, headers: dict) -> str:
    """Where the service's routes send a request: the pinned version, the first declared route that
    matches, else the split (as route_configuration orders them)."""
    if service.pin_header and headers.get(service.pin_header) in service.versions:
        return headers[service.pin_header]
    for route in service.routes:
        if route.path is not None and path != route.path:
            continue
        if route.path_prefix is not None and not path.startswith(route.path_prefix):
            continue
        if route.methods and method not in route.methods:
            continue
        if all(headers.get(k) == v for k, v in route.headers.items()):
            return route.to
    return "split"


def smoke_probes(service: MeshService) -> list[Probe]:
    """What the smoke test asks a service: the split (GET check_path), each version by its pin header,
    and each declared route that a GET or HEAD reaches (no other method: the smoke test changes nothing)."""
    probes = [Probe("split", service.check_path, routed_to(service, service.check_path, "GET", {}))]
    if service.pin_header:
        probes += [Probe(f"pin {v}", service.check_path, v, headers={service.pin_header: v}) for v in service.versions]
    for i, route in enumerate(service.routes):
        method = next((m for m in ("GET", "HEAD") if not route.methods or m in route.methods), None)
        if method is None:
            continue
        path = route.path or route.path_prefix or service.check_path
        headers = dict(route.headers)
        probes.append(Probe(f"routes[{i}]", path, routed_to(service, path, method, headers), method, headers))
    return probes


def _load_path(service: MeshService, load: RolloutLoad) -> str:
    return load.path or service.check_path


def service_policies(service: MeshService, datapath: str) -> list[dict]:
    """The service's CiliumNetworkPolicies; none when it declares no callers."""
    if service.callers is None:
        return []
    policies = [
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": _metadata(f"mesh-{service.name}-{version}", service.namespace, service),
            "spec": {
                "description": f"Only the declared callers (and probes, the mesh's smoke test and load) reach {service.name} {version}.",
                "endpointSelector": {"matchLabels": dict(labels)},
                "ingress": ingress_rules(service, datapath),
            },
        }
        for version, labels in service.versions.items()
    ]
    if service.namespace_default_deny:
        policies += _namespace_default_deny(service)
    return policies


def _namespace_default_deny(service: MeshService) -> list[dict]:
    """Deny by default in the service's namespace, DNS allowed, and each caller there let out to the pods."""
    namespace = service.namespace
    policies = [
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": _metadata(f"mesh-{service.name}-default-deny", namespace, service),
         "spec": {"description": f"namespace_default_deny of {service.name}: nothing in or out unless allowed.",
                  "endpointSelector": {}, "ingress": [{}], "egress": [{}]}},
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": _metadata(f"mesh-{service.name}-dns", namespace, service),
         "spec": {"description": "DNS to kube-dns only (UDP and TCP 53).", "endpointSelector": {}, "egress": [dns_egress()]}},
    ]  # fmt: skip
    for i, caller in enumerate(service.callers):
        if (caller.namespace or namespace) != namespace:
            continue
        policies.append({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": _metadata(f"mesh-{service.name}-caller-{i}", namespace, service),
            "spec": {"description": f"Caller {i} of {service.name} reaches its pods.",
                     "endpointSelector": {"matchLabels": dict(caller.labels)},
                     "egress": [egress_to_pods(service)]},
        })  # fmt: skip
    return policies

