"""Your services: the declaration, checked at synth with one line per mistake (Cilium checks next to
nothing), the same model from cdk.json and from Python, the sample as one declaration, and the JSON
Schema an editor completes cdk.json with."""

import copy
import dataclasses
import json

import jsonschema
import pytest
from cilium_mesh import Caller, MeshService, Route
from cilium_mesh.declaration import MAX_SERVICES, ServicesError, sample_service, services
from cilium_mesh.policy import routed_to, service_policies, smoke_probes
from cilium_mesh.traffic import DESTINATION_HEADER, DeclarationError
from conftest import CONTEXT
from stacks.config import ConfigError, load_config
from stacks.settings_schema import SCHEMA_FILE, SETTINGS, render, settings_schema
from stacks.config import KEYS

pytestmark = pytest.mark.fast

PAYMENTS = {
    "name": "payments",
    "namespace": "shop",
    "port": 80,
    "versions": {"v1": {"app": "payments", "version": "v1"}, "v2": {"app": "payments", "version": "v2"}},
}


def declared(**changes) -> list[dict]:
    entry = copy.deepcopy(PAYMENTS)
    for key, value in changes.items():
        entry[key] = value
    return [entry]


# The mistakes, each with the one line it must give.
MISTAKES = [
    ("declared twice", declared() * 2, "services[payments]: shop/payments is also declared by services[payments]"),
    ("a version Service that is another's", [*declared(), {**PAYMENTS, "name": "paymentsv1", "versions": {"x": {"app": "x"}}}],
     "services[paymentsv1]: shop/paymentsv1 is also declared by services[payments]"),
    ("one pod in two versions", declared(versions={"v1": {"app": "payments"}, "v2": {"app": "payments", "track": "canary"}}),
     "services[payments].versions.v2: labels {'app': 'payments', 'track': 'canary'} and version v1's {'app': 'payments'} can select the same pod"),
    ("a route to an unknown version", declared(routes=[{"path_prefix": "/a", "to": "v1"}, {"headers": {"x-beta": "1"}, "to": "v3"}]),
     "services[payments].routes[1].to: version v3 is not declared (versions: v1, v2)"),
    ("a mirror to an unknown version", declared(mirror={"version": "v9", "percent": 5}),
     "services[payments].mirror.version: version v9 is not declared"),
    ("weights that sum to nothing", declared(weights={"v1": 0, "v2": 0}), "services[payments].weights: must have a positive sum"),
    ("a weight for an undeclared version", declared(weights={"v1": 1, "v3": 1}), "services[payments].weights.v3: version v3 is not declared"),
    ("a header name that is not a token", declared(routes=[{"headers": {"x beta": "1"}, "to": "v2"}]),
     "services[payments].routes[0].headers: 'x beta' is not an HTTP header name"),
    ("a pin header that is not a token", declared(pin_header="X-Version:"), "services[payments].pin_header: 'X-Version:' is not an HTTP header name"),
    ("retrying POST without the opt-in", declared(retries={"methods": ["GET", "POST"]}),
     "services[payments].retries.methods: POST are not idempotent: a retry may repeat their effect; set retries.non_idempotent true"),
    ("a pin header a route also matches", declared(pin_header="x-version", routes=[{"headers": {"x-version": "v2"}, "to": "v2"}]),
     "services[payments].routes[0].headers.x-version: is the pin header (pin_header)"),
    ("a namespace that is not a DNS label", declared(namespace="Shop_1"), "services[payments].namespace: 'Shop_1' is not a DNS label"),
    ("a name that is not a DNS label", declared(name="Payments"), "services['Payments'].name: 'Payments' is not a DNS label"),
    ("more services than a deploy carries",
     [{**PAYMENTS, "name": f"s{i}"} for i in range(MAX_SERVICES + 1)], f"services: {MAX_SERVICES + 1} services, more than the {MAX_SERVICES}"),
    ("a typo in a key", declared(retries={"atempts": 2}), "services[payments].retries.atempts: not a setting here (a typo?)"),
    ("a port as a string", declared(port="80"), 'services[payments].port: Input should be a valid integer (got "80")'),
    ("a key left out", [{k: v for k, v in PAYMENTS.items() if k != "versions"}], "services[payments].versions: missing"),
    ("a route that matches everything", declared(routes=[{"to": "v2"}]), "services[payments].routes[0]: matches every request"),
    ("a rollout pause AMP cannot judge", declared(rollout={"pause_s": 60}), "services[payments].rollout: pause_s 60 must be whole seconds, at least 180"),
    ("a load that changes things", declared(rollout={"load": {"method": "POST"}}), "services[payments].rollout: load.method 'POST' must be GET or HEAD"),
    ("failover to an unknown version", declared(failover=["v2", "v7"]), "services[payments].failover[1]: version v7 is not declared"),
    ("a caller without labels", declared(callers=[{"labels": {}}]), "services[payments].callers[0].labels: name the callers' pods by at least one label"),
]


