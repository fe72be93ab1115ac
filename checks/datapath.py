"""Every path a request takes, as Cilium and the VPC carry it, in each datapath, for every declared service.

The model reads what the stack applies: the sample app's Deployments, Services and Ingress (with
sample_app), the version Services and CiliumNetworkPolicies each service's declaration renders, the
sample's own policies with the datapath's replacements, the smoke test's objects, the Cilium values,
and each service's Envoy resources. A service the user declares has no manifest here: its versions'
pods and its callers are placed from the declaration (rule "declared"). For each path, in each
datapath, with client and backend on one node and on two, it works out, step by step and each step
from the rule in ``RULES`` (with its source):

1. the address dialled: what the kernel's socket load balancer, Cilium's EDS or
   cluster DNS gives (a pod, a ClusterIP, or nothing);
2. the source address and identity, as cilium-envoy binds it (original source,
   the node, or the Ingress IP) and as masquerading rewrites it;
3. the destination identity in an ipcache: pods by labels, ClusterIPs as world,
   nodes as host or remote-node;
4. whether the VPC carries it: EC2's source/destination check, and a route back; whether WireGuard
   encrypts it, and whether strict mode lets it and its reply out;
5. the verdict of the CiliumNetworkPolicies: the client's egress (for an Envoy
   L7 load balancer, enforced by Envoy on the address it dialled) and the
   backend's ingress, L7 rules included where Cilium enforces them.

The paths of a service: each of its clients (its callers, the smoke test, the rollout's load, and
any workload whose URL names it) through each route of its CiliumEnvoyConfig the client's request
can take, to each cluster and priority, the mirror, and each retry; DNS from the clients and from
cilium-envoy; the kubelet's probes of its pods. Besides, Cilium's own between nodes: hubble-relay to
every agent's Hubble server, and cilium-health's probes. A path delivers when every step does.
``must_deny`` lists requests the policy must refuse. What the model takes on trust is in ``RULES``
with ``confirmed`` False: docs/verification.md lists them as what a real cluster must still confirm.

    python -m checks.datapath        # every path of every service, both datapaths, both placements
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from urllib.parse import urlsplit

from cilium_mesh.declaration import sample_service
from cilium_mesh.manifests import (
    DATAPATHS,
    INGRESS_FILE,
    NETWORK_POLICY_DATAPATH_FILES,
    NETWORK_POLICY_FILE,
    WORKLOAD_FILES,
    load_documents,
    replaced_by_name,
)
from cilium_mesh.policy import load_labels, service_policies, smoke_probes
from cilium_mesh.rollout_load import load_documents_of
from cilium_mesh.smoke_files import smoke_documents
from cilium_mesh.traffic import (
    CLUSTER_DOMAIN,
    HTTP_METHODS,
    LOAD_HEADER,
    MESH_NAMESPACE,
    OUTSIDER_LABELS,
    SMOKE_TEST_LABELS,
    Caller,
    HttpRule,
    MeshService,
)
from cilium_mesh.values import cilium_values
from stacks import network

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
    "envoy-socket-lb": Rule(
        "cilium-envoy's upstream connect to a ClusterIP (from the host's network namespace, with the client's "
        "original source) is translated by the socket LB to a backend pod, which sees the client's identity. "
        "Only a client whose egress admits world gets that far (rule dial-identity).",
        "Cilium kube-proxy replacement, socket LB in the host namespace (bpf/bpf_sock.c; "
        "socketLB.hostNamespaceOnly false by default)",
        confirmed=False,
    ),
    "declared": Rule(
        "A declared service's Service, its versions' pods and its callers' pods are the user's, not in the "
        "stack's manifests: the model places one pod per version and per caller with the declared labels in "
        "the declared namespace, ready on the declared port, probed by the kubelet on that port, and serving "
        "past the DNS staleness window once deleted (a preStop, as the sample's catalogdetail has).",
        "the service's declaration (cdk.json services; docs/services.md)",
        confirmed=False,
    ),
    "wireguard": Rule(
        "With WireGuard, a packet from a pod, or from Cilium's Envoy (the L7 proxy and the Ingress) for a pod, "
        "to a pod or an Ingress IP of another node leaves through cilium_wg0, encrypted to that node's key; "
        "on one node nothing is encrypted (it never reaches the wire); without node encryption a node's own "
        "traffic, to or from its address, is not: a host process (the kubelet, cilium-envoy's DNS and active "
        "health checks, cilium-health) sends with the host identity and no L7 proxy mark, and a node's address "
        "has no key.",
        "Cilium docs, \"WireGuard Transparent Encryption\" (Documentation/security/network/encryption-wireguard.rst, "
        "1.18-1.20, \"Which traffic is encrypted\": pod to remote pod by default, pod to remote node and node to "
        "remote pod only with node-to-node); cilium/cilium bpf/lib/wireguard.h wg_maybe_redirect_to_encrypt "
        "(without ENABLE_NODE_ENCRYPTION a HOST_ID source is not encrypted unless marked by the L7 proxy)",
        confirmed=False,
    ),
    "strict-mode": Rule(
        "With strict mode, on a node's own device (after WireGuard took what it encrypts), a packet whose source "
        "and destination both lie in its CIDR is dropped (DROP_UNENCRYPTED_TRAFFIC), unless it leaves from the "
        "node's own address (IPV4_ENCRYPT_IFACE, or cilium_host's) or, with allowRemoteNodeIdentities, goes to "
        "another node's address. It keeps no state: a reply is judged as a packet of its own. With a node's address "
        "in the CIDR the agent refuses to start unless allowRemoteNodeIdentities is true.",
        "cilium/cilium bpf/lib/wireguard.h strict_allow (ENCRYPTION_STRICT_MODE: 1.18's encryption.strictMode.*), "
        "bpf/lib/encrypt.h strict_allow (ENCRYPTION_STRICT_MODE_EGRESS: .egress.* of 1.19, 1.20), called in "
        "bpf/bpf_host.c cil_to_netdev; pkg/datapath/linux/config/config.go WriteNodeConfig (node address in the "
        "CIDR: refused without allow-remote-node-identities, else STRICT_IPV4_OVERLAPPING_CIDR)",
        confirmed=False,
    ),
    "cilium-internal": Rule(
        "Cilium's own connections between nodes: hubble-relay (a pod) keeps one to every agent's Hubble server, "
        "on the node's address, port 4244, in Hubble's mTLS; each agent's cilium-health probes every node's address "
        "and its health endpoint (an address of the node's IPAM) on 4240, HTTP and ICMP, from its node's address.",
        "cilium/cilium Documentation/internals/hubble.rst (Hubble Relay: every peer, port 4244, mTLS), "
        "pkg/health/server/prober.go (each node's addresses and health IP, HTTPPathPort: cluster-health-port 4240); "
        "the values' hubble.relay.enabled; healthChecking and endpointHealthChecking.enabled (the chart's default: true)",
    ),
    "outside-wireguard": Rule(
        "The NLB's packets to a node's NodePort, and whatever leaves the VPC, are not WireGuard's: the VPC "
        "carries them as they are (the browser's HTTP is plain to the NLB too).",
        "WireGuard peers are the cluster's nodes only (CiliumNode network.cilium.io/wg-pub-key)",
    ),
}

# --- The cluster the model places things in --------------------------------------------------

VPC_CIDR = ipaddress.ip_network(network.VPC_CIDR)
NODES = {"a": "10.0.128.10", "b": "10.0.160.10"}  # in two zones' node subnets (stacks/network.py)
API_SERVER_ENI = "10.0.12.10"  # an ENI of the control plane, in its own subnets
POOL_RANGES = {"a": ipaddress.ip_network("100.65.0.0/24"), "b": ipaddress.ip_network("100.65.1.0/24")}
CLUSTER_IP = "172.20.0.100"  # any ClusterIP: none is in an ipcache
COREDNS_TTL_S = 5
PLACEMENTS = ("same node", "other node")
CLIENT_NODE = "a"
ENTITIES_IN_CLUSTER = {"host", "remote-node", "ingress", "health", "init", "kube-apiserver", "unmanaged"}
LINGER_KEY = "envoy-http-upstream-linger-timeout"
# Where on its node's subnet a pod's address is: coredns, hubble-relay, then the workloads one by one; the
# Ingress IP and the health endpoint's (ENI IPAM) below them all.
COREDNS_OFFSET, HUBBLE_RELAY_OFFSET, FIRST_POD_OFFSET, INGRESS_IP_OFFSET, HEALTH_IP_OFFSET = 30, 31, 40, -5, -6
# Cilium's own (rule "cilium-internal"): hubble.listenAddress, and the agent's cluster-health-port.
HUBBLE_PORT, HEALTH_PORT = 4244, 4240
CILIUM_AGENT, HEALTH_ENDPOINT = "kube-system/cilium-agent", "kube-system/cilium-health"


def _node_address(node: str, offset: int) -> str:
    return str(ipaddress.ip_address(NODES[node]) + offset)


@dataclass(frozen=True)
class Endpoint:
    """Something with an address: a pod, a node, an Ingress IP, a ClusterIP, or the internet."""

    kind: str  # pod | node | ingress-ip | health-ip | cluster-ip | world | api-server
    address: str
    node: str | None = None
    workload: str | None = None
    namespace: str | None = None
    labels: tuple = ()
    pre_stop_s: int | None = 0  # None: a declared pod (rule "declared"), whose manifest is the user's

    def owned_by_eni(self, datapath: str) -> bool:
        """Whether the node's ENIs own the address (rule "vpc"): pod addresses are ENI secondary addresses
        in both datapaths (the VPC CNI's, or Cilium's ENI IPAM); the Ingress IP and the health endpoint's only
        with ENI IPAM."""
        in_vpc = ipaddress.ip_address(self.address) in VPC_CIDR
        return in_vpc and (self.kind in ("pod", "node") or (self.kind in ("ingress-ip", "health-ip") and datapath == "eni"))

    def __str__(self) -> str:
        return f"{self.kind} {self.workload or ''} {self.address}".replace("  ", " ")


@dataclass(frozen=True)
class Identity:
    entity: str  # pod | host | remote-node | ingress | health | kube-apiserver | world
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
    if address.kind == "health-ip":
        return Identity("health")
    if address.kind == "api-server":
        return Identity("kube-apiserver")
    return Identity("world")


# What the model evaluates of a CiliumNetworkPolicy; anything else would be judged wrongly, so it is refused.
MODELLED_RULE_KEYS = {"fromEndpoints", "toEndpoints", "fromEntities", "toEntities", "toPorts"}
MODELLED_SPEC_KEYS = {"description", "endpointSelector", "ingress", "egress"}


def workload_name(workload: dict) -> str:
    """A Deployment by its name; a Job (named after a digest of its settings) by its app label."""
    metadata = workload["metadata"]
    return metadata["labels"]["app"] if workload["kind"] == "Job" else metadata["name"]


class Unmodelled(ValueError):
    """A policy or route uses a field the model does not evaluate."""


@dataclass(frozen=True)
class Workload:
    """What runs one kind of pod: a Deployment or Job of the documents, or a pod the declarations imply."""

    name: str
    namespace: str
    labels: tuple
    pre_stop_s: int | None  # None: declared (rule "declared")
    probes: tuple = ()  # (probe, port, path) of a Deployment's containers


def _labels_text(labels) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels).items()))


@dataclass(frozen=True)
class Deployed:
    """One datapath's objects as the stack applies them (or changed, to show what the model catches)."""

    datapath: str
    documents: tuple
    policies: tuple
    values: dict
    services: tuple[MeshService, ...]
    sample_app: bool = True

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
    def of(cls, datapath: str, services: Sequence[MeshService], sample_app: bool = True, cilium_version: str = "1.19.6",
           documents: list[dict] | None = None, policies: list[dict] | None = None,
           values: dict | None = None) -> Deployed:  # fmt: skip
        """What the stack applies for these services: the sample's manifests (with sample_app), each service's
        version Services and policies, the smoke test's and the rollout loads' objects, and the Cilium values;
        any of them replaced."""
        if isinstance(services, MeshService):
            raise TypeError("Deployed.of: services must be a sequence of MeshService, e.g. (service,)")
        services = tuple(services)
        mesh = []  # the smoke test's Jobs and policy, and each rollout load's (which the rollout Lambda applies)
        if documents is None or policies is None:
            mesh = smoke_documents(services, datapath, True, sample_app) + [d for s in services for d in load_documents_of(s, True)]
        if documents is None:
            documents = load_documents(*WORKLOAD_FILES, INGRESS_FILE) if sample_app else []
            documents += [d for s in services for d in s.version_services()]
            documents += [d for d in mesh if d["kind"] in ("Deployment", "Job")]
        if policies is None:
            policies = replaced_by_name(
                load_documents(NETWORK_POLICY_FILE), load_documents(NETWORK_POLICY_DATAPATH_FILES[datapath])
            ) if sample_app else []  # fmt: skip
            policies += [p for s in services for p in service_policies(s, datapath)]
            policies += [d for d in mesh if d["kind"] == "CiliumNetworkPolicy"]
        if values is None:
            encryption = "wireguard" if datapath == "eni" else "none"  # each datapath's default (stacks/config.py)
            values = cilium_values("api.example", datapath, "cilium-mesh", cilium_version, encryption=encryption,
                                   strict_mode_cidr=network.NODE_CIDR)  # fmt: skip
        return cls(datapath, tuple(documents), tuple(policies), values, services, sample_app)

    def kind(self, kind: str) -> list[dict]:
        return [d for d in self.documents if d.get("kind") == kind]

    def service_document(self, namespace: str, name: str) -> dict | None:
        return next((s for s in self.kind("Service")
                     if (s["metadata"].get("namespace"), s["metadata"]["name"]) == (namespace, name)), None)  # fmt: skip

    def mesh_service(self, key: str) -> MeshService:
        """A declared service by ``namespace/name``."""
        found = next((s for s in self.services if s.key == key), None)
        if found is None:
            raise KeyError(f"service {key} is not among the model's services ({', '.join(s.key for s in self.services)})")
        return found

    def workloads(self) -> list[dict]:
        """What runs pods in the documents: the Deployments (the loads' too), and the smoke test's Jobs."""
        return [d for d in self.documents if d.get("kind") in ("Deployment", "Job")]

    @cached_property
    def pod_kinds(self) -> tuple[Workload, ...]:
        """The documents' workloads; then, where no workload's pods carry their labels in their namespace, a pod
        for each version and caller of a service the user declares (rule "declared"). The sample's manifests run
        the sample's, so that a relabelled Deployment shows."""
        found = []
        for workload in self.workloads():
            template = workload["spec"]["template"]
            containers = template["spec"]["containers"]
            sleeps = [c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0) for c in containers]
            probes = tuple((probe, int(c[probe]["httpGet"]["port"]), c[probe]["httpGet"]["path"]) for c in containers
                           for probe in ("readinessProbe", "livenessProbe") if "httpGet" in c.get(probe, {}))  # fmt: skip
            found.append(Workload(workload_name(workload), workload["metadata"]["namespace"],
                                  tuple(sorted(template["metadata"]["labels"].items())), min(sleeps), probes))  # fmt: skip

        def declare(name: str, namespace: str, labels) -> None:
            if not any(w.namespace == namespace and dict(labels).items() <= dict(w.labels).items() for w in found):
                found.append(Workload(f"{namespace}/{name}", namespace, tuple(sorted(dict(labels).items())), None))

        sample = sample_service().key if self.sample_app else None
        users = [s for s in self.services if s.key != sample]
        for s in users:
            for version, labels in s.versions.items():
                declare(f"{s.name}-{version}", s.namespace, labels)
        for s in users:
            for caller in s.callers or ():
                declare(_labels_text(caller.labels), caller.namespace or s.namespace, caller.labels)
        return tuple(found)

    def find(self, namespace: str, labels) -> str:
        """The workload whose pods carry ``labels`` in ``namespace``."""
        found = next((w.name for w in self.pod_kinds if w.namespace == namespace and dict(labels).items() <= dict(w.labels).items()), None)
        if found is None:
            raise LookupError(f"no workload of the manifests runs pods labelled {_labels_text(labels)} in namespace {namespace}")
        return found

    @cached_property
    def _placed(self) -> dict[str, list[Endpoint]]:
        placed = {}
        for node in NODES:
            placed[node] = [Endpoint("pod", _node_address(node, COREDNS_OFFSET), node, "coredns", "kube-system", (("k8s-app", "kube-dns"),))]
            placed[node] += [Endpoint("pod", _node_address(node, FIRST_POD_OFFSET + index), node, w.name, w.namespace, w.labels, w.pre_stop_s)
                             for index, w in enumerate(self.pod_kinds)]  # fmt: skip
        return placed

    def pods(self, node: str) -> list[Endpoint]:
        """One pod of every workload on ``node`` (and coredns, which EKS runs), with distinct addresses."""
        return self._placed[node]

    @cached_property
    def cilium_envoy_configs(self) -> dict[str, dict]:
        """Each service's CiliumEnvoyConfig, by ``namespace/name``."""
        return {s.key: s.cilium_envoy_config() for s in self.services}

    def pod(self, workload: str, node: str) -> Endpoint:
        return next(p for p in self.pods(node) if p.workload == workload)

    def backends(self, namespace: str, name: str, node: str) -> list[Endpoint]:
        """The ready pods a Service selects, placed on ``node``."""
        if (namespace, name) == ("kube-system", "kube-dns"):
            return [p for p in self.pods(node) if p.workload == "coredns"]
        service = self.service_document(namespace, name)
        selector = (service or {}).get("spec", {}).get("selector") or {}
        return [p for p in self.pods(node) if service and selector and p.namespace == namespace
                and selector.items() <= dict(p.labels).items()]  # fmt: skip

    def resolve(self, host: str, node: str, cluster_dns: bool) -> list[Endpoint]:
        """What a resolver answers for a Service's DNS name (rule "dns")."""
        if not cluster_dns or not host.endswith(f".{CLUSTER_DOMAIN}"):
            return []
        name, namespace = host.split(".")[:2]
        service = self.service_document(namespace, name)
        if service is None:
            return []
        if service["spec"].get("clusterIP") == "None":
            return self.backends(namespace, name, node)
        return [Endpoint("cluster-ip", CLUSTER_IP, None, name, namespace)]

    def with_cluster_ip_version_services(self, service: MeshService | None = None) -> Deployed:
        """The same, with the version Services of ``service`` (default: every service) given ClusterIPs again
        (main before headless Services): the defect this model was first built to catch."""
        chosen = [service] if service is not None else self.services
        names = {(s.namespace, s.version_service(v)) for s in chosen for v in s.versions}
        documents = copy.deepcopy(list(self.documents))
        for document in documents:
            if document["kind"] == "Service" and (document["metadata"].get("namespace"), document["metadata"]["name"]) in names:
                document["spec"].pop("clusterIP", None)
        return replace(self, documents=tuple(documents))

    @property
    def wireguard(self) -> bool:
        encryption = self.values.get("encryption", {})
        return encryption.get("enabled") is True and encryption.get("type") == "wireguard"

    @property
    def strict_mode(self) -> tuple[ipaddress.IPv4Network, bool] | None:
        """(CIDR, allowRemoteNodeIdentities) of WireGuard's strict mode, in whichever generation of keys."""
        mode = self.values.get("encryption", {}).get("strictMode", {})
        mode = mode.get("egress", mode)
        if not self.wireguard or not mode.get("enabled"):
            return None
        return ipaddress.ip_network(mode["cidr"]), mode.get("allowRemoteNodeIdentities") is True

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
    headers: tuple = ()  # (name, value): what Envoy's routes match besides the method and path


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
    client: str  # a workload, "ingress" (Cilium's Ingress Envoy), "kubelet", "cilium-envoy", "world", "hubble-relay",
    #              "cilium-agent"
    via: str  # direct | nlb | ingress | cec-eds | cec-dns | envoy-dns | probe | health-check | cilium
    target: str  # "namespace/service" (an EDS cluster's name too), a DNS name (cec-dns, envoy-dns), a workload (probe),
    #              CILIUM_AGENT or HEALTH_ENDPOINT (cilium)
    request: Request
    retry_after_timeout: bool = False
    datapaths: tuple = DATAPATHS
    service: str | None = None  # the declared service (namespace/name) the path belongs to


