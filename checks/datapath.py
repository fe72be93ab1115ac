"""Every path a request takes, as Cilium and the VPC carry it, in each datapath.

The model reads what the stack applies: the app's Deployments, Services and
Ingress, the CiliumNetworkPolicies with the datapath's replacements, the Cilium
values, and the traffic policy's Envoy resources. For each path, in each
datapath, with client and backend on one node and on two, it works out, step
by step and each step from the rule in ``RULES`` (with its source):

1. the address dialled: what the kernel's socket load balancer, Cilium's EDS or
   cluster DNS gives (a pod, a ClusterIP, or nothing);
2. the source address and identity, as cilium-envoy binds it (original source,
   the node, or the Ingress IP) and as masquerading rewrites it;
3. the destination identity in an ipcache: pods by labels, ClusterIPs as world,
   nodes as host or remote-node;
4. whether the VPC carries it: EC2's source/destination check, and a route back;
5. the verdict of the CiliumNetworkPolicies: the client's egress (for an Envoy
   L7 load balancer, enforced by Envoy on the address it dialled) and the
   backend's ingress, L7 rules included where Cilium enforces them.

A path delivers when every step does. ``MUST_DENY`` lists requests the policy
must refuse. What the model takes on trust is in ``RULES`` with ``confirmed``
False: the README lists them as what a real cluster must still confirm.

    python -m checks.datapath        # every path, both datapaths, both placements
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import re
import sys
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from cilium_mesh.manifests import (
    INGRESS_FILE,
    NETWORK_POLICY_DATAPATH_FILES,
    NETWORK_POLICY_FILE,
    WORKLOAD_FILES,
    load_documents,
    replaced_by_name,
)
from cilium_mesh.smoke_files import smoke_documents
from cilium_mesh.traffic import MeshService
from cilium_mesh.values import cilium_values

# --- The rules, each with where it comes from -------------------------------------------------


@dataclass(frozen=True)
class Rule:
    says: str
    source: str
    confirmed: bool = True  # False: read from source or design, not yet seen in a cluster


RULES = {
    "socket-lb": Rule(
        "A pod's connect to a ClusterIP is translated to a backend pod's address at connect, so the "
        "packet and its policy see the pod.",
        "Cilium kube-proxy replacement, socket LB (bpf/bpf_sock.c); kubeProxyReplacement: true",
    ),
    "l7lb-redirect": Rule(
        "A connection to a Service named in a CiliumEnvoyConfig's spec.services goes to the client "
        "node's cilium-envoy listener; Envoy then enforces the client's egress policy.",
        "cilium/cilium pkg/ciliumenvoyconfig/cec_resource_parser.go (is_l7lb, enforce_policy_on_l7lb "
        "when the node has Ingress addresses)",
    ),
    "eds": Rule(
        "An EDS cluster holds the addresses of the Service's ready pods, headless or not.",
        "cilium/cilium pkg/ciliumenvoyconfig (EDS from Cilium's xDS; testdata/headless.txtar)",
    ),
    "dns": Rule(
        "Cluster DNS answers a Service name with its ClusterIP, or with its ready pods' addresses "
        "for a headless Service (clusterIP: None); a pod's own node resolver does not know cluster names.",
        "Kubernetes DNS specification; cilium-envoy uses cluster DNS only with dnsPolicy "
        "ClusterFirstWithHostNet (host network)",
    ),
    "dial-identity": Rule(
        "Envoy resolves the destination identity from the upstream host address it picked; an "
        "address not in the ipcache is WORLD. A ClusterIP is in no ipcache.",
        "cilium/proxy cilium/network_filter.cc (upstream callback, host->address()), "
        "cilium/l7policy.cc, cilium/bpf_metadata.cc resolvePolicyId (v1.36.9, edeb3f2a)",
    ),
    "deny-before-connect": Rule(
        "A request Envoy's upstream policy check denies is answered 403 'Access denied' before any "
        "connect; retries and outlier detection do not see it.",
        "cilium/proxy patches/0001-network-Add-callback-for-upstream-authorization.patch "
        "(Router::Filter sendLocalReply Forbidden)",
    ),
    "east-west-source": Rule(
        "East/west (use_original_source_address): to a pod on another node Envoy binds the client "
        "pod's address and source port; to a pod with a policy on its own node the kernel picks the "
        "source and the socket mark 0x0900|endpoint carries the client's identity.",
        "cilium/proxy cilium/bpf_metadata.cc extractSocketMetadata, socket_option_source_address.cc setOption",
    ),
    "north-south-source": Rule(
        "North/south (Ingress): to a backend on another node Envoy binds the node's Ingress IP; on "
        "its own node the kernel picks the source and the mark 0x0B00|identity carries reserved:ingress.",
        "cilium/proxy cilium/bpf_metadata.cc (north/south branch), socket_option_source_address.cc",
    ),
    "nlb": Rule(
        "The AWS Load Balancer Controller backs a LoadBalancer Service annotated type 'external' with an "
        "NLB; with target type 'instance' it registers every node's NodePort and opens the nodes' security "
        "group to the NLB; 'internet-facing' puts it in the public subnets.",
        "AWS Load Balancer Controller docs, Service annotations (aws-load-balancer-type, "
        "aws-load-balancer-nlb-target-type, aws-load-balancer-scheme, manage-backend-security-group-rules)",
    ),
    "nodeport": Rule(
        "Cilium's kube-proxy replacement answers a NodePort on every node and hands an L7 load balancer "
        "Service's connections (cilium-ingress) to that node's Envoy; no policy selects reserved:ingress.",
        "Cilium docs, kube-proxy replacement and Ingress (shared mode needs it for its NodePort from 1.19, "
        "cilium/cilium#41380)",
    ),
    "ingress-ip": Rule(
        "The Ingress IP comes from the agent's IPAM: an ENI secondary address with ENI IPAM (with "
        "routing rules), an address of Cilium's cluster pool otherwise.",
        "cilium/cilium daemon/infraendpoints/infra_ip_allocation.go allocateIngressIPs",
    ),
    "host-source": Rule(
        "A host process (kubelet, cilium-envoy's DNS, active health checks) sends from the node's "
        "address with no identity mark: host on its node, remote-node elsewhere.",
        "Cilium reserved identities; cilium/proxy: no downstream connection, no source option",
    ),
    "masquerade": Rule(
        "With iptables masquerading, '-s <node pool range> ! -d <native routing CIDR> ! -o cilium_+ "
        "-j MASQUERADE' rewrites the source to the node's address (node addresses excluded by ipset); "
        "conntrack reverses it for the reply.",
        "cilium/cilium pkg/datapath/iptables/iptables.go installMasqueradeRules (rule order: this "
        "comes before the proxy-mark exclusion)",
        confirmed=False,
    ),
    "vpc": Rule(
        "Between nodes EC2 drops a packet whose source the sending ENI does not own (source/"
        "destination check), and the VPC routes only its own CIDR: an address of Cilium's pool has "
        "no route back.",
        "Amazon VPC: source/destination checking, route tables (local route)",
    ),
    "reply": Rule(
        "The reply to an east/west L7 load balancer's original-source connection comes back to "
        "Envoy's transparent socket on the client's node.",
        "Cilium's L7 load balancing design (IP_TRANSPARENT, proxy marks); Cilium's EKS ENI CI runs it, "
        "its aws-cni CI runs no CiliumEnvoyConfig",
        confirmed=False,
    ),
    "policy": Rule(
        "A direction is enforced once any policy selecting the endpoint has that section; then only "
        "what some rule allows passes (the union); an empty rule allows nothing.",
        "Cilium docs, Policy Enforcement Modes and rule semantics",
    ),
    "l7": Rule(
        "L7 rules (HTTP, DNS) are enforced only with Cilium as the only CNI; chained onto the VPC CNI "
        "they are not.",
        "Cilium docs (aws-cni chaining); conformance-aws-cni.yaml runs --test '!fqdn,!l7'",
    ),
    "linger": Rule(
        "An original-source connection closed after a per-try timeout sits in TIME_WAIT; the retry "
        "to the same pod from the same address and port cannot connect, unless cilium-envoy resets "
        "it on close (envoy-http-upstream-linger-timeout 0 -> SO_LINGER 0).",
        "cilium/proxy bpf_metadata.cc (5-tuple comment), bpf_metadata.proto original_source_so_linger_time",
        confirmed=False,
    ),
    "dns-staleness": Rule(
        "A deleted pod leaves DNS at once, but Envoy may dial it for coredns' TTL (5 s) plus the "
        "cluster's dns_refresh_rate; once the pod is gone its address is WORLD.",
        "coredns kubernetes plugin (ttl 5 by default); Envoy STRICT_DNS dns_refresh_rate",
    ),
}

# --- The cluster the model places things in --------------------------------------------------

VPC_CIDR = ipaddress.ip_network("10.0.0.0/16")  # stacks/cilium_eks_stack.py
NODES = {"a": "10.0.128.10", "b": "10.0.160.10"}  # in two zones' private subnets
POOL_RANGES = {"a": ipaddress.ip_network("100.65.0.0/24"), "b": ipaddress.ip_network("100.65.1.0/24")}
CLUSTER_IP = "172.20.0.100"  # any ClusterIP: none is in an ipcache
COREDNS_TTL_S = 5
PLACEMENTS = ("same node", "other node")
CLIENT_NODE = "a"
ENTITIES_IN_CLUSTER = {"host", "remote-node", "ingress", "health", "init", "kube-apiserver", "unmanaged"}
LINGER_KEY = "envoy-http-upstream-linger-timeout"


@dataclass(frozen=True)
class Endpoint:
    """Something with an address: a pod, a node, an Ingress IP, a ClusterIP, or the internet."""

    kind: str  # pod | node | ingress-ip | cluster-ip | world
    address: str
    node: str | None = None
    workload: str | None = None
    namespace: str | None = None
    labels: tuple = ()
    pre_stop_s: int = 0

    def owned_by_eni(self, datapath: str) -> bool:
        """Whether the node's ENIs own the address (rule "vpc"): pod addresses are ENI secondary addresses
        in both datapaths (the VPC CNI's, or Cilium's ENI IPAM); the Ingress IP only with ENI IPAM."""
        in_vpc = ipaddress.ip_address(self.address) in VPC_CIDR
        return in_vpc and (self.kind in ("pod", "node") or (self.kind == "ingress-ip" and datapath == "eni"))

    def __str__(self) -> str:
        return f"{self.kind} {self.workload or ''} {self.address}".replace("  ", " ")


@dataclass(frozen=True)
class Identity:
    entity: str  # pod | host | remote-node | ingress | world
    labels: tuple = ()

    def __str__(self) -> str:
        return f"pod {dict(self.labels).get('app', '?')}" if self.entity == "pod" else self.entity


def ipcache(address: Endpoint, viewer_node: str) -> Identity:
    """The identity a node's ipcache gives an address (rule "dial-identity")."""
    if address.kind == "pod":
        return Identity("pod", tuple(sorted({**dict(address.labels), "io.kubernetes.pod.namespace": address.namespace}.items())))
    if address.kind == "node":
        return Identity("host" if address.node == viewer_node else "remote-node")
    if address.kind == "ingress-ip":
        return Identity("ingress")
    return Identity("world")


