"""The retrain-and-publish walkthrough in docs/operations.md, run exactly as written, against the
real broker.

A walkthrough nobody runs drifts: one version started the worker on models/v1 and then published
to models/current, which no worker watched, so publish compared against nothing and swapped
nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support import PROMO, PromoProcess, sample, scrape, settings_env, wait_until

pytestmark = pytest.mark.kafka

WALKTHROUGH_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
MARKER = "<!-- tests/test_readme.py runs this block as written -->"


def walkthrough() -> list[str]:
    text = WALKTHROUGH_DOC.read_text()
    block = re.search(re.escape(MARKER) + r"\s*```sh\n(.*?)```", text, re.S)
    assert block, f"{WALKTHROUGH_DOC} lost its tested walkthrough"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines()
            if line.strip()]


@pytest.mark.slow(seconds=60)
def test_the_readme_retrain_walkthrough_works_as_written(settings, tmp_path: Path) -> None:
    port = "0"  # any free port for the worker's metrics: read back from its log
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env |= {k: v for k, v in settings_env(settings).items() if k.startswith("PROMO_")}
    env |= {"PROMO_WORKER_METRICS_PORT": port, "PROMO_WORKER_MODEL_POLL_SECONDS": "1",
            "PATH": f"{Path(PROMO).parent}:{env['PATH']}"}
    worker: PromoProcess | None = None
    outputs: list[str] = []
    try:
        for line in walkthrough():
            if line.endswith("&"):
                words = shlex.split(line[:-1])
                assignments = dict(w.split("=", 1) for w in words if "=" in w.split()[0])
                command = [w for w in words if w not in {f"{k}={v}" for k, v in
                                                          assignments.items()}]
                assert command[0] == "promo", line
                # The walkthrough's paths are relative to where it runs.
                worker = PromoProcess(command[1:], env | assignments, tmp_path / "worker.log",
                                      cwd=tmp_path)
                worker.wait_for_log("worker ready", timeout=120)
                continue
            done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, text=True,
                                  capture_output=True, timeout=600, check=False)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout)
        assert worker is not None, "the walkthrough starts a worker"
        first, last = outputs[2], outputs[-1]
        assert "live none" in first and "published" in first  # nothing to beat yet
        live = json.loads((tmp_path / "models" / "current" / "manifest.json").read_text())
        v1 = json.loads((tmp_path / "models" / "v1" / "manifest.json").read_text())
        assert f"live {v1['model_version']}" in last  # compared with the model served
        served = live["model_version"]
        metrics_port = int(re.search(r"metrics served url=http://[\d.]+:(\d+)",
                                     worker.log_path.read_text()).group(1))  # type: ignore[union-attr]
        wait_until(lambda: sample(scrape(metrics_port), "promo_encoder_model_info",
                                  path=str(Path("models") / "current"),
                                  version=served) == 1,
                   timeout=60, what=f"the worker to serve {served} (models/current)")
    finally:
        if worker is not None:
            assert worker.stop() == 0, worker.log_tail()