@dataclass
class Outcome:
    hop: Hop
    datapath: str
    placement: str
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    status: str = "delivered"  # delivered | denied (403 before connect) | dropped | no address | connect fails
    # Each leg between two places: (from, to, "encrypted" | "same node" | "outside WireGuard" | "not encrypted", why).
    legs: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def encryption(self) -> str:
        """The path's verdict: "encrypted" when every leg between two nodes is, else its weakest leg's."""
        kinds = [kind for _, _, kind, _ in self.legs]
        for weakest in ("not encrypted", "outside WireGuard", "encrypted", "same node"):
            if weakest in kinds:
                return weakest
        return "no leg"

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


def _service_of_host(host: str) -> tuple[str | None, str]:
    """(namespace, name) of a Service's DNS name."""
    name, _, rest = host.partition(".")
    return rest.split(".")[0] or None, name


def _callers_in_documents(deployed: Deployed) -> list[dict]:
    """The documents' workloads but the outsider: a copy of the smoke test's Job (its environment too) that
    asks only what must refuse it (must_deny)."""
    outsider = deployed.find(MESH_NAMESPACE, OUTSIDER_LABELS)
    return [w for w in deployed.workloads() if workload_name(w) != outsider]


def _url_calls(deployed: Deployed) -> list[tuple[str, str, int, str]]:
    """(workload, service host, port, path) of every http:// URL in a container's environment, but those the
    smoke test expects refused (DENIED_*, in must_deny)."""
    calls = []
    for deployment in _callers_in_documents(deployed):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"].startswith("DENIED_"):
                    continue
                url = urlsplit(str(env.get("value", "")))
                if url.scheme == "http" and url.hostname:
                    calls.append((workload_name(deployment), url.hostname, url.port or 80, url.path or "/"))
    return calls