# What the model evaluates of a CiliumNetworkPolicy; anything else would be judged wrongly, so it is refused.
MODELLED_RULE_KEYS = {"fromEndpoints", "toEndpoints", "fromEntities", "toEntities", "toPorts"}
MODELLED_SPEC_KEYS = {"description", "endpointSelector", "ingress", "egress"}


def workload_name(workload: dict) -> str:
    """A Deployment by its name; a Job (named after a digest of its settings) by its app label."""
    metadata = workload["metadata"]
    return metadata["labels"]["app"] if workload["kind"] == "Job" else metadata["name"]


class Unmodelled(ValueError):
    """A policy uses a field the model does not evaluate."""


@dataclass(frozen=True)
class Deployed:
    """One datapath's objects as the stack applies them (or changed, to show what the model catches)."""

    datapath: str
    documents: tuple
    policies: tuple
    values: dict
    traffic: MeshService

    def __post_init__(self) -> None:
        """Refuse a policy field the model does not evaluate, rather than judge it wrongly."""
        for policy in self.policies:
            spec = policy["spec"]
            extra = spec.keys() - MODELLED_SPEC_KEYS
            extra |= {key for d in ("ingress", "egress") for rule in spec.get(d, []) for key in rule.keys() - MODELLED_RULE_KEYS}
            selectors = [spec.get("endpointSelector") or {}]
            selectors += [s for d in ("ingress", "egress") for rule in spec.get(d, [])
                          for s in rule.get("fromEndpoints", []) + rule.get("toEndpoints", [])]  # fmt: skip
            extra |= {key for s in selectors for key in s.keys() - {"matchLabels"}}
            if extra:
                raise Unmodelled(f"policy {policy['metadata']['name']} uses {sorted(extra)}, which the model does not evaluate")

    @classmethod
    def of(cls, datapath: str, traffic: MeshService, cilium_version: str = "1.19.6",
           documents: list[dict] | None = None, policies: list[dict] | None = None,
           values: dict | None = None) -> Deployed:  # fmt: skip
        smoke = smoke_documents(traffic, datapath, True) if documents is None or policies is None else []
        if documents is None:
            documents = load_documents(*WORKLOAD_FILES, INGRESS_FILE) + [d for d in smoke if d["kind"] == "Job"]
        if policies is None:
            policies = replaced_by_name(
                load_documents(NETWORK_POLICY_FILE), load_documents(NETWORK_POLICY_DATAPATH_FILES[datapath])
            ) + [d for d in smoke if d["kind"] == "CiliumNetworkPolicy"]
        if values is None:
            values = cilium_values("api.example", datapath, "cilium-mesh", cilium_version)
        return cls(datapath, tuple(documents), tuple(policies), values, traffic)

    def kind(self, kind: str) -> list[dict]:
        return [d for d in self.documents if d.get("kind") == kind]

    def service(self, namespace: str, name: str) -> dict | None:
        return next((s for s in self.kind("Service")
                     if (s["metadata"].get("namespace"), s["metadata"]["name"]) == (namespace, name)), None)  # fmt: skip

    def pods(self, node: str) -> list[Endpoint]:
        """One pod of every Deployment on ``node`` (and coredns, which EKS runs), with distinct addresses."""
        prefix = NODES[node].rsplit(".", 1)[0]
        pods = [Endpoint("pod", f"{prefix}.40", node, "coredns", "kube-system", (("k8s-app", "kube-dns"),))]
        for index, deployment in enumerate(self.workloads()):
            template = deployment["spec"]["template"]
            sleeps = [c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                      for c in template["spec"]["containers"]]  # fmt: skip
            pods.append(Endpoint("pod", f"{prefix}.{50 + index}", node, workload_name(deployment),
                                 deployment["metadata"]["namespace"], tuple(sorted(template["metadata"]["labels"].items())),
                                 min(sleeps)))  # fmt: skip
        return pods

    def workloads(self) -> list[dict]:
        """What runs pods: the Deployments, and the smoke test's Job."""
        return [d for d in self.documents if d.get("kind") in ("Deployment", "Job")]


    def pod(self, workload: str, node: str) -> Endpoint:
        return next(p for p in self.pods(node) if p.workload == workload)

    def backends(self, namespace: str, name: str, node: str) -> list[Endpoint]:
        """The ready pods a Service selects, placed on ``node``."""
        if (namespace, name) == ("kube-system", "kube-dns"):
            return [p for p in self.pods(node) if p.workload == "coredns"]
        service = self.name(namespace, name)
        selector = (service or {}).get("spec", {}).get("selector") or {}
        return [p for p in self.pods(node) if service and selector and p.namespace == namespace
                and selector.items() <= dict(p.labels).items()]  # fmt: skip

    def resolve(self, host: str, node: str, cluster_dns: bool) -> list[Endpoint]:
        """What a resolver answers for a Service's DNS name (rule "dns")."""
        if not cluster_dns or not host.endswith(".svc.cluster.local"):
            return []
        name, namespace = host.split(".")[:2]
        service = self.name(namespace, name)
        if service is None:
            return []
        if service["spec"].get("clusterIP") == "None":
            return self.backends(namespace, name, node)
        return [Endpoint("cluster-ip", CLUSTER_IP, None, name, namespace)]

    def with_cluster_ip_version_services(self) -> Deployed:
        """The same, with the traffic policy's version Services given ClusterIPs again (main before
        headless Services): the defect this model was first built to catch."""
        names = {self.traffic.version_service(v) for v in self.traffic.versions}
        documents = copy.deepcopy(list(self.documents))
        for document in documents:
            if document["kind"] == "Service" and document["metadata"]["name"] in names:
                document["spec"].pop("clusterIP", None)
        return replace(self, documents=tuple(documents))

    @property
    def envoy_uses_cluster_dns(self) -> bool:
        return self.values.get("envoy", {}).get("dnsPolicy") == "ClusterFirstWithHostNet"

    @property
    def linger_reset(self) -> bool:
        return str(self.values.get("extraConfig", {}).get(LINGER_KEY)) == "0"


