"""Encryption between nodes: WireGuard in datapath eni, its strict mode over the node subnets, and the
model's verdict of every leg of every path (encrypted, same node, outside WireGuard, or not)."""

import dataclasses
import ipaddress
import json

import pytest
import yaml
from cilium_mesh.declaration import services
from checks import datapath as model
from checks.datapath import Deployed, evaluate_all, must_deny
from conftest import CONTEXT, TWO_SERVICES, with_health_checks
from stacks.config import load_config
from stacks.network import NODE_CIDR, VPC_CIDR, VPC_RESOLVER, WIREGUARD_PORT

pytestmark = pytest.mark.fast

CONFIG = load_config(CONTEXT)
SERVICES = (*CONFIG.services, *services(TWO_SERVICES))


def outcomes(datapath: str, **changes) -> list:
    return evaluate_all(Deployed.of(datapath, SERVICES, sample_app=True, **changes))


def between_cilium_endpoints_on_two_nodes(outcome) -> list[tuple]:
    """The legs of a path from a pod (or Cilium's Envoy for one) to a pod (or an Ingress IP) on another node."""
    ends = ("pod ", "ingress-ip ")
    return [leg for leg in outcome.legs if leg[0].startswith(ends) and leg[1].startswith(ends) and leg[2] != "same node"]


def test_with_eni_every_path_between_pods_on_two_nodes_is_encrypted():
    """The sample and two declared services, every path and both placements: each leg between two nodes'
    pods (and the Ingress's and the L7 proxy's, which leave from the client's or the Ingress IP) goes
    through WireGuard; on one node nothing is, by design."""
    assert CONFIG.encryption == "wireguard" and CONFIG.datapath == "eni"
    results = outcomes("eni")
    cross = [leg for o in results for leg in between_cilium_endpoints_on_two_nodes(o)]
    assert len(cross) >= 100 and {leg[2] for leg in cross} == {"encrypted"}
    ends = ("pod ", "ingress-ip ")
    same = [leg for o in results if o.placement == "same node" for leg in o.legs if leg[0].startswith(ends) and leg[1].startswith(ends)]
    assert same and {leg[2] for leg in same} == {"same node"}
    probes = [o for o in results if o.hop.via == "probe"]
    assert probes and {o.encryption for o in probes} == {"same node"}


def test_the_nlbs_hop_is_outside_wireguard_and_what_a_node_sends_is_not_encrypted():
    results = outcomes("eni")
    (nlb,) = [o for o in results if o.hop.via == "nlb"]
    assert nlb.encryption == "outside WireGuard"
    envoy_dns = [o for o in results if o.hop.via == "envoy-dns" and o.placement == "other node"]
    # cilium-envoy (host network) resolving the version Services: node to pod, without node encryption.
    assert envoy_dns and {o.encryption for o in envoy_dns} == {"not encrypted"}


def test_strict_mode_drops_nothing_that_must_be_delivered():
    """Strict mode is on by default with eni: every path still delivers, and the VPC's own addresses a pod
    reaches (the resolver, the API server's ENIs) lie outside its CIDR. What it judges, each packet and each
    reply, has a node's own address at one end (cilium-envoy's DNS, Cilium's own paths), never pod to pod."""
    results = outcomes("eni")
    assert results and all(o.delivered for o in results), [o.line() for o in results if not o.delivered]
    judged = [o for o in results if any(rule == "strict-mode" for rule, _, _ in o.steps)]
    assert {o.hop.via for o in judged} == {"envoy-dns", "cilium"} and {o.placement for o in judged} == {"other node"}
    assert all(ok for o in judged for rule, ok, _ in o.steps if rule == "strict-mode")
    vpc = [o for o in results if o.hop.target in ("vpc-resolver", "api-server")]
    assert len(vpc) == 4 and all(o.delivered for o in vpc)
    for address in (VPC_RESOLVER, model.API_SERVER_ENI):
        assert ipaddress.ip_address(address) not in ipaddress.ip_network(NODE_CIDR)