@dataclass(frozen=True)
class Client:
    """A workload that calls a declared service through its CiliumEnvoyConfig, and the requests it makes."""

    workload: str
    requests: tuple[Request, ...]
    any_headers: bool = True  # it may send any header (a pin, a route's): every route its requests can match


def _example_path(pattern: str, service: MeshService, where: str) -> str:
    """A path an L7 rule's ``pattern`` (a regular expression) admits: the service's check_path, or the pattern
    as a literal with its wildcards filled."""
    filled = re.sub(r"\.\*|\.\+", lambda m: "" if m.group() == ".*" else "x", pattern).replace("\\", "")
    for candidate in (service.check_path, filled):
        if re.fullmatch(pattern, candidate):
            return candidate
    raise Unmodelled(f"{where}: the model finds no path that the http rule {pattern!r} admits; give it a literal path")


def _caller_requests(service: MeshService, caller: Caller, datapath: str) -> tuple[Request, ...]:
    """Under eni each of the caller's http rules (its L7 rules) as a request, else GET check_path."""
    if datapath == "eni" and caller.http:
        return tuple(Request(service.pod_port, method=rule.method, path=_example_path(rule.path, service, f"{service.key} caller {_labels_text(caller.labels)}"))
                     for rule in caller.http)  # fmt: skip
    return (Request(service.pod_port, path=service.check_path),)