# --- Policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    port: int
    protocol: str = "TCP"
    method: str = "GET"
    path: str = "/"
    dns_name: str | None = None


def _selects(selector: dict, labels: dict, namespace: str) -> bool:
    """A namespaced CiliumNetworkPolicy's endpoint selector ("k8s:" prefixes; the policy's namespace
    unless the selector names one)."""
    wanted = {key.removeprefix("k8s:"): value for key, value in (selector.get("matchLabels") or {}).items()}
    wanted.setdefault("io.kubernetes.pod.namespace", namespace)
    return wanted.items() <= labels.items()


def _peer_matches(rule: dict, direction: str, peer: Identity, namespace: str) -> bool:
    endpoints = rule.get("toEndpoints" if direction == "egress" else "fromEndpoints") or []
    entities = set(rule.get("toEntities" if direction == "egress" else "fromEntities") or [])
    if peer.entity == "pod" and any(_selects(s, dict(peer.labels), namespace) for s in endpoints):
        return True
    if "all" in entities or peer.entity in entities:
        return True
    return "cluster" in entities and (peer.entity == "pod" or peer.entity in ENTITIES_IN_CLUSTER)


def _l7_allows(rules: dict, request: Request) -> bool:
    if "http" in rules:
        return any(re.fullmatch(r.get("method", ".*"), request.method) and re.fullmatch(r.get("path", ".*"), request.path)
                   for r in rules["http"])  # fmt: skip
    name = (request.dns_name or "").rstrip(".")
    return any(fnmatch.fnmatchcase(name, r["matchPattern"]) if "matchPattern" in r else name == r.get("matchName", "").rstrip(".")
               for r in rules.get("dns", []))  # fmt: skip