def test_strict_mode_over_the_whole_vpc_would_drop_dns_and_the_api_server():
    """Why the node subnets are one CIDR of their own: strict mode over the VPC's CIDR drops coredns's
    forwarded names and every pod's call of the API server."""
    eni = Deployed.of("eni", SERVICES)
    values = json.loads(json.dumps(eni.values))
    values["encryption"]["strictMode"]["egress"]["cidr"] = VPC_CIDR
    wide = evaluate_all(dataclasses.replace(eni, values=values))
    dropped = {o.hop.target for o in wide if not o.delivered}
    assert dropped == {"vpc-resolver", "api-server"}, [o.line() for o in wide if not o.delivered]
    assert all(any(rule == "strict-mode" and not ok for rule, ok, _ in o.steps) for o in wide if not o.delivered)


def test_unencrypted_pod_traffic_between_nodes_would_be_dropped(monkeypatch):
    """Strict mode is what makes a gap in WireGuard a drop rather than plain text: with no leg encrypted,
    every pod's path to a pod on another node fails on it."""
    monkeypatch.setattr(model, "_wireguard", lambda deployed, source, target: (False, "not encrypted (as if WireGuard failed)"))
    results = outcomes("eni")
    failed = [o for o in results if not o.delivered]
    assert failed and all(o.placement == "other node" for o in failed)
    assert all(any(rule == "strict-mode" and not ok for rule, ok, _ in o.steps) for o in failed)


def test_without_allow_remote_node_identities_strict_mode_would_drop_hubble_relay_and_replies_to_a_node():
    """Why allowRemoteNodeIdentities is true: in ENI mode pods and nodes share the node subnets, strict mode's CIDR,
    and without node encryption a pod's packet to another node's address is plain. With false (which the agent
    refuses anyway, its own address being in the CIDR: pkg/datapath/linux/config/config.go), strict mode would
    drop hubble-relay's connection to every other agent, and the replies of coredns (to cilium-envoy's DNS) and of
    the health endpoint (to cilium-health) to the asking node."""
    assert all(ipaddress.ip_address(address) in ipaddress.ip_network(NODE_CIDR) for address in model.NODES.values())
    eni = Deployed.of("eni", SERVICES)
    values = json.loads(json.dumps(eni.values))
    values["encryption"]["strictMode"]["egress"]["allowRemoteNodeIdentities"] = False
    results = evaluate_all(dataclasses.replace(eni, values=values))
    dropped = [o for o in results if not o.delivered]
    assert ("hubble-relay", model.CILIUM_AGENT) in {(o.hop.client, o.hop.target) for o in dropped}
    assert ("cilium-agent", model.HEALTH_ENDPOINT) in {(o.hop.client, o.hop.target) for o in dropped}
    assert {o.hop.via for o in dropped} == {"envoy-dns", "cilium"} and {o.placement for o in dropped} == {"other node"}
    assert all(any(rule == "strict-mode" and not ok for rule, ok, _ in o.steps) for o in dropped)
    # node to node (cilium-health's probe of another agent) leaves from a node's own address both ways
    assert not [o for o in dropped if (o.hop.client, o.hop.target) == ("cilium-agent", model.CILIUM_AGENT)]


def test_active_health_checks_go_unencrypted_and_strict_mode_lets_them_and_their_replies_through():
    """cilium-envoy's active health checks leave from the node's address (no original source): across nodes not
    encrypted without node encryption, carrying no application data; strict mode lets the check out (the node's own
    address) and the pod's reply (allowRemoteNodeIdentities). Only the backend's policy may refuse them."""
    sample = CONFIG.service("workshop/catalogdetail")
    checked = with_health_checks(sample)
    checks = [o for o in evaluate_all(Deployed.of("eni", (checked,))) if o.hop.via == "health-check"]
    across = [o for o in checks if o.placement == "other node"]
    assert across and {o.encryption for o in across} == {"not encrypted"}
    assert {o.encryption for o in checks if o.placement == "same node"} == {"same node"}
    assert all("no application data" in why for o in across for _, _, _, why in o.legs)
    assert all([ok for rule, ok, _ in o.steps if rule == "strict-mode"] == [True, True] for o in across)
    assert {rule for o in checks for rule, ok, _ in o.steps if not ok} <= {"host-source"}