def _clients(deployed: Deployed, service: MeshService) -> list[Client]:
    """Who calls the service: its callers, the smoke test (its probes, each with its own headers), the rollout's
    load (its one request, with the load header), and any other workload whose URL names it (GET its path)."""
    requests: dict[str, list[Request]] = {}
    for caller in service.callers or ():
        requests.setdefault(deployed.find(caller.namespace or service.namespace, caller.labels), []).extend(
            _caller_requests(service, caller, deployed.datapath))
    clients = [Client(workload, tuple(dict.fromkeys(asked))) for workload, asked in requests.items()]
    probes = [Request(service.pod_port, method=p.method, path=p.path, headers=tuple(sorted(p.headers.items())))
              for p in smoke_probes(service)]  # fmt: skip
    clients.append(Client(deployed.find(MESH_NAMESPACE, SMOKE_TEST_LABELS), tuple(dict.fromkeys(probes)), any_headers=False))
    load = service.rollout.load if service.rollout is not None else None
    if load is not None:
        headers = tuple(sorted({**load.headers, LOAD_HEADER: "1"}.items()))
        asked = Request(service.pod_port, method=load.method, path=load.path or service.check_path, headers=headers)
        clients.append(Client(deployed.find(MESH_NAMESPACE, load_labels(service)), (asked,), any_headers=False))
    listed = {c.workload for c in clients}
    others: dict[str, list[Request]] = {}
    for workload, host, _, path in _url_calls(deployed):
        if _service_of_host(host) == (service.namespace, service.name) and workload not in listed:
            others.setdefault(workload, []).append(Request(service.pod_port, path=path))
    return clients + [Client(workload, tuple(dict.fromkeys(asked))) for workload, asked in others.items()]


MODELLED_MATCH_KEYS = {"prefix", "path", "headers"}


def _route_matches(match: dict, request: Request) -> bool:
    """Envoy's route match, for what the services' routes use: a prefix or path, exact or present headers."""
    extra = match.keys() - MODELLED_MATCH_KEYS
    if extra:
        raise Unmodelled(f"a route matches on {sorted(extra)}, which the model does not evaluate")
    if ("path" in match and request.path != match["path"]) or not request.path.startswith(match.get("prefix", "")):
        return False
    sent = {":method": request.method, **dict(request.headers)}
    for header in match.get("headers", []):
        value = sent.get(header["name"])
        if "present_match" in header:
            ok = (value is not None) == header["present_match"]
        elif header.get("string_match", {}).keys() == {"exact"}:
            ok = value == header["string_match"]["exact"]
        else:
            raise Unmodelled(f"a route matches header {header['name']} by {sorted(header)}, which the model does not evaluate")
        if not ok:
            return False
    return True


def _routes_taken(routes: list[dict], request: Request, any_headers: bool) -> list[tuple[dict, Request]]:
    """Each route Envoy picks (the first that matches) for the request; for a client that may send any header,
    each route its method and path can reach, with the headers that lead there."""
    def first(sent: Request) -> dict | None:
        return next((r for r in routes if _route_matches(r["match"], sent)), None)

    if not any_headers:
        route = first(request)
        return [(route, request)] if route is not None else []
    taken = []
    for route in routes:
        wanted = {h["name"]: h["string_match"]["exact"] if "string_match" in h else "1"
                  for h in route["match"].get("headers", []) if not h["name"].startswith(":") and h.get("present_match", True)}  # fmt: skip
        sent = replace(request, headers=tuple(sorted({**dict(request.headers), **wanted}.items())))
        if first(sent) is route:
            taken.append((route, sent))
    return taken


