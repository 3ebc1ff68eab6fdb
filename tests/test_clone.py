"""A plain clone is enough: the demo runs from a clone whose parent holds no `shared/` folder
and with no datasets directory configured; its data comes with the project's install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_checkpoint

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(seconds=30)
def test_the_demo_runs_from_a_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    clone = tmp_path / "promo-stream"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (tmp_path / "shared").exists() and not (clone / "datasets").exists()
    # Shortened: a small model is placed where the demo looks for one, so the run replays and
    # decides instead of training for minutes (training is tested on its own).
    build_checkpoint(clone / ".promo" / "models" / "instacart-demo")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROMO_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(clone)  # the clone's code, with this machine's installed packages
    done = subprocess.run([sys.executable, "-m", "stream", "demo", "--limit", "3000"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "decisions by action / arm" in done.stdout
    closed = re.search(r"([\d,]+)  treatment decisions closed, ([\d,]+) converted", done.stdout)
    assert closed and int(closed[1].replace(",", "")) > 0, done.stdout[-3000:]
    assert "windows still open" in done.stdout
    assert re.search(r"pull API http://127\.0\.0\.1:\d+: GET /v1/users/\S+/offers -> "
                     r"(coupon|push|none) ", done.stdout), done.stdout[-2000:]
    assert "consumed" in done.stdout and "rejected" in done.stdout
    assert "Traceback" not in done.stderr
