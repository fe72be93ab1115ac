"""A real Prometheus and promtool, from Debian's pinned `prometheus` package, for the mesh's metrics.

The stack stores metrics in Amazon Managed Service for Prometheus (AMP), which
evaluates the same rule files (constructs/cilium_mesh/metrics.py). Here the
same files run in Prometheus itself, scraping the real Envoy's Prometheus stats
on loopback (the admin ``/stats/prometheus`` that cilium-envoy serves on 9964 as
``/metrics``), and promtool checks the scrape configuration and unit-tests the
rules, and amtool checks the alert manager configuration AMP is given. No root: the pinned .deb
files from Debian's archive, found through the machine's apt sources (checks/debian.py), checked by
SHA-256 and unpacked with ``dpkg-deb -x`` into .tools/. Debian 13's build, not Debian 12's:
bookworm's prometheus 2.42.0+ds-5+deb12u1 is built without Kubernetes service discovery, so its
promtool rejects ``kubernetes_sd_configs``, the only discovery the managed collector takes.

    python -m checks.prometheus install    # scripts/setup.sh runs it
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from checks.debian import Package, unpack
from checks.fixtures import ROOT

TOOLS_DIR = ROOT / ".tools"
# Debian 13 (trixie) main, as dists/trixie/main/binary-amd64/Packages gives them (Filename, SHA256).
PROMETHEUS_VERSION = "2.53.3+ds1-2"
ALERTMANAGER_VERSION = "0.28.1+ds-1"
PACKAGES = [
    Package(f"pool/main/p/prometheus/prometheus_{PROMETHEUS_VERSION}_amd64.deb",
            "58c3e6a86c56cb3bfd71032fa48d65945d526441a212f5815dfe5ed9cb787ecc"),
    Package(f"pool/main/p/prometheus/promtool_{PROMETHEUS_VERSION}_amd64.deb",
            "ff27654eacc95abd846d344e91fe4ba3b4f0588a50d606ed1d2f09ad3408722f"),
    Package(f"pool/main/p/prometheus-alertmanager/prometheus-alertmanager_{ALERTMANAGER_VERSION}_amd64.deb",
            "76ee08c2bf686fa32ca243d099b6bfc6cb00074e9337c18ef73154b60c5830a9"),
]  # fmt: skip
PROMETHEUS_DIR = TOOLS_DIR / f"prometheus-{PROMETHEUS_VERSION}-alertmanager-{ALERTMANAGER_VERSION}"
PROMETHEUS = PROMETHEUS_DIR / "usr" / "bin" / "prometheus"
PROMTOOL = PROMETHEUS_DIR / "usr" / "bin" / "promtool"
AMTOOL = PROMETHEUS_DIR / "usr" / "bin" / "amtool"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30
QUERY_TIMEOUT_S = 10


def install() -> None:
    """Download the pinned packages, check their SHA-256, and unpack them without root."""
    if all(path.exists() for path in (PROMETHEUS, PROMTOOL, AMTOOL)):
        return
    with tempfile.TemporaryDirectory() as tmp:
        unpack(PACKAGES, Path(tmp))
        shutil.copytree(Path(tmp) / "usr" / "bin", PROMETHEUS_DIR / "usr" / "bin", dirs_exist_ok=True)


def _binary(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run scripts/setup.sh (python -m checks.prometheus install)")
    return str(path)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_binary(PROMTOOL), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_binary(AMTOOL), *args], capture_output=True, text=True, timeout=120, check=False)


def _epoch(rfc3339: str) -> float:
    """Prometheus' timestamps (RFC 3339 with up to nanoseconds, "Z") as epoch seconds."""
    stamp, _, fraction = rfc3339.rstrip("Z").partition(".")
    seconds = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc).timestamp()
    return seconds + float(f"0.{fraction or 0}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class PrometheusServer:
    """The HTTP API of a running Prometheus: instant queries and the rules' alerts."""

    def __init__(self, address: str, route_prefix: str = ""):
        self.address, self.route_prefix = address, route_prefix

    @property
    def url(self) -> str:
        """Where its HTTP API lives: ``<url>/api/v1/query``."""
        return f"http://{self.address}{self.route_prefix}"

    def _get(self, path: str, **params: str) -> dict:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_S) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query; each result is {"metric": labels, "value": float}."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self._get("/api/v1/query", **params)
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr!r} is a {data['resultType']}, not a vector")
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """Each result is {"metric": labels, "values": [(time, float), ...]}."""
        data = self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")
        return [{"metric": r["metric"], "values": [(float(t), float(v)) for t, v in r["values"]]} for r in data["result"]]

    def wait_for_scrape(self) -> None:
        """Until every target has been scraped once and is up."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            targets = self._get("/api/v1/targets")["activeTargets"]
            if targets and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.1)
        raise RuntimeError("prometheus did not scrape its targets in time")

    def wait_for_evaluation_after(self, moment: float) -> None:
        """Until every target was scraped after ``moment`` (epoch seconds) and every rule group evaluated after
        those scrapes. The scrapes waited for are the first ones after ``moment``, held fixed: compared with
        the latest scrapes instead, an evaluation that runs just before each scrape would never count."""
        deadline = time.monotonic() + START_TIMEOUT_S
        scraped_by = None
        while time.monotonic() < deadline:
            if scraped_by is None:
                scraped = [_epoch(t["lastScrape"]) for t in self._get("/api/v1/targets")["activeTargets"]]
                if scraped and min(scraped) > moment:
                    scraped_by = max(scraped)
            if scraped_by is not None:
                groups = self._get("/api/v1/rules")["groups"]
                if all(_epoch(g["lastEvaluation"]) > scraped_by for g in groups):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"prometheus did not scrape (after {moment:.3f}) and evaluate (after {scraped_by}) in time")

    def firing(self) -> dict[str, list[dict]]:
        """Alert name -> the labels of each of its firing alerts."""
        alerts: dict[str, list[dict]] = {}
        for alert in self._get("/api/v1/alerts")["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return alerts

    def rule_health(self) -> list[str]:
        """Every rule that failed to evaluate, with its error."""
        bad = []
        for group in self._get("/api/v1/rules")["groups"]:
            bad += [f"{r['name']}: {r.get('lastError')}" for r in group["rules"] if r.get("health") == "err"]
        return bad


def _duration(seconds: float) -> str:
    """A Prometheus duration: whole milliseconds ("1.0s" is not one)."""
    return f"{round(seconds * 1000)}ms"


def scrape_job(name: str, targets: list[str], metrics_path: str, interval_s: float) -> dict:
    return {
        "job_name": name,
        "metrics_path": metrics_path,
        "scrape_interval": _duration(interval_s),
        "static_configs": [{"targets": targets}],
    }


@contextmanager
def running(scrape_jobs: list[dict], rule_text: str, interval_s: float = 1.0, route_prefix: str = ""):
    """A Prometheus on loopback with these scrape jobs and rule file, evaluated every ``interval_s``; stops on exit.

    route_prefix: where its API is served, e.g. "/workspaces/ws-local" for the path AMP's workspace endpoint has.
    """
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "rules.yaml").write_text(rule_text)
        config = {
            "global": {"scrape_interval": _duration(interval_s), "evaluation_interval": _duration(interval_s)},
            "rule_files": ["rules.yaml"],
            "scrape_configs": scrape_jobs,
        }
        (directory / "prometheus.yaml").write_text(yaml.safe_dump(config))
        address = f"{LOOPBACK}:{_free_port()}"
        process = subprocess.Popen(
            [_binary(PROMETHEUS), f"--config.file={directory / 'prometheus.yaml'}",
             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address={address}",
             "--log.level=error", "--web.enable-lifecycle", f"--web.external-url=http://{address}{route_prefix}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=directory,
        )  # fmt: skip
        try:
            server = PrometheusServer(address, route_prefix)
            _wait_ready(process, server.url)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            process.stderr.close()


def _wait_ready(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("prometheus did not become ready in time")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
        sys.exit(2)
    install()