def _cluster_hops(service: MeshService, cluster: dict, prefix: str, client: str, request: Request) -> list[Hop]:
    """A request to one cluster: an EDS cluster's pods, or each priority of a failover cluster by DNS."""
    if cluster["type"] == "EDS":
        return [Hop(f"{prefix}, cluster {cluster['name']}", client, "cec-eds", cluster["name"], request, service=service.key)]
    hops = []
    for locality in cluster["load_assignment"]["endpoints"]:
        host = locality["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
        priority = locality.get("priority", 0)
        hops.append(Hop(f"{prefix}, cluster {cluster['name']} priority {priority} ({'failover' if priority else 'split'}, "
                        f"{host.split('.')[0]})", client, "cec-dns", host, request, service=service.key))  # fmt: skip
    return hops


def _cec_hops(service: MeshService, client: str, request: Request, any_headers: bool = True) -> list[Hop]:
    """Every route of the service's CiliumEnvoyConfig the client's request can take, to every cluster and
    priority, and the route's mirror; a retried route's again as a retry after a per-try timeout."""
    resources = service.envoy_resources()
    clusters = {r["name"]: r for r in resources if r["@type"].endswith(".Cluster")}
    (route_config,) = [r for r in resources if r["@type"].endswith(".RouteConfiguration")]
    (virtual_host,) = route_config["virtual_hosts"]
    hops = []
    for route, sent in _routes_taken(virtual_host["routes"], request, any_headers):
        action = route["route"]
        prefix = f"{client} -> {service.name} ({request.method} {request.path}): route {route['name']}"
        names = [action["cluster"]] if "cluster" in action else [c["name"] for c in action["weighted_clusters"]["clusters"]]
        tries = [h for name in names for h in _cluster_hops(service, clusters[name], prefix, client, sent)]
        hops += tries
        if "retry_policy" in action:
            hops += [replace(h, name=f"{h.name}, retry after a per-try timeout", retry_after_timeout=True) for h in tries]
        for mirror in action.get("request_mirror_policies", []):
            hops += _cluster_hops(service, clusters[mirror["cluster"]], f"{prefix}, mirror", client, sent)  # its answer is dropped
    return hops


def _health_check_hops(service: MeshService) -> list[Hop]:
    """Envoy's active health checks, if a cluster had any: from the node, to each of its hosts."""
    hops = []
    for cluster in (r for r in service.envoy_resources() if r["@type"].endswith(".Cluster") and r.get("health_checks")):
        path = cluster["health_checks"][0].get("http_health_check", {}).get("path", "/")
        targets = [cluster["name"]] if cluster["type"] == "EDS" else [
            e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] for e in cluster["load_assignment"]["endpoints"]]  # fmt: skip
        hops += [Hop(f"cilium-envoy -> {service.name}: active health check of cluster {cluster['name']} ({target.split('.')[0]})",
                     "cilium-envoy", "health-check", target, Request(service.pod_port, path=path), service=service.key)
                 for target in targets]  # fmt: skip
    return hops


def _cilium_hops(deployed: Deployed) -> list[Hop]:
    """Cilium's own connections between nodes, as the values run them (rule "cilium-internal"): hubble-relay to every
    agent's Hubble server, and cilium-health's probes of every node's address and health endpoint (eni only: with
    chaining that endpoint's address is of Cilium's pool, which the VPC does not route, cilium/cilium#9260)."""
    values, hops = deployed.values, []
    hubble = values.get("hubble", {})
    if hubble.get("enabled") and hubble.get("relay", {}).get("enabled"):
        hops.append(Hop(f"hubble-relay -> each agent's Hubble server (a node's address:{HUBBLE_PORT})", "hubble-relay", "cilium",
                        CILIUM_AGENT, Request(HUBBLE_PORT)))  # fmt: skip
    if values.get("healthChecking", True):
        hops.append(Hop(f"cilium-health -> each node's address:{HEALTH_PORT} (HTTP, ICMP)", "cilium-agent", "cilium",
                        CILIUM_AGENT, Request(HEALTH_PORT)))  # fmt: skip
        if values.get("endpointHealthChecking", {}).get("enabled", True):
            hops.append(Hop(f"cilium-health -> each node's health endpoint:{HEALTH_PORT} (HTTP, ICMP)", "cilium-agent", "cilium",
                            HEALTH_ENDPOINT, Request(HEALTH_PORT), datapaths=("eni",)))  # fmt: skip
    return hops


def _version_of(deployed: Deployed, workload: Workload) -> str | None:
    """The declared service whose version ``workload``'s pods are, if any."""
    return next((s.key for s in deployed.services for labels in s.versions.values()
                 if s.namespace == workload.namespace and dict(labels).items() <= dict(workload.labels).items()), None)  # fmt: skip


def paths(deployed: Deployed) -> list[Hop]:
    """Every path the stack ships: Ingress, the sample's own calls, every declared service's clients through its
    CiliumEnvoyConfig, DNS from the pods and from cilium-envoy, Cilium's own between nodes, and the kubelet's probes."""
    hops = []
    if deployed.kind("Ingress"):
        hops.append(Hop("the internet -> NLB -> a node's NodePort -> Cilium's Ingress Envoy", "world", "nlb",
                        "kube-system/cilium-ingress", Request(80)))  # fmt: skip
    for ingress in deployed.kind("Ingress"):
        namespace = ingress["metadata"]["namespace"]
        for rule in ingress["spec"]["rules"]:
            for http_path in rule["http"]["paths"]:
                service = http_path["backend"]["service"]
                hops.append(Hop(f"Ingress -> {service['name']}:{service['port']['number']}", "ingress", "ingress",
                                f"{namespace}/{service['name']}", Request(service["port"]["number"], path=http_path["path"])))  # fmt: skip
    declared = {(s.namespace, s.name) for s in deployed.services}
    for workload, host, port, path in _url_calls(deployed):
        namespace, name = _service_of_host(host)
        if (namespace, name) in declared:
            continue  # through the service's CiliumEnvoyConfig, below
        hops.append(Hop(f"{workload} -> DNS ({host})", workload, "direct", "kube-system/kube-dns", Request(53, "UDP", dns_name=host)))
        hops.append(Hop(f"{workload} -> DNS over TCP ({host})", workload, "direct", "kube-system/kube-dns", Request(53, "TCP", dns_name=host)))
        hops.append(Hop(f"{workload} -> {name}:{port}", workload, "direct", f"{namespace}/{name}", Request(port, path=path)))
    for workload in _callers_in_documents(deployed):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if any(env["name"] == "INGRESS_SERVICE" and env.get("value") for env in container.get("env", [])):
                name = workload_name(workload)
                hops.append(Hop(f"{name} -> the NLB's addresses:80 (through a NAT gateway)", name, "direct", "world", Request(80)))
    for s in deployed.services:
        host = f"{s.name}.{s.namespace}.{CLUSTER_DOMAIN}"
        for client in _clients(deployed, s):
            hops += [Hop(f"{client.workload} -> DNS{over} ({host})", client.workload, "direct", "kube-system/kube-dns",
                         Request(53, protocol, dns_name=host), service=s.key) for over, protocol in (("", "UDP"), (" over TCP", "TCP"))]  # fmt: skip
            for request in client.requests:
                hops += _cec_hops(s, client.workload, request, client.any_headers)
        hops += _health_check_hops(s)
        smoke = deployed.find(MESH_NAMESPACE, SMOKE_TEST_LABELS)
        if smoke:  # the smoke test's version check: each weighted version's pods, asked directly (smoke_files.py)
            for v in s.weighted_versions:
                hops.append(Hop(f"{smoke} -> DNS ({s.version_host(v)})", smoke, "direct", "kube-system/kube-dns",
                                Request(53, "UDP", dns_name=s.version_host(v)), service=s.key))  # fmt: skip
                hops.append(Hop(f"{smoke} -> {s.version_service(v)}:{s.pod_port} directly (its version check)", smoke, "direct",
                                f"{s.namespace}/{s.version_service(v)}", Request(s.pod_port, path=s.check_path), service=s.key))  # fmt: skip
        if s.callers is not None:  # the outsider resolves the version Services it must be refused by (must_deny)
            outsider = deployed.find(MESH_NAMESPACE, OUTSIDER_LABELS)
            hops += [Hop(f"{outsider} -> DNS{over} ({s.version_host(v)})", outsider, "direct", "kube-system/kube-dns",
                         Request(53, protocol, dns_name=s.version_host(v)), service=s.key)
                     for v in s.versions for over, protocol in (("", "UDP"), (" over TCP", "TCP"))]  # fmt: skip
    hosts = {h.target: h.service for h in hops if h.via == "cec-dns"}
    hops += [Hop(f"cilium-envoy -> DNS ({host})", "cilium-envoy", "envoy-dns", "kube-system/kube-dns",
                 Request(53, "UDP", dns_name=host), service=key) for host, key in sorted(hosts.items())]  # fmt: skip
    # What leaves the node subnets to the VPC's own addresses, which strict mode must not drop: coredns
    # forwarding the names it does not serve, and the smoke test writing its verdict to the API server.
    hops.append(Hop("coredns -> the VPC's resolver (names outside the cluster)", "coredns", "direct", "vpc-resolver",
                    Request(53, "UDP", dns_name="sts.us-west-2.amazonaws.com")))  # fmt: skip
    smoke = deployed.find(MESH_NAMESPACE, SMOKE_TEST_LABELS)
    if smoke:
        hops.append(Hop(f"{smoke} -> the API server (its verdict)", smoke, "direct", "api-server", Request(443)))
    hops += _cilium_hops(deployed)
    for workload in deployed.pod_kinds:
        key = _version_of(deployed, workload)
        for probe, port, path in workload.probes:
            hops.append(Hop(f"kubelet -> {workload.name} {probe} {path}", "kubelet", "probe", workload.name,
                            Request(port, path=path), service=key))  # fmt: skip
        if key is not None and workload.pre_stop_s is None:  # a declared version: the kubelet probes its port
            s = deployed.mesh_service(key)
            hops.append(Hop(f"kubelet -> {workload.name} probe on {s.pod_port}", "kubelet", "probe", workload.name,
                            Request(s.pod_port, path=s.check_path), service=key))  # fmt: skip
    return hops


