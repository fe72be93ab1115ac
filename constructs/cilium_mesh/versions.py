"""Supported Cilium releases: the one table, checked at synth so a retired or unpublished chart never reaches helm."""

# Cilium minor releases still maintained upstream, with the newest patch
# published to https://helm.cilium.io/ (charts index, 2026-11-24).
CILIUM_RELEASES: dict[str, int] = {
    "1.18": 12,
    "1.19": 6,
    "1.20": 0,
}

CILIUM_HELM_REPOSITORY = "https://helm.cilium.io/"
