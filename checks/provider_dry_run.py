"""Run aws-cdk-lib's own kubectl-handler over a synthesized template, recording what it would execute.

``cdk deploy`` hands every ``Custom::AWSCDK-EKS-*`` resource to the kubectl
provider's Lambda, whose code ships inside the installed aws-cdk-lib (jsii
tarball, ``custom-resource-handlers/dist/aws-eks-v2/kubectl-handler``). This
runs that very code, unmodified, as CloudFormation would call it: Create for
each resource in deploy order, then Delete in reverse; properties resolved
to concrete values and turned into strings, as CloudFormation delivers them
to a custom resource. Its ``subprocess`` is replaced by a recorder, so
nothing reaches AWS or a cluster. The Cilium chart alone is also rendered
with the kubectl layer's real helm (``helm template``), with the values file
the handler wrote.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from cilium_mesh.manifests import parse_documents
from cilium_mesh.rollout_plan import RESOURCE_TYPE as ROLLOUT_RESOURCE_TYPE
from cilium_mesh.versions import CILIUM_HELM_REPOSITORY

from checks.deploy_graph import creation_order
from checks.fixtures import cilium_chart
from checks.kubectl_layer import helm_template, kubectl_output, layer_helm

HANDLER_DIR = "package/custom-resource-handlers/dist/aws-eks-v2/kubectl-handler/"
HANDLER_MODULES = ("index", "apply", "helm", "get", "patch")
HANDLER_FILES = ("index.py", "apply/__init__.py", "helm/__init__.py", "get/__init__.py", "patch/__init__.py")
RESOURCE_PREFIX = "Custom::AWSCDK-EKS-"
CLUSTER_ENDPOINT = "https://ABCDEF0123456789.gr7.us-west-2.eks.amazonaws.com"
INGRESS_HOSTNAME = "k8s-kubesyst-ciliumin-0123456789.elb.us-west-2.amazonaws.com"


def _crd_established(name: str, kind: str) -> dict:
    plural, group = name.split(".", 1)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "status": {"acceptedNames": {"kind": kind, "plural": plural}},
    }


# The objects the stack reads (KubernetesObjectValue) as the API server returns them once ready, keyed by
# the handler's object type and name. The dry run answers each `kubectl get ... -o=jsonpath=...` by
# running the layer's kubectl printer on these, so the handler's own jsonpath is what gets evaluated.
READY_OBJECTS = {
    ("service", "cilium-ingress"): {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cilium-ingress", "namespace": "kube-system"},
        "status": {"loadBalancer": {"ingress": [{"hostname": INGRESS_HOSTNAME}]}},
    },
    ("deployment", "cilium-operator"): {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "cilium-operator", "namespace": "kube-system"},
        "status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2},
    },
    ("crd", "ciliumenvoyconfigs.cilium.io"): _crd_established("ciliumenvoyconfigs.cilium.io", "CiliumEnvoyConfig"),
    ("crd", "ciliumnetworkpolicies.cilium.io"): _crd_established("ciliumnetworkpolicies.cilium.io", "CiliumNetworkPolicy"),
}


@dataclass
class Step:
    """One call of the handler and what it ran."""

    logical_id: str
    resource_type: str
    request_type: str
    commands: list[list[str]] = field(default_factory=list)
    values: dict | None = None
    rendered: list[dict] | None = None
    manifests: list[dict] | None = None
    result: object = None


def find_step(steps: list[Step], logical_id: str, request_type: str = "Create") -> Step:
    """The one call of the handler for that resource and request."""
    (found,) = [s for s in steps if s.logical_id == logical_id and s.request_type == request_type]
    return found


class UnknownCommand(RuntimeError):
    """The handler ran something the recorder does not know how to answer."""


def stack_ready_objects(stack) -> dict[tuple[str, str], dict]:
    """The objects only this stack's configuration names, once ready: the smoke test's verdict after a pass."""
    smoke = getattr(stack, "smoke_test", None)
    if smoke is None:
        return {}
    return {("configmap", smoke.verdict_configmap): smoke_verdict_object(stack, "pass")}


def smoke_verdict_object(stack, verdict: str | None) -> dict:
    """The verdict ConfigMap as the API server returns it: with the Job's line, or while it runs (None)."""
    smoke = stack.smoke_test
    data = {} if verdict is None else {smoke.verdict_key: verdict}
    metadata = {"name": smoke.verdict_configmap, "namespace": smoke.verdict_namespace}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _cluster(stack) -> Cluster:
    """The created cluster's resource; an imported cluster has none (its name and endpoint are literals)."""
    return Cluster(
        logical_id=None if stack.existing else stack.get_logical_id(stack.cluster.node.default_child),
        name=stack.config.cluster_name,
        kubernetes_version=stack.config.kubernetes_version,
    )