def verdict(deployed: Deployed, pod: Endpoint, direction: str, peer: Identity, request: Request) -> tuple[bool, str]:
    """Whether the policies selecting ``pod`` let ``request`` out to (or in from) ``peer`` (rules "policy", "l7")."""
    labels = dict(ipcache(pod, pod.node).labels)
    enforced = [p for p in deployed.policies if p["metadata"].get("namespace") == pod.namespace
                and _selects(p["spec"].get("endpointSelector") or {}, labels, pod.namespace) and direction in p["spec"]]  # fmt: skip
    if not enforced:
        return True, f"no {direction} policy selects {pod.workload}"
    for policy in enforced:
        name = policy["metadata"]["name"]
        for rule in policy["spec"][direction]:
            if not _peer_matches(rule, direction, peer, pod.namespace):
                continue
            for to in rule.get("toPorts") or [{"ports": [{"port": "0", "protocol": "ANY"}]}]:
                if not any(p["port"] in (str(request.port), "0") and p.get("protocol", "ANY") in (request.protocol, "ANY")
                           for p in to.get("ports", [])):  # fmt: skip
                    continue
                if not to.get("rules"):
                    return True, f"{name} allows {peer} {direction} on {request.port}/{request.protocol}"
                if deployed.datapath != "eni":
                    return False, f"{name} has L7 rules, which Cilium chained onto the VPC CNI does not enforce"
                if _l7_allows(to["rules"], request):
                    return True, f"{name} allows {peer}: {request.dns_name or f'{request.method} {request.path}'}"
    what = request.dns_name or f"{request.method} {request.path}"
    return False, f"no {direction} rule of {pod.workload} allows {peer} on {request.port}/{request.protocol} ({what})"