def test_cilium_own_paths_between_nodes_go_unencrypted_and_strict_mode_lets_them_through():
    """hubble-relay (a pod) to every agent's Hubble server on its node's address, and cilium-health from a node's
    address to every node's address and health endpoint: pod to node and node to node or pod, so not WireGuard's
    without node encryption (Hubble has its own mTLS; the probes carry no application data); strict mode lets
    each packet and its reply out, from a node's own address or, with allowRemoteNodeIdentities, to one."""
    results = [o for o in outcomes("eni") if o.hop.via == "cilium"]
    assert {(o.hop.client, o.hop.target) for o in results} == {
        ("hubble-relay", model.CILIUM_AGENT), ("cilium-agent", model.CILIUM_AGENT), ("cilium-agent", model.HEALTH_ENDPOINT)}
    assert all(o.delivered for o in results)
    across = [o for o in results if o.placement == "other node"]
    assert len(across) == 3 and {o.encryption for o in across} == {"not encrypted"}
    assert {o.encryption for o in results if o.placement == "same node"} == {"same node"}
    assert all([ok for rule, ok, _ in o.steps if rule == "strict-mode"] == [True, True] for o in across)
    (relay,) = [o for o in across if o.hop.client == "hubble-relay"]
    assert "Hubble's own mTLS" in relay.legs[0][3]
    assert all("no application data" in o.legs[0][3] for o in across if o.hop.client == "cilium-agent")
    chaining = [o for o in outcomes("chaining") if o.hop.via == "cilium"]
    assert chaining and all(o.delivered for o in chaining) and model.HEALTH_ENDPOINT not in {o.hop.target for o in chaining}


def test_chaining_encrypts_nothing_and_has_no_strict_mode():
    results = outcomes("chaining")
    assert all(o.delivered for o in results)
    cross = [leg for o in results for leg in between_cilium_endpoints_on_two_nodes(o)]
    assert cross and {leg[2] for leg in cross} == {"not encrypted"}
    assert Deployed.of("chaining", SERVICES).strict_mode is None


def test_the_must_deny_requests_stay_refused_with_encryption():
    eni = Deployed.of("eni", SERVICES)
    refused = evaluate_all(eni, must_deny(eni))
    assert refused and not [o for o in refused if o.delivered]


# --- the stack ---------------------------------------------------------------------------------------


def test_eni_opens_wireguard_between_the_nodes_and_chaining_does_not(synth, synth_eni):
    def wireguard_rules(s):
        return [r["Properties"] for r in s.resources("AWS::EC2::SecurityGroupIngress").values()
                if r["Properties"].get("IpProtocol") == "udp" and r["Properties"].get("FromPort") == WIREGUARD_PORT]  # fmt: skip

    (rule,) = wireguard_rules(synth_eni)
    assert rule["ToPort"] == WIREGUARD_PORT and rule["SourceSecurityGroupId"] == rule["GroupId"]  # node to node
    assert wireguard_rules(synth) == []


def test_the_control_plane_is_outside_the_node_subnets(synth_eni):
    """Its ENIs (the API server's addresses in the VPC) in subnets of their own, outside strict mode's CIDR."""
    subnets = {k: r["Properties"]["CidrBlock"] for k, r in synth_eni.resources("AWS::EC2::Subnet").items()}
    (cluster,) = synth_eni.resources("AWS::EKS::Cluster").values()
    control_plane = [subnets[ref["Ref"]] for ref in cluster["Properties"]["ResourcesVpcConfig"]["SubnetIds"]]
    assert len(control_plane) == 3 and all(k.startswith("VpcControlPlane") for k, v in subnets.items() if v in control_plane)
    assert not any(ipaddress.ip_network(c).overlaps(ipaddress.ip_network(NODE_CIDR)) for c in control_plane)
    node = [c for c in subnets.values() if ipaddress.ip_network(c).subnet_of(ipaddress.ip_network(NODE_CIDR))]
    assert len(node) == 3


def test_the_wireguard_rules_come_with_wireguard_only(synth, synth_eni):
    def alerts(s):
        return {r.get("alert") for g in yaml.safe_load(s.resource(s.stack.metrics.rules)["Properties"]["Data"])["groups"] for r in g["rules"]}

    assert {"MeshUnencryptedTrafficDropped", "MeshNodeWithoutWireGuard"} <= alerts(synth_eni)
    assert not {"MeshUnencryptedTrafficDropped", "MeshNodeWithoutWireGuard"} & alerts(synth)