def _refused_method(rules: Sequence[HttpRule], path: str) -> str | None:
    """A method none of the L7 rules admits on ``path`` (DELETE, if none does)."""
    return next((m for m in ("DELETE", *HTTP_METHODS)
                 if not any(re.fullmatch(r.method, m) and re.fullmatch(r.path, path) for r in rules)), None)  # fmt: skip


def _sample_must_deny(deployed: Deployed) -> list[Hop]:
    """The sample app's call graph (manifests/app/, its declaration for the declared service): what its own
    policies refuse."""
    smoke = deployed.find(MESH_NAMESPACE, SMOKE_TEST_LABELS)
    s = deployed.mesh_service(sample_service().key)
    version = next(iter(s.versions))
    direct = s.version_service(version)
    return [
        Hop(f"frontend -> {direct}:{s.pod_port}, skipping productcatalog", "frontend", "direct", f"{s.namespace}/{direct}",
            Request(s.pod_port, path=s.check_path)),
        Hop("productcatalog -> frontend:9000, against the call graph", "productcatalog", "direct", "workshop/frontend", Request(9000)),
        Hop(f"{s.name} -> the internet:443", deployed.find(s.namespace, s.versions[version]), "direct", "world", Request(443)),
        Hop("the internet -> frontend:9000, around the Ingress", "world", "direct", "workshop/frontend", Request(9000)),
        Hop("smoke test -> frontend:9000 (its deny check)", smoke, "direct", "workshop/frontend", Request(9000)),
    ]  # fmt: skip


def must_deny(deployed: Deployed) -> list[Hop]:
    """Requests the policy must refuse, in both datapaths unless stated: for every service with callers, the
    smoke test's outsider (to each version directly, and through the Service), and under eni a method outside
    a caller's or the smoke test's L7 rules; with the sample app, requests against its call graph."""
    hops = _sample_must_deny(deployed) if deployed.sample_app else []
    outsider = deployed.find(MESH_NAMESPACE, OUTSIDER_LABELS)
    smoke = deployed.find(MESH_NAMESPACE, SMOKE_TEST_LABELS)
    for s in deployed.services:
        if s.callers is None:
            continue  # no policy: nothing refuses anyone
        check = Request(s.pod_port, path=s.check_path)
        hops += [Hop(f"{outsider} -> {s.version_service(v)}:{s.pod_port} directly, no caller", outsider, "direct",
                     f"{s.namespace}/{s.version_service(v)}", check, service=s.key) for v in s.versions]  # fmt: skip
        hops += [h for h in _cec_hops(s, outsider, check) if not h.retry_after_timeout]
        limited = [(deployed.find(c.namespace or s.namespace, c.labels), c.http, _caller_requests(s, c, "eni")[0].path)
                   for c in s.callers if c.http]  # fmt: skip
        asked_by_smoke = tuple(HttpRule(p.method, re.escape(p.path)) for p in smoke_probes(s))  # its L7 rules (policy.py)
        limited.append((smoke, asked_by_smoke, s.check_path))
        for workload, rules, path in limited:
            method = _refused_method(rules, path)
            if method is None:
                continue
            asked = Request(s.pod_port, method=method, path=path)
            hops += [Hop(f"{workload} -> {s.version_service(v)}: {method} {path}, outside its L7 rules", workload, "direct",
                         f"{s.namespace}/{s.version_service(v)}", asked, datapaths=("eni",), service=s.key) for v in s.versions]  # fmt: skip
            hops += [replace(h, datapaths=("eni",)) for h in _cec_hops(s, workload, asked) if not h.retry_after_timeout]
    return hops


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
        return _node_address(node, INGRESS_IP_OFFSET)
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