def _invoke(modules: dict, cluster: Cluster, name: str, resource: dict, request_type: str,
            ready_objects: dict, overrides: dict | None = None, refusal: str | None = None) -> Step:  # fmt: skip
    """One call of the handler, as CloudFormation makes it, with subprocess recorded."""
    properties = {k: v for k, v in resource["Properties"].items() if k != "ServiceToken"}
    step = Step(name, resource["Type"], request_type)
    event = {
        "RequestType": request_type,
        "ResourceType": resource["Type"],
        "LogicalResourceId": name,
        "ResourceProperties": {**cloudformation_strings(cluster.resolve(properties)), **(overrides or {})},
    }
    return call_handler(modules, event, Recorder(step, cluster, ready_objects, refusal))


def call_handler(modules: dict, event: dict, recorder: Recorder) -> Step:
    """The handler's answer to ``event`` (a Lambda invocation's payload), with ``recorder`` as its subprocess."""
    step = recorder.step
    with recorder.installed(modules):
        try:
            step.result = modules["index"].handler(event, None)
            if recorder.errors:  # the handler swallows errors on Delete; a dry run must not
                raise recorder.errors[0]
        except Exception as error:
            error.add_note(f"{event['RequestType']} {step.logical_id}")
            raise
    return step


@contextlib.contextmanager
def handler_modules():
    """aws-cdk-lib's kubectl handler modules, imported into a working directory of their own."""
    with tempfile.TemporaryDirectory(prefix="kubectl-handler-") as work:
        outdir = Path(work) / "out"
        outdir.mkdir()
        yield _import_handler(Path(work) / "handler", outdir)


def dry_run(template: dict, stack) -> list[Step]:
    """Create every kubectl-provider resource of ``template`` in deploy order, then Delete them in reverse."""
    cluster = _cluster(stack)
    ready_objects = {**READY_OBJECTS, **stack_ready_objects(stack)}
    from checks.rollout_harness import dry_run_step  # it runs this module's handler

    order = [name for name in creation_order(template) if kubectl_step(template["Resources"][name]["Type"])]
    with handler_modules() as modules:
        return [
            (dry_run_step if template["Resources"][name]["Type"] == ROLLOUT_RESOURCE_TYPE else _invoke)(
                modules, cluster, name, template["Resources"][name], request_type, ready_objects
            )
            for request_type, names in (("Create", order), ("Delete", order[::-1]))
            for name in names
        ]


def kubectl_step(resource_type: str) -> bool:
    """A resource whose requests run kubectl through the kubectl provider's handler: its own, and the
    traffic rollout's (its Lambda calls that handler)."""
    return resource_type.startswith(RESOURCE_PREFIX) or resource_type == ROLLOUT_RESOURCE_TYPE