# --- Paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One connection as a client makes it, and what it asks for."""

    name: str
    client: str  # a workload, "ingress" (Cilium's Ingress Envoy), "kubelet", "cilium-envoy", "world"
    via: str  # direct | ingress | cec-eds | cec-dns | envoy-dns | probe
    target: str  # "namespace/service", or a DNS name for cec-dns
    request: Request
    retry_after_timeout: bool = False
    datapaths: tuple = ("chaining", "eni")


@dataclass
class Outcome:
    hop: Hop
    datapath: str
    placement: str
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    status: str = "delivered"  # delivered | denied (403 before connect) | dropped | no address | connect fails

    def check(self, rule: str, ok: bool, saw: str, failure: str = "dropped") -> bool:
        self.steps.append((rule, ok, saw))
        if not ok and self.status == "delivered":
            self.status = failure
        return ok

    @property
    def delivered(self) -> bool:
        return self.status == "delivered"

    def line(self) -> str:
        failing = next(((rule, saw) for rule, ok, saw in self.steps if not ok), None)
        reason = f"  <- {failing[0]}: {failing[1]}" if failing else ""
        return f"{self.hop.name} [{self.datapath}, {self.placement}]: {self.status}{reason}"


def _url_calls(deployed: Deployed) -> list[tuple[str, str, int, str]]:
    """(workload, service host, port, path) of every http:// URL in a container's environment, but those the
    smoke test expects refused (DENIED_*, in MUST_DENY)."""
    calls = []
    for deployment in deployed.workloads():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"].startswith("DENIED_"):
                    continue
                url = urlsplit(str(env.get("value", "")))
                if url.scheme == "http" and url.hostname:
                    calls.append((workload_name(deployment), url.hostname, url.port or 80, url.path or "/"))
    return calls