def _carried(outcome: Outcome, deployed: Deployed, source: Endpoint, target: Endpoint, sender: str, carries: str = "") -> bool:
    """Across nodes, whether the VPC carries the packet and its reply (rules "vpc", "reply"), whether it is
    encrypted, and whether strict mode lets it and the reply out (rules "wireguard", "strict-mode"); ``carries``
    says what the connection holds, where that is not a request's data."""
    if target.node == sender:
        outcome.legs.append((str(source), str(target), "same node", "one node: never on the wire, never encrypted"))
        return outcome.check("vpc", True, "same node: never on the VPC")
    owned = source.owned_by_eni(deployed.datapath)
    carried = outcome.check("vpc", owned, f"source {source} {'is' if owned else 'is not'} an address of node {sender}'s ENIs")
    encrypted, why = _wireguard(deployed, source, target)
    held = f"{why}; {carries}" if carries else why
    outcome.legs.append((str(source), str(target), "encrypted" if encrypted else "not encrypted", held))
    outcome.check("wireguard", True, why)
    _strict_mode(outcome, deployed, source, target, encrypted)
    if target.node is not None:  # the reply leaves a Cilium node too, and strict mode judges it there
        _strict_mode(outcome, deployed, target, source, _wireguard(deployed, target, source)[0], reply=True)
    return carried


def _strict_mode(outcome: Outcome, deployed: Deployed, sender: Endpoint, receiver: Endpoint, encrypted: bool,
                 reply: bool = False) -> None:  # fmt: skip
    """Strict mode on the sending node's device, for a packet WireGuard left plain (rule "strict-mode")."""
    strict = deployed.strict_mode
    if strict is None or encrypted:
        return
    cidr, allow_remote_nodes = strict
    if not all(ipaddress.ip_address(e.address) in cidr for e in (sender, receiver)):
        return
    what = f"{'the reply ' if reply else ''}{sender} -> {receiver}: not encrypted, both ends in strict mode's {cidr}"
    if sender.kind == "node":
        outcome.check("strict-mode", True, f"{what}; from the node's own address (IPV4_ENCRYPT_IFACE): let out")
        return
    allowed = allow_remote_nodes and receiver.kind == "node"
    outcome.check("strict-mode", allowed, what + ("; allowRemoteNodeIdentities lets it out to a node's own address" if allowed
                                                  else "; dropped (DROP_UNENCRYPTED_TRAFFIC)"))  # fmt: skip


# What WireGuard encrypts between two nodes (rule "wireguard"): from a pod, or from Cilium's Envoy for one
# (its upstream leaves from the client's or the Ingress IP), to a pod or an Ingress IP.
_WIREGUARD_ENDS = ("pod", "ingress-ip")
_ON_A_NODE = (*_WIREGUARD_ENDS, "health-ip", "node")


def _wireguard(deployed: Deployed, source: Endpoint, target: Endpoint) -> tuple[bool, str]:
    if not deployed.wireguard:
        return False, "encryption none: plain on the VPC"
    if source.kind in _WIREGUARD_ENDS and target.kind in _WIREGUARD_ENDS:
        return True, f"{source} to {target} on another node: WireGuard (cilium_wg0)"
    if target.kind not in _ON_A_NODE:
        return False, f"{target} is no WireGuard peer (not a node of the cluster)"
    return False, f"{source} to {target}: a node's own address, not encrypted without node encryption"


# The VPC's own addresses a pod reaches: the resolver (in the first public subnet) and the API server's ENIs.
VPC_ADDRESSES = {"vpc-resolver": Endpoint("world", network.VPC_RESOLVER), "api-server": Endpoint("api-server", API_SERVER_ENI)}


def _targets(deployed: Deployed, hop: Hop, node: str, outcome: Outcome) -> list[Endpoint]:
    if hop.target == "world":
        return [Endpoint("world", "203.0.113.10")]
    if hop.target in VPC_ADDRESSES:
        return [VPC_ADDRESSES[hop.target]]
    if hop.via in ("cec-dns", "health-check") and hop.target.endswith(f".{CLUSTER_DOMAIN}"):
        found = deployed.resolve(hop.target, node, deployed.envoy_uses_cluster_dns)
        outcome.check("dns", bool(found), f"{hop.target} -> {', '.join(map(str, found)) or 'nothing'}", "no address")
        return found
    if hop.via == "cec-eds":
        namespace, name = hop.target.split("/", 1)
        config = deployed.cilium_envoy_configs[hop.service]
        listed = {(s["namespace"], s["name"]) for s in config["spec"]["backendServices"]}
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


def _redirected(outcome: Outcome, deployed: Deployed, service: MeshService) -> None:
    """The client's connection to the Service goes to its node's Envoy (rule "l7lb-redirect")."""
    listed = {(s["namespace"], s["name"]) for s in deployed.cilium_envoy_configs[service.key]["spec"]["services"]}
    outcome.check("l7lb-redirect", (service.namespace, service.name) in listed,
                  f"{service.name} is in the CiliumEnvoyConfig's spec.services")  # fmt: skip
    if deployed.service_document(service.namespace, service.name) is None:
        outcome.check("declared", True, f"Service {service.key} is the user's (not in the stack's manifests)")


def _from_envoy(outcome: Outcome, deployed: Deployed, hop: Hop, client: Endpoint, dialled: Endpoint, backend_node: str) -> None:
    """Envoy's upstream connection for the client: its egress checked on the address dialled, then from the
    source it binds to the pod (through the socket LB, if it dialled a ClusterIP)."""
    identity = ipcache(dialled, CLIENT_NODE)
    ok, saw = verdict(deployed, client, "egress", identity, hop.request)
    if not outcome.check("dial-identity", ok, f"Envoy dials {dialled}, identity {identity}: {saw}", "denied"):
        return
    pods = [dialled]
    if dialled.kind == "cluster-ip":
        pods = deployed.backends(dialled.namespace, dialled.workload, backend_node)
        outcome.check("envoy-socket-lb", bool(pods), f"{dialled} -> {', '.join(map(str, pods)) or 'nothing'}", "no address")
    for pod in pods:
        source, seen_as, rule = _source_for_envoy(deployed, hop, client, pod)
        outcome.check(rule, True, f"source {source}, seen as {seen_as}")
        if hop.via == "cec-dns" and pod is dialled:
            window = COREDNS_TTL_S + deployed.mesh_service(hop.service).dns_refresh_ms / 1000
            if pod.pre_stop_s is None:
                outcome.check("declared", True, f"{pod.workload} must serve past {window:g} s after deletion (its preStop is the user's)")
            else:
                outcome.check("dns-staleness", pod.pre_stop_s > window,
                              f"{pod.workload} serves {pod.pre_stop_s} s after deletion; Envoy may dial it for {window:g} s", "denied")  # fmt: skip
        if hop.retry_after_timeout and source is client:
            outcome.check("linger", deployed.linger_reset,
                          f"{LINGER_KEY}={deployed.values.get('extraConfig', {}).get(LINGER_KEY)}", "connect fails")  # fmt: skip
        _carried(outcome, deployed, source, pod, CLIENT_NODE)
        ok, saw = verdict(deployed, pod, "ingress", seen_as, hop.request)
        outcome.check("policy", ok, saw, "denied")


