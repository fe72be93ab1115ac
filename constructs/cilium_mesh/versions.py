"""Supported Cilium releases: the one table, checked at synth so a retired or unpublished chart never reaches helm."""

# Cilium minor releases still maintained upstream, with the newest patch
# published to https://helm.cilium.io/ (charts index, 2026-11-24).
CILIUM_RELEASES: dict[str, int] = {
    "1.18": 12,
    "1.19": 6,
    "1.20": 0,
}

# The first patch of each minor with WireGuard that does not fragment L7 proxy traffic in native routing
# (cilium/cilium#42837, fixed by PR #42835: 1.18.6 as backport PR #43434; 1.19.0 was released after
# the fix was merged). Encryption wireguard refuses older patches.
WIREGUARD_FIRST_PATCH: dict[str, int] = {
    "1.18": 6,
    "1.19": 0,
    "1.20": 0,
}

CILIUM_HELM_REPOSITORY = "https://helm.cilium.io/"