def _cec_hops(deployed: Deployed, client: str, path: str) -> list[Hop]:
    """Every route, cluster and priority of the traffic policy's CiliumEnvoyConfig, as the client's request
    takes them, and each again as a retry after a per-try timeout."""
    policy = deployed.traffic
    resources = policy.envoy_resources()
    clusters = {r["name"]: r for r in resources if r["@type"].endswith(".Cluster")}
    (route_config,) = [r for r in resources if r["@type"].endswith(".RouteConfiguration")]
    hops = []
    for route in route_config["virtual_hosts"][0]["routes"]:
        action = route["route"]
        names = [action["cluster"]] if "cluster" in action else [c["name"] for c in action["weighted_clusters"]["clusters"]]
        for name in names:
            cluster = clusters[name]
            if cluster["type"] == "EDS":
                hops.append(Hop(f"{client} -> {policy.name}: route {route['name']}, cluster {name}", client, "cec-eds",
                                name, Request(policy.port, path=path)))  # fmt: skip
                continue
            for locality in cluster["load_assignment"]["endpoints"]:
                host = locality["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
                kind = "failover" if locality.get("priority", 0) else route["name"]
                hops.append(Hop(f"{client} -> {policy.name}: route {route['name']}, cluster {name} priority "
                                f"{locality.get('priority', 0)} ({kind}, {host.split('.')[0]})", client, "cec-dns",
                                host, Request(policy.port, path=path)))  # fmt: skip
            if cluster.get("health_checks"):
                hops.append(Hop(f"cilium-envoy -> {policy.name}: active health check of cluster {name}",
                                "cilium-envoy", "health-check", name, Request(policy.port, path=path)))  # fmt: skip
    hops += [replace(h, name=f"{h.name}, retry after a per-try timeout", retry_after_timeout=True)
             for h in hops if h.via.startswith("cec-")]  # fmt: skip
    return hops


def paths(deployed: Deployed) -> list[Hop]:
    """Every path the stack ships: Ingress, the app's calls (through the traffic policy where it applies),
    DNS from the pods and from cilium-envoy, and the kubelet's probes."""
    hops = [Hop("the internet -> NLB -> a node's NodePort -> Cilium's Ingress Envoy", "world", "nlb",
                "kube-system/cilium-ingress", Request(80))]  # fmt: skip
    for ingress in deployed.kind("Ingress"):
        namespace = ingress["metadata"]["namespace"]
        for rule in ingress["spec"]["rules"]:
            for http_path in rule["http"]["paths"]:
                service = http_path["backend"]["service"]
                hops.append(Hop(f"Ingress -> {service['name']}:{service['port']['number']}", "ingress", "ingress",
                                f"{namespace}/{service['name']}", Request(service["port"]["number"], path=http_path["path"])))  # fmt: skip
    policy = deployed.traffic
    for workload, host, port, path in _url_calls(deployed):
        name, namespace = host.split(".")[:2]
        hops.append(Hop(f"{workload} -> DNS ({host})", workload, "direct", "kube-system/kube-dns",
                        Request(53, "UDP", dns_name=host)))  # fmt: skip
        hops.append(Hop(f"{workload} -> DNS over TCP ({host})", workload, "direct", "kube-system/kube-dns",
                        Request(53, "TCP", dns_name=host)))  # fmt: skip
        if (namespace, name) == (policy.namespace, policy.name):
            hops += _cec_hops(deployed, workload, path)
        else:
            hops.append(Hop(f"{workload} -> {name}:{port}", workload, "direct", f"{namespace}/{name}", Request(port, path=path)))
    for workload in deployed.workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if any(env["name"] == "INGRESS_SERVICE" for env in container.get("env", [])):
                name = workload_name(workload)
                hops.append(Hop(f"{name} -> the NLB's addresses:80 (through a NAT gateway)", name, "direct", "world", Request(80)))
    hosts = sorted({h.target for h in hops if h.via == "cec-dns"})
    hops += [Hop(f"cilium-envoy -> DNS ({host})", "cilium-envoy", "envoy-dns", "kube-system/kube-dns",
                 Request(53, "UDP", dns_name=host)) for host in hosts]  # fmt: skip
    for deployment in deployed.kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet")
                if get:
                    hops.append(Hop(f"kubelet -> {deployment['metadata']['name']} {probe} {get['path']}", "kubelet",
                                    "probe", deployment["metadata"]["name"], Request(int(get["port"]), path=get["path"])))  # fmt: skip
    return hops


# Requests the policy must refuse, in both datapaths unless stated.
MUST_DENY = (
    Hop("frontend -> catalogdetailv1:3000, skipping productcatalog", "frontend", "direct", "workshop/catalogdetailv1",
        Request(3000, path="/catalogDetail")),
    Hop("productcatalog -> frontend:9000, against the call graph", "productcatalog", "direct", "workshop/frontend", Request(9000)),
    Hop("catalogdetail -> the internet:443", "catalogdetail", "direct", "world", Request(443)),
    Hop("the internet -> frontend:9000, around the Ingress", "world", "direct", "workshop/frontend", Request(9000)),
    Hop("productcatalog -> catalogdetail: DELETE /catalogDetail", "productcatalog", "direct", "workshop/catalogdetailv1",
        Request(3000, method="DELETE", path="/catalogDetail"), datapaths=("eni",)),
    Hop("smoke test -> frontend:9000 (its deny check)", "smoke-test", "direct", "workshop/frontend", Request(9000)),
    Hop("smoke test -> catalogdetail: DELETE /catalogDetail", "smoke-test", "direct", "workshop/catalogdetailv1",
        Request(3000, method="DELETE", path="/catalogDetail"), datapaths=("eni",)),
)


def _source_for_envoy(deployed: Deployed, hop: Hop, client: Endpoint | None, target: Endpoint) -> tuple[Endpoint, Identity, str]:
    """The upstream connection's source address and the identity the backend sees, per cilium-envoy."""
    if hop.via == "ingress":
        if target.node == CLIENT_NODE:
            return Endpoint("node", NODES[CLIENT_NODE], CLIENT_NODE), Identity("ingress"), "north-south-source"
        bound = Endpoint("ingress-ip", _ingress_ip(deployed.datapath, CLIENT_NODE), CLIENT_NODE)
        sent = _masqueraded(deployed, bound, target)
        return sent, ipcache(sent, target.node), "north-south-source"
    if target.node == CLIENT_NODE and target.kind == "pod":
        return Endpoint("node", NODES[CLIENT_NODE], CLIENT_NODE), ipcache(client, CLIENT_NODE), "east-west-source"
    return client, ipcache(client, target.node or CLIENT_NODE), "east-west-source"


def _ingress_ip(datapath: str, node: str) -> str:
    """The node's Ingress IP (rule "ingress-ip"): an ENI secondary address, or one of Cilium's pool."""
    if datapath == "eni":
        return f"{NODES[node].rsplit('.', 1)[0]}.200"
    return str(POOL_RANGES[node][5])


def _masqueraded(deployed: Deployed, source: Endpoint, destination: Endpoint) -> Endpoint:
    """The source after Cilium's iptables masquerade rule (rule "masquerade"), or as it was."""
    values = deployed.values
    iptables = values.get("enableIPv4Masquerade", True) and not values.get("bpf", {}).get("masquerade", False)
    if not iptables or deployed.datapath == "eni":  # ENI IPAM turns IPv4 masquerading off (datapath-eni.yaml)
        return source
    native = values.get("ipv4NativeRoutingCIDR")
    in_range = ipaddress.ip_address(source.address) in POOL_RANGES[source.node]
    to_native = bool(native) and ipaddress.ip_address(destination.address) in ipaddress.ip_network(native)
    if in_range and not to_native and destination.kind != "node":
        return Endpoint("node", NODES[source.node], source.node)
    return source


def _carried(outcome: Outcome, deployed: Deployed, source: Endpoint, target: Endpoint, sender: str) -> bool:
    """Across nodes, whether the VPC carries the packet and its reply (rules "vpc", "reply")."""
    if target.node == sender:
        return outcome.check("vpc", True, "same node: never on the VPC")
    owned = source.owned_by_eni(deployed.datapath)
    return outcome.check("vpc", owned, f"source {source} {'is' if owned else 'is not'} an address of node {sender}'s ENIs")


def _targets(deployed: Deployed, hop: Hop, node: str, outcome: Outcome) -> list[Endpoint]:
    if hop.target == "world":
        return [Endpoint("world", "203.0.113.10")]
    if hop.via == "cec-dns":
        found = deployed.resolve(hop.target, node, deployed.envoy_uses_cluster_dns)
        outcome.check("dns", bool(found), f"{hop.target} -> {', '.join(map(str, found)) or 'nothing'}", "no address")
        return found
    if hop.via == "cec-eds":
        namespace, name = hop.target.split("/", 1)
        listed = {(s["namespace"], s["name"]) for s in deployed.traffic.cilium_envoy_config()["spec"]["backendServices"]}
        found = deployed.backends(namespace, name, node) if (namespace, name) in listed else []
        outcome.check("eds", bool(found), f"{hop.target} -> {', '.join(map(str, found)) or 'nothing'}", "no address")
        return found
    if hop.via == "probe":
        return [deployed.pod(hop.target, node)]
    namespace, name = hop.target.split("/", 1)
    found = deployed.backends(namespace, name, node)
    outcome.check("socket-lb" if hop.via == "direct" else "eds", bool(found),
                  f"{hop.target} -> {', '.join(map(str, found)) or 'nothing'}", "no address")  # fmt: skip
    return found


def evaluate(deployed: Deployed, hop: Hop, placement: str) -> Outcome:
    """One path in one placement: the client on node a, its backend on node a or b."""
    outcome = Outcome(hop, deployed.datapath, placement)
    backend_node = CLIENT_NODE if placement == "same node" or hop.via == "probe" else "b"
    if hop.via == "health-check":  # rule "host-source": from the node, no downstream connection
        policy = deployed.traffic
        for target in deployed.backends(policy.namespace, policy.name, backend_node):
            node = Endpoint("node", NODES[CLIENT_NODE], CLIENT_NODE)
            ok, saw = verdict(deployed, target, "ingress", ipcache(node, target.node), hop.request)
            outcome.check("host-source", ok, saw, "denied")
        return outcome
    if hop.via == "nlb":
        service = deployed.values.get("ingressController", {})
        annotations = service.get("service", {}).get("annotations", {})
        wanted = {"service.beta.kubernetes.io/aws-load-balancer-type": "external",
                  "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "instance",
                  "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing"}  # fmt: skip
        missing = {k: v for k, v in wanted.items() if annotations.get(k) != v}
        outcome.check("nlb", service.get("enabled") is True and not missing,
                      f"cilium-ingress annotations {'as needed' if not missing else f'lack {missing}'}")  # fmt: skip
        outcome.check("nodeport", deployed.values.get("kubeProxyReplacement") is True,
                      f"kubeProxyReplacement: {deployed.values.get('kubeProxyReplacement')}")  # fmt: skip
        return outcome
    client = deployed.pod(hop.client, CLIENT_NODE) if hop.client not in ("ingress", "kubelet", "cilium-envoy", "world") else None
    if hop.via == "envoy-dns":
        outcome.check("dns", deployed.envoy_uses_cluster_dns,
                      f"cilium-envoy's dnsPolicy: {deployed.values.get('envoy', {}).get('dnsPolicy')}", "no address")  # fmt: skip
    for target in _targets(deployed, hop, backend_node, outcome):
        if hop.via in ("cec-eds", "cec-dns"):
            outcome.check("l7lb-redirect", True, f"{deployed.traffic.name} is in the CiliumEnvoyConfig's spec.services")
            dialled = ipcache(target, CLIENT_NODE)
            ok, saw = verdict(deployed, client, "egress", dialled, hop.request)
            if not outcome.check("dial-identity", ok, f"Envoy dials {target}, identity {dialled}: {saw}", "denied"):
                continue
            source, seen_as, rule = _source_for_envoy(deployed, hop, client, target)
            outcome.check(rule, True, f"source {source}, seen as {seen_as}")
            if hop.via == "cec-dns":
                window = COREDNS_TTL_S + deployed.traffic.dns_refresh_ms / 1000
                outcome.check("dns-staleness", target.pre_stop_s > window,
                              f"{target.workload} serves {target.pre_stop_s} s after deletion; Envoy may dial it "
                              f"for {window:g} s", "denied")  # fmt: skip
            if hop.retry_after_timeout and source is client:
                outcome.check("linger", deployed.linger_reset,
                              f"{LINGER_KEY}={deployed.values.get('extraConfig', {}).get(LINGER_KEY)}", "connect fails")  # fmt: skip
        elif hop.via == "ingress":
            outcome.check("policy", True, "no policy selects reserved:ingress (egress)")
            source, seen_as, rule = _source_for_envoy(deployed, hop, None, target)
            outcome.check(rule, True, f"source {source}, seen as {seen_as}")
        elif client is not None:  # a pod's own connection (rule "socket-lb")
            ok, saw = verdict(deployed, client, "egress", ipcache(target, CLIENT_NODE), hop.request)
            outcome.check("policy", ok, saw, "denied")
            source, seen_as = client, ipcache(client, target.node or CLIENT_NODE)
        else:  # kubelet, cilium-envoy's resolver, the internet (rule "host-source")
            source = Endpoint("world", "203.0.113.20") if hop.client == "world" else Endpoint("node", NODES[CLIENT_NODE], CLIENT_NODE)
            seen_as = ipcache(source, target.node or CLIENT_NODE)
        if target.kind == "world" or hop.client == "world":
            if target.kind == "pod":
                ok, saw = verdict(deployed, target, "ingress", seen_as, hop.request)
                outcome.check("policy", ok, saw, "denied")
            continue
        _carried(outcome, deployed, source, target, CLIENT_NODE)
        if target.kind == "pod":
            ok, saw = verdict(deployed, target, "ingress", seen_as, hop.request)
            outcome.check("policy", ok, saw, "denied")
    return outcome


def evaluate_all(deployed: Deployed, hops: list[Hop] | tuple = ()) -> list[Outcome]:
    """Each path in each placement (a probe is always on its pod's node; the NLB reaches every node)."""
    hops = hops or paths(deployed)
    return [evaluate(deployed, hop, placement) for hop in hops if deployed.datapath in hop.datapaths
            for placement in (PLACEMENTS[:1] if hop.via in ("probe", "nlb") else PLACEMENTS)]  # fmt: skip


def cec_statuses(deployed: Deployed) -> dict[tuple[str, str], str]:
    """For the loopback harness: per (cluster kind, version), what a request's first try meets in the cluster,
    the worst of both placements and of every client (productcatalog, the smoke test): "delivered", "denied"
    (403 before connect), "dropped" or "no address"."""
    policy = deployed.traffic
    clients = sorted({workload for workload, host, _, _ in _url_calls(deployed) if host.split(".")[0] == policy.name})
    statuses: dict[tuple[str, str], str] = {}
    for hop in (h for client in clients for h in _cec_hops(deployed, client, "/catalogDetail")):
        if hop.retry_after_timeout or not hop.via.startswith("cec-"):
            continue
        version = next(v for v in policy.versions if hop.target in (policy.eds_cluster(v), policy.version_host(v)))
        key = ("eds" if hop.via == "cec-eds" else "dns", version)
        for placement in PLACEMENTS:
            status = evaluate(deployed, hop, placement).status
            if statuses.get(key, "delivered") == "delivered":
                statuses[key] = status
    return statuses


def main(argv: list[str]) -> int:
    from stacks import cdk_json_context
    from stacks.config import load_config

    config = load_config(cdk_json_context())
    failures = 0
    for datapath in ("chaining", "eni"):
        deployed = Deployed.of(datapath, config.traffic_policy, config.cilium_version)
        outcomes = evaluate_all(deployed)
        denied = evaluate_all(deployed, MUST_DENY)
        failures += sum(not o.delivered for o in outcomes) + sum(o.delivered for o in denied)
        print(f"== {datapath}: {sum(o.delivered for o in outcomes)}/{len(outcomes)} paths deliver, "
              f"{sum(not o.delivered for o in denied)}/{len(denied)} must-deny requests denied")  # fmt: skip
        for outcome in outcomes + denied:
            if "-v" in argv or outcome.delivered == (outcome in denied):
                print("  " + outcome.line())
    unconfirmed = [name for name, rule in RULES.items() if not rule.confirmed]
    print(f"taken on trust until a cluster shows it: {', '.join(unconfirmed)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