class VirtualClock:
    """Stands in for the handler's ``time`` module: a sleep advances the clock at once and is recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def wait_step(template: dict, stack, logical_id: str, document: dict, timeout_s: int | None = None,
              clock: VirtualClock | None = None) -> Step:  # fmt: skip
    """The Create of one KubernetesObjectValue while its object is ``document``: the handler runs
    ``kubectl get`` until the field has a value or its timeout (the template's, or ``timeout_s``) runs
    out, on ``clock`` when given (so its sleeps between polls take no time)."""
    cluster = _cluster(stack)
    resource = template["Resources"][logical_id]
    key = (resource["Properties"]["ObjectType"], resource["Properties"]["ObjectName"])
    overrides = {"TimeoutSeconds": str(timeout_s)} if timeout_s is not None else None
    with handler_modules() as modules:
        if clock is not None:
            modules["get"].time = clock
        return _invoke(modules, cluster, logical_id, resource, "Create", {key: document}, overrides)


def refused_apply(template: dict, stack, logical_id: str, properties: dict, refusal: str) -> Exception:
    """What the handler raises (and CloudFormation reports) when the API server refuses the Create of a
    KubernetesManifest, its properties replaced by ``properties``, with what kubectl prints: ``refusal``."""
    cluster = _cluster(stack)
    resource = {**template["Resources"][logical_id], "Properties": properties}
    with handler_modules() as modules:
        try:
            _invoke(modules, cluster, logical_id, resource, "Create", {}, refusal=refusal)
        except Exception as error:  # noqa: BLE001 (the handler raises a bare Exception)
            return error
    raise AssertionError("the handler accepted a refused apply")


@dataclass(frozen=True)
class Cluster:
    """The values CloudFormation would substitute for the cluster's Ref and Endpoint."""

    logical_id: str | None
    name: str
    kubernetes_version: str

    def resolve(self, value):
        """``value`` with Ref, Fn::GetAtt, Fn::Join, Fn::Select and Fn::Split evaluated."""
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self.name if arg == self.logical_id else f"<Ref {arg}>"
            if key == "Fn::GetAtt":
                resource, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
                if (resource, attribute) == (self.logical_id, "Endpoint"):
                    return CLUSTER_ENDPOINT
                return f"<GetAtt {resource}.{attribute}>"
            if key == "Fn::Join":
                separator, parts = self.resolve(arg)
                return separator.join(parts)
            if key == "Fn::Select":
                index, items = self.resolve(arg)
                return items[int(index)]
            if key == "Fn::Split":
                separator, text = self.resolve(arg)
                return text.split(separator)
            if key.startswith("Fn::"):
                raise ValueError(f"{key} is not evaluated by this dry run")
        return {k: self.resolve(v) for k, v in value.items()}


def cloudformation_strings(value):
    """Scalars as CloudFormation passes custom-resource properties: strings (True -> "true", 900 -> "900")."""
    if isinstance(value, dict):
        return {k: cloudformation_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [cloudformation_strings(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise TypeError(f"{value!r} is not a CloudFormation property value")


@cache
def _handler_sources() -> dict[str, bytes]:
    """The handler's files from the installed aws-cdk-lib's jsii tarball (read once per process)."""
    package = importlib.resources.files("aws_cdk") / "_jsii"
    (tgz,) = [p for p in package.iterdir() if p.name.startswith("aws-cdk-lib@") and p.name.endswith(".jsii.tgz")]
    wanted = {HANDLER_DIR + name: name for name in HANDLER_FILES}
    sources = {}
    with importlib.resources.as_file(tgz) as path, tarfile.open(path) as archive:
        for member in archive:
            if member.name in wanted:
                sources[wanted[member.name]] = archive.extractfile(member).read()
    if len(sources) != len(HANDLER_FILES):
        raise FileNotFoundError(f"{tgz.name} lacks {sorted(set(HANDLER_FILES) - set(sources))}")
    return sources


def _import_handler(directory: Path, outdir: Path) -> dict:
    """Import the handler's modules from ``directory``; they read TEST_OUTDIR once, at import.

    Their generic names (index, apply, helm, get, patch) are taken out of
    sys.modules again, and what importing changes in the process (PATH, the
    root logger's level, TEST_OUTDIR) is put back.
    """
    for name, data in _handler_sources().items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    saved_modules = {name: sys.modules.pop(name) for name in HANDLER_MODULES if name in sys.modules}
    saved_env = {key: os.environ.get(key) for key in ("PATH", "TEST_OUTDIR")}
    saved_level = logging.getLogger().level
    os.environ["TEST_OUTDIR"] = str(outdir)
    sys.path.insert(0, str(directory))
    try:
        with warnings.catch_warnings():  # its OCI regexes have invalid escapes ('\d'); not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module("index")
        return {name: sys.modules[name] for name in HANDLER_MODULES}
    finally:
        sys.path.remove(str(directory))
        for name in HANDLER_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved_modules)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        logging.getLogger().setLevel(saved_level)


class Recorder:
    """Stands in for the ``subprocess`` module of the handler: records every argv and answers like the tools would."""

    CalledProcessError = subprocess.CalledProcessError
    STDOUT = subprocess.STDOUT
    PIPE = subprocess.PIPE

    def __init__(self, step: Step, cluster: Cluster, ready_objects: dict, refusal: str | None = None):
        self.step = step
        self.cluster = cluster
        self.ready_objects = ready_objects
        self.refusal = refusal  # what kubectl prints when the API server refuses an apply
        self.errors: list[Exception] = []

    @contextlib.contextmanager
    def installed(self, modules: dict):
        """Replace ``subprocess`` in the handler's modules, and in sys.modules for its function-local
        ``from subprocess import Popen`` (the OCI chart path), so nothing real runs."""
        real = sys.modules["subprocess"]
        sys.modules["subprocess"] = self
        for module in modules.values():
            if hasattr(module, "subprocess"):
                module.subprocess = self
        try:
            yield
        finally:
            sys.modules["subprocess"] = real

    def check_call(self, argv, **_):
        self._run(argv, self._answer)
        return 0

    def check_output(self, argv, **_):
        return self._run(argv, self._answer)

    def Popen(self, argv, **_):  # noqa: N802 (subprocess's name)
        self._run(argv, self._refuse_pipe)

    def _run(self, argv, answer) -> bytes:
        argv = [str(a) for a in argv]
        self.step.commands.append(argv)
        try:
            return answer(argv)
        except Exception as error:
            self.errors.append(error)
            raise

    @staticmethod
    def _refuse_pipe(argv: list[str]) -> bytes:
        """The handler pipes processes only to log in to an OCI registry; no chart here comes from one."""
        raise UnknownCommand(f"the dry run does not pipe processes: {argv}")

    def _answer(self, argv: list[str]) -> bytes:
        if argv[:3] == ["aws", "eks", "update-kubeconfig"]:
            Path(_option(argv, "--kubeconfig")).write_text("")
            return b""
        if argv[:2] == ["helm", "upgrade"]:
            self.step.values = json.loads(Path(_option(argv, "--values")).read_text()) if "--values" in argv else None
            if _option(argv, "--repo") == CILIUM_HELM_REPOSITORY:
                self.step.rendered = self._render_cilium(argv)
            return b""
        if argv[:2] == ["helm", "uninstall"]:
            return b""
        if argv[0] == "kubectl":
            args = without_option(argv[1:], "--kubeconfig")
            if args[0] in ("create", "apply", "delete"):
                self.step.manifests = _json_stream(Path(_option(args, "-f")).read_text())
                if self.refusal and args[0] != "delete":
                    raise subprocess.CalledProcessError(1, argv, output=self.refusal.encode())
                return b""
            if args[0] == "get":
                _, _, _, object_type, name, output = args  # get -n <namespace> <type> <name> -o=jsonpath=...
                if (object_type, name) not in self.ready_objects:
                    raise UnknownCommand(f"the dry run has no ready state for {object_type}/{name}: {argv}")
                return kubectl_output(self.cluster.kubernetes_version, self.ready_objects[object_type, name], output).encode()
        raise UnknownCommand(f"the dry run does not know this command: {argv}")

    def _render_cilium(self, argv: list[str]) -> list[dict]:
        """``helm template`` of the real Cilium chart with the values file the handler wrote."""
        chart = cilium_chart(_option(argv, "--version"))
        helm = layer_helm(self.cluster.kubernetes_version)
        result = helm_template(helm, argv[2], chart, _option(argv, "--namespace"), _option(argv, "--values"),
                               f"{self.cluster.kubernetes_version}.0")  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"helm template failed: {result.args}\n{result.stderr[-3000:]}")
        return parse_documents(result.stdout)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def without_option(argv: list[str], name: str) -> list[str]:
    index = argv.index(name)
    return argv[:index] + argv[index + 2 :]


def _json_stream(text: str) -> list[dict]:
    """The handler writes a manifest as concatenated JSON objects ({...}{...}), which kubectl reads as a stream."""
    decoder, documents, index = json.JSONDecoder(), [], 0
    while index < len(text):
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
    return documents
