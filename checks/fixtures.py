"""Published upstream artifacts for offline checks: from ../shared/fixtures/ when present, else downloaded.

Each artifact has one upstream address (see ../shared/fixtures/README.md). A
download is cached under ~/.cache/cilium-mesh-eks. With ``CI`` set a missing
artifact is an error, never a skip: CI must run every check.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "fixtures"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cilium-mesh-eks"

# cilium-envoy image tag -> the cilium/proxy commit it is built from (the tag's last part).
CILIUM_PROXY_COMMITS = {
    "v1.36.9": "edeb3f2af56c37c407efa1f63f0b32f595399bbc",
    "v1.37.5": "7cffc778c923f68a77954a53b1a98d6b5353f004",
}


class FixtureUnavailable(RuntimeError):
    """Neither the shared fixture nor its upstream download is available."""


def _fetch(relative: str, url: str) -> Path:
    shared = SHARED / relative
    if shared.exists():
        return shared
    cached = CACHE / relative
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as error:
            raise FixtureUnavailable(f"{relative}: not in {SHARED} and {url} failed: {error}") from None
        partial = cached.with_suffix(cached.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(cached)
    return cached


def cilium_chart(version: str) -> Path:
    return _fetch(f"cilium-charts/cilium-{version}.tgz", f"https://helm.cilium.io/cilium-{version}.tgz")


def cilium_envoy_build_list(tag: str) -> Path:
    commit = CILIUM_PROXY_COMMITS[tag]
    return _fetch(
        f"cilium-envoy/{tag}-extensions_build_config.bzl",
        f"https://raw.githubusercontent.com/cilium/proxy/{commit}/envoy_build_config/extensions_build_config.bzl",
    )


def cilium_crd_schema(kind: str) -> Path:
    """kubeconform's layout: {group}/{kind}_{version}.json, from datreeio/CRDs-catalog."""
    name = f"{kind.lower()}_v2.json"
    return _fetch(
        f"crd-schemas/cilium.io/{name}",
        f"https://raw.githubusercontent.com/datreeio/CRDs-catalog/main/cilium.io/{name}",
    )