def _cilium_internal(outcome: Outcome, deployed: Deployed, hop: Hop, node: str) -> None:
    """Cilium's own connection to ``node`` (rule "cilium-internal"): hubble-relay's pod, or the agent from its node's
    address, to the node's address or its health endpoint; no policy selects the agents' host (no host firewall)."""
    if hop.client == "hubble-relay":
        source = Endpoint("pod", _node_address(CLIENT_NODE, HUBBLE_RELAY_OFFSET), CLIENT_NODE, "hubble-relay", "kube-system",
                          (("k8s-app", "hubble-relay"),))  # fmt: skip
        carries = "Hubble's flows, in Hubble's own mTLS"
    else:
        source, carries = Endpoint("node", NODES[CLIENT_NODE], CLIENT_NODE), "a probe: no application data"
    target = Endpoint("node", NODES[node], node)
    if hop.target == HEALTH_ENDPOINT:
        target = Endpoint("health-ip", _node_address(node, HEALTH_IP_OFFSET), node)
    outcome.check("cilium-internal", True, f"{source} -> {target}:{hop.request.port}")
    if source.kind == "pod":
        ok, saw = verdict(deployed, source, "egress", ipcache(target, CLIENT_NODE), hop.request)
        outcome.check("policy", ok, saw, "denied")
    _carried(outcome, deployed, source, target, CLIENT_NODE, carries)


def evaluate(deployed: Deployed, hop: Hop, placement: str) -> Outcome:
    """One path in one placement: the client on node a, its backend on node a or b."""
    outcome = Outcome(hop, deployed.datapath, placement)
    backend_node = CLIENT_NODE if placement == "same node" or hop.via == "probe" else "b"
    if hop.via == "health-check":  # rule "host-source": from the node, no downstream connection
        node = Endpoint("node", NODES[CLIENT_NODE], CLIENT_NODE)
        for target in _targets(deployed, hop, backend_node, outcome):
            _carried(outcome, deployed, node, target, CLIENT_NODE, "an active health check: no application data")
            ok, saw = verdict(deployed, target, "ingress", ipcache(node, target.node), hop.request)
            outcome.check("host-source", ok, saw, "denied")
        return outcome
    if hop.via == "cilium":
        _cilium_internal(outcome, deployed, hop, backend_node)
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
        outcome.legs.append(("the NLB", "a node's NodePort", "outside WireGuard",
                             "the NLB is no WireGuard peer: the VPC carries its hop to the node as it is"))  # fmt: skip
        outcome.check("outside-wireguard", True, outcome.legs[-1][3])
        return outcome
    client = deployed.pod(hop.client, CLIENT_NODE) if hop.client not in ("ingress", "kubelet", "cilium-envoy", "world") else None
    if hop.via == "envoy-dns":
        outcome.check("dns", deployed.envoy_uses_cluster_dns,
                      f"cilium-envoy's dnsPolicy: {deployed.values.get('envoy', {}).get('dnsPolicy')}", "no address")  # fmt: skip
    if hop.via in ("cec-eds", "cec-dns"):
        _redirected(outcome, deployed, deployed.mesh_service(hop.service))
    for target in _targets(deployed, hop, backend_node, outcome):
        if hop.via in ("cec-eds", "cec-dns"):
            _from_envoy(outcome, deployed, hop, client, target, backend_node)
            continue
        if hop.via == "ingress":
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
        if hop.target in VPC_ADDRESSES:  # a pod's packet to the VPC's own address: carried, and judged by strict mode
            _carried(outcome, deployed, source, target, CLIENT_NODE)
            continue
        if target.kind == "world" or hop.client == "world":
            outcome.legs.append((str(source), str(target), "outside WireGuard", "leaves the cluster: no WireGuard peer"))
            if target.kind == "pod":
                ok, saw = verdict(deployed, target, "ingress", seen_as, hop.request)
                outcome.check("policy", ok, saw, "denied")
            continue
        _carried(outcome, deployed, source, target, CLIENT_NODE)
        if target.kind == "pod":
            ok, saw = verdict(deployed, target, "ingress", seen_as, hop.request)
            outcome.check("policy", ok, saw, "denied")
    return outcome


def evaluate_all(deployed: Deployed, hops: Sequence[Hop] | None = None) -> list[Outcome]:
    """Each path (default: every one the stack ships) in each placement (a probe is always on its pod's node;
    the NLB reaches every node)."""
    hops = paths(deployed) if hops is None else hops
    return [evaluate(deployed, hop, placement) for hop in hops if deployed.datapath in hop.datapaths
            for placement in (PLACEMENTS[:1] if hop.via in ("probe", "nlb") else PLACEMENTS)]  # fmt: skip


def cec_statuses(deployed: Deployed, service: MeshService) -> dict[tuple[str, str], str]:
    """For the loopback harness: per (cluster kind, version) of ``service``, what a request's first try (or its
    mirrored copy) meets in the cluster, the worst of both placements and of every client (its callers, the
    smoke test, the load): "delivered", "denied" (403 before connect), "dropped" or "no address". Only the
    clusters some request reaches are there (an EDS cluster needs a pin, a route to its version or the mirror)."""
    service = deployed.mesh_service(service.key)
    statuses: dict[tuple[str, str], str] = {}
    for client in _clients(deployed, service):
        for hop in (h for request in client.requests for h in _cec_hops(service, client.workload, request, client.any_headers)):
            if hop.retry_after_timeout:
                continue
            version = next(v for v in service.versions if hop.target in (service.eds_cluster(v), service.version_host(v)))
            key = ("eds" if hop.via == "cec-eds" else "dns", version)
            for placement in PLACEMENTS:
                status = evaluate(deployed, hop, placement).status
                if statuses.get(key, "delivered") == "delivered":
                    statuses[key] = status
    return statuses


def main(argv: list[str]) -> int:
    """Every path of every service in cdk.json's configuration, both datapaths; exit 1 if one fails."""
    from stacks import cdk_json_context
    from stacks.config import load_config

    config = load_config(cdk_json_context())
    failures = 0
    for datapath in DATAPATHS:
        deployed = Deployed.of(datapath, config.services, config.sample_app, config.cilium_version)
        outcomes = evaluate_all(deployed)
        denied = evaluate_all(deployed, must_deny(deployed))
        failures += sum(not o.delivered for o in outcomes) + sum(o.delivered for o in denied)
        print(f"== {datapath}: {sum(o.delivered for o in outcomes)}/{len(outcomes)} paths deliver, "
              f"{sum(not o.delivered for o in denied)}/{len(denied)} must-deny requests denied")  # fmt: skip
        for key in (None, *(s.key for s in deployed.services)):
            mine = [o for o in outcomes if o.hop.service == key]
            refused = [o for o in denied if o.hop.service == key]
            if not mine + refused:
                continue
            print(f"-- {key or 'the sample app, the Ingress and the smoke test'}: {len(mine)} paths, {len(refused)} must-deny")
            for outcome in mine + refused:
                mark = "must deny, " if outcome in refused else ""
                print(f"  {mark}{outcome.line()}")
    unconfirmed = [name for name, rule in RULES.items() if not rule.confirmed]
    print(f"taken on trust until a cluster shows it: {', '.join(unconfirmed)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