@pytest.mark.parametrize(("case", "value", "line"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_one_line_naming_its_path(case, value, line):
    with pytest.raises(ServicesError) as raised:
        services(value)
    assert str(raised.value).startswith(line), str(raised.value)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="^services"):  # and through the app's configuration, as it is
        load_config({**CONTEXT, "services": value})


def test_a_good_declaration_takes_the_defaults_a_user_expects():
    (payments,) = services(declared())
    assert dict(payments.weights) == {"v1": 1, "v2": 1}  # an even split: what the plain Service gave
    assert payments.pod_port == 80 and payments.pin_header is None and payments.callers is None
    assert payments.retries.methods == ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
    assert service_policies(payments, "eni") == []  # no callers declared: nothing in its namespace changes
    drained = services(declared(weights={"v1": 10}))[0]
    assert dict(drained.weights) == {"v1": 10, "v2": 0}


def test_cdk_json_and_python_are_one_model():
    """The same service, from cdk.json's JSON and from Python, is equal, and its JSON round-trips for the Lambda."""
    entry = declared(routes=[{"headers": {"x-beta": "true"}, "to": "v2"}], callers=[{"namespace": "web", "labels": {"app": "shop"}}])
    (from_json,) = services(entry)
    from_python = MeshService(**{**PAYMENTS, "routes": (Route(headers={"x-beta": "true"}, to="v2"),),
                                 "callers": (Caller(namespace="web", labels={"app": "shop"}),)})  # fmt: skip
    assert from_json == from_python
    assert MeshService.from_json(from_json.to_json()) == from_json
    with pytest.raises(DeclarationError, match=r"^services\[payments\]\.routes\[0\]\.to: version v3 is not declared"):
        dataclasses.replace(from_python, routes=(Route(headers={"x-a": "1"}, to="v3"),))


def test_the_sample_is_one_declaration_with_the_walkthroughs_names():
    sample = sample_service()
    assert (sample.key, sample.port, sample.pin_header) == ("workshop/catalogdetail", 3000, "x-catalog-version")
    assert [s["metadata"]["name"] for s in sample.version_services()] == ["catalogdetailv1", "catalogdetailv2"]
    config = load_config(CONTEXT)
    assert config.services == (sample,) and config.sample_app
    assert load_config({**CONTEXT, "traffic_weights": {"v1": 90, "v2": 10}}).service("workshop/catalogdetail").weights == {"v1": 90, "v2": 10}


def test_without_the_sample_its_keys_say_what_replaces_them():
    # cdk.json leaves the sample's own keys null, so turning the sample off is one key.
    bare = load_config({**CONTEXT, "sample_app": False, "services": declared()})
    assert [s.key for s in bare.services] == ["shop/payments"] and not bare.sample_app
    with pytest.raises(ConfigError, match=r"^traffic_weights: sets the sample app's catalogdetail, and sample_app is false; declare your services' weights in services\[\]"):
        load_config({**CONTEXT, "sample_app": False, "traffic_weights": {"v1": 50, "v2": 50}, "services": declared()})
    with pytest.raises(ConfigError, match=r"^rollout: sets the sample app's catalogdetail"):
        load_config({**CONTEXT, "sample_app": False, "traffic_weights": None, "rollout": {}})
    with pytest.raises(ConfigError, match=r"^services\[payments\]\.rollout: needs metrics true"):
        load_config({**CONTEXT, "metrics": False, "services": declared(rollout={})})


def test_the_smoke_test_expects_each_request_where_the_routes_send_it():
    """Pins first, then the declared routes in order (the first match wins), else the split."""
    (svc,) = services(declared(versions={**PAYMENTS["versions"], "v3": {"app": "payments", "version": "v3"}}, pin_header="x-version",
                               routes=[{"path_prefix": "/admin", "to": "v1"}, {"headers": {"x-beta": "true"}, "to": "v3"},
                                       {"path": "/admin/beta", "headers": {"x-beta": "true"}, "to": "v2"},
                                       {"methods": ["POST"], "path_prefix": "/pay", "to": "v2"}]))  # fmt: skip
    assert routed_to(svc, "/admin/beta", "GET", {"x-beta": "true"}) == "v1"  # route 0 comes first
    assert routed_to(svc, "/x", "GET", {"x-beta": "true", "x-version": "v2"}) == "v2"  # the pin comes before any route
    assert routed_to(svc, "/pay", "GET", {}) == "split"
    probes = {p.check: (p.method, p.path, p.headers, p.expect) for p in smoke_probes(svc)}
    assert probes["routes[0]"] == ("GET", "/admin", {}, "v1")
    assert probes["routes[2]"] == ("GET", "/admin/beta", {"x-beta": "true"}, "v1")  # shadowed: the smoke test expects what Envoy does
    assert "routes[3]" not in probes  # POST only: the smoke test changes nothing
    assert {p.expect for p in smoke_probes(svc) if p.check.startswith("pin")} == {"v1", "v2", "v3"}


def test_every_route_says_where_it_sent_the_request():
    """The smoke test reads the destination from the header each route (and each weighted cluster) adds."""
    (svc,) = services(declared(pin_header="x-version", routes=[{"path_prefix": "/a", "to": "v2"}]))
    for route in svc.route_configuration()["virtual_hosts"][0]["routes"]:
        action = route["route"]
        added = route.get("response_headers_to_add") or [h for c in action.get("weighted_clusters", {}).get("clusters", [])
                                                         for h in c["response_headers_to_add"]]  # fmt: skip
        assert added and {h["header"]["key"] for h in added} == {DESTINATION_HEADER}, route["name"]


# --- the JSON Schema ---------------------------------------------------------------------------------


def test_the_published_schema_is_current():
    assert SCHEMA_FILE.read_text() == render(), "run: python -m stacks.settings_schema"


def test_the_schema_describes_every_key_and_cdk_json_follows_it():
    assert set(SETTINGS) == set(KEYS)
    schema = settings_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    cdk_json = json.loads((SCHEMA_FILE.parent / "cdk.json").read_text())
    assert cdk_json["$schema"] == f"./{SCHEMA_FILE.name}"
    jsonschema.Draft202012Validator(schema).validate(cdk_json)


def test_the_schema_refuses_what_the_model_refuses():
    """An editor flags a typo, a wrong type or a key left out as synth would."""
    validator = jsonschema.Draft202012Validator(settings_schema())
    for bad in (declared(colour="red"), declared(port="80"), [{k: v for k, v in PAYMENTS.items() if k != "port"}],
                declared(retries={"atempts": 1}), declared(rollout={"load": {"rate": 1}})):  # fmt: skip
        assert list(validator.iter_errors({"context": {"services": bad}})), bad
        with pytest.raises(ServicesError):
            services(bad)
    assert not list(validator.iter_errors({"context": {"services": declared(routes=[{"path": "/a", "to": "v2"}])}}))


def test_a_rollout_needs_the_failover_clusters_its_gate_reads():
    with pytest.raises(ServicesError, match=r"^services\[payments\]\.rollout: needs failover \(not false\)"):
        services(declared(failover=False, rollout={}))
    assert services(declared(failover=["v2", "v1"], rollout={}))[0].rollout is not None


def test_the_construct_checks_the_list_as_the_setting_does():
    """A CDK app that writes CiliumMesh(..., services=[...]) gets the same lines as cdk.json's services."""
    import aws_cdk as cdk
    from cilium_mesh import CiliumMesh, CiliumMeshProps

    many = services([{**PAYMENTS, "name": f"s{i}"} for i in range(MAX_SERVICES)])
    props = CiliumMeshProps(cluster=None, nodes=None, load_balancer_controller=None, cilium_version="1.19.6",
                            cluster_name="mesh", services=(*many, sample_service()))  # fmt: skip
    with pytest.raises(ServicesError, match=rf"^services: {MAX_SERVICES + 1} services, more than the {MAX_SERVICES} one deploy carries"):
        CiliumMesh(cdk.Stack(), "Mesh", props)
    with pytest.raises(ServicesError, match=r"^services\[s0\]: shop/s0 is also declared by services\[s0\]"):
        CiliumMesh(cdk.Stack(), "Mesh", dataclasses.replace(props, services=(many[0], many[0])))
