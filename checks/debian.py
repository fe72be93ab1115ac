"""Pinned packages from Debian's archive, found through this machine's own apt sources, unpacked without root.

No address is written here: the archive is whichever ``deb`` source of the machine's apt
configuration (``/etc/apt/sources.list``, ``sources.list.d/*.list`` one-line entries and
``*.sources`` deb822 stanzas) serves the package's pool path with the pinned SHA-256. A package's
pool path is the same in every suite, so a machine configured for Debian 12 still reaches Debian
13's packages. Each package is checked by its SHA-256 before ``dpkg-deb -x`` unpacks it.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

APT_DIR = Path("/etc/apt")
DOWNLOAD_TIMEOUT_S = 120


@dataclass(frozen=True)
class Package:
    """One .deb in Debian's pool: its pool path (dists/<suite>/main/binary-amd64/Packages, Filename) and SHA-256."""

    filename: str
    sha256: str


def _one_line_uris(text: str) -> list[str]:
    """``deb [options] uri suite components`` lines (sources.list(5), one-line style)."""
    uris = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if words:
            uris.append(words[0])
    return uris


def _deb822_uris(text: str) -> list[str]:
    """``Types: deb`` stanzas (sources.list(5), deb822 style), unless ``Enabled: no``."""
    uris = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            uris += fields.get("uris", "").split()
    return uris


def archive_uris(apt_dir: Path = APT_DIR) -> list[str]:
    """Every ``deb`` URI of the machine's apt sources, in apt's order (sources.list first)."""
    uris = []
    main = apt_dir / "sources.list"
    if main.exists():
        uris += _one_line_uris(main.read_text())
    parts = apt_dir / "sources.list.d"
    for path in sorted(parts.glob("*")) if parts.is_dir() else []:
        if path.suffix == ".list":
            uris += _one_line_uris(path.read_text())
        elif path.suffix == ".sources":
            uris += _deb822_uris(path.read_text())
    return list(dict.fromkeys(uri.rstrip("/") for uri in uris))


def download(package: Package, apt_dir: Path = APT_DIR) -> bytes:
    """The package's bytes from the first apt source that serves them with the pinned SHA-256."""
    tried = []
    for uri in archive_uris(apt_dir):
        url = f"{uri}/{package.filename}"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as error:
            tried.append(f"{url}: {error}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest == package.sha256:
            return data
        tried.append(f"{url}: SHA-256 {digest}, expected {package.sha256}")
    raise RuntimeError(f"{package.filename}: no apt source of this machine serves it ({'; '.join(tried) or 'no deb sources'})")


def unpack(packages: list[Package], into: Path) -> None:
    """Download, check and unpack each package into ``into`` (``dpkg-deb -x``: no root, no maintainer scripts)."""
    with tempfile.TemporaryDirectory() as tmp:
        for index, package in enumerate(packages):
            deb = Path(tmp) / f"{index}.deb"
            deb.write_bytes(download(package))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
