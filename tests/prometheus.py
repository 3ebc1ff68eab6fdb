"""The real Prometheus (Debian's package) for tests: started on a free port with the project's
scrape config and alert rules, pointed at test workers, and asked through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from deploy.kafka.launcher import free_port
from tests.support import wait_until

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


class Prometheus:
    """One Prometheus server with its own storage; ``rules_for`` overrides every alert's
    ``for:`` (tests cannot wait minutes), nothing else of the rules."""

    def __init__(self, workdir: Path, rules_for: str | None = None) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: scripts/bootstrap.sh installs Debian's package"
        self.binary, self.workdir, self.rules_for = binary, workdir, rules_for
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *worker_ports: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        rules = yaml.safe_load((PROMETHEUS_DIR / "rules" / "promo.yml").read_text())
        if self.rules_for:
            for group in rules["groups"]:
                for rule in group["rules"]:
                    if "alert" in rule:  # a recording rule has no `for:`
                        rule["for"] = self.rules_for
        (self.workdir / "rules").mkdir(exist_ok=True)
        (self.workdir / "rules" / "promo.yml").write_text(yaml.safe_dump(rules))
        conf = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        # The project's config says 5s; tests wait for what they check.
        conf["global"]["scrape_interval"] = conf["global"]["evaluation_interval"] = "1s"
        conf["scrape_configs"][0]["scrape_timeout"] = "900ms"
        conf["scrape_configs"][0]["static_configs"][0]["targets"] = [
            f"127.0.0.1:{port}" for port in worker_ports]
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(conf))
        with open(self.workdir / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_until(self._ready, timeout=30, what="prometheus to be ready")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return json.load(r)["data"]

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result: [{metric: labels, value: [t, "v"]}]."""
        result: list[dict[str, Any]] = self._get(
            f"/api/v1/query?query={urllib.parse.quote(expr)}")["result"]
        return result

    def query(self, expr: str) -> float | None:
        """The first value of an instant query, or None if it returned nothing."""
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> dict[str, str]:
        """Active alerts: name (with a campaign/instance label if any) -> pending|firing."""
        active: dict[str, str] = {}
        for alert in self._get("/api/v1/alerts")["alerts"]:
            labels = alert["labels"]
            name = labels["alertname"] + (f"[{labels['campaign']}]" if "campaign" in labels
                                          else "")
            active[name] = alert["state"]
        return active

    def scraped_every_target(self) -> bool:
        targets = self._get("/api/v1/targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)
