"""What the encoder benchmarks share: machine facts, the matmul peak, result files.

Importing this module before torch sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
says otherwise. On these 2-core machines, shared with Kafka and test runs, torch's default
(OpenMP threads spin while they wait) made a training epoch 17x slower whenever another process
held a core (190 s instead of 11 s); passive waiting costs about 5% when the machine is idle.
"""

from __future__ import annotations

import os

if not os.environ.get("OMP_WAIT_POLICY"):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    import numpy
    import torch

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": numpy.__version__,
        "load_average": os.getloadavg(), "git": git_commit(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """fp32 FLOP/s of an n x n matmul: every sample, and the best (the peak we compare to)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        samples.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {"n": n, "seconds": samples, "flops_per_second": flops / min(samples),
            "median_flops_per_second": flops / sorted(samples)[len(samples) // 2]}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(payload, indent=1) + "\n")


def merge_summary(path: Path, **headlines: float | None) -> None:
    """Update our keys in summary.json, keeping everyone else's (re-read just before writing)."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(headlines)
    _atomic_write(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_output_options(parser: argparse.ArgumentParser,
                       summary_default: str = "OUT_DIR/summary.json; quick: none") -> None:
    """--out-dir and --summary, as every benchmark takes them."""
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--summary", type=Path, default=None,
                        help=f"summary.json to merge into [{summary_default}]")


def summary_path(args: argparse.Namespace) -> Path | None:
    """Where headline ratios are merged: --summary, else OUT_DIR/summary.json, none in --quick."""
    path: Path | None = args.summary or (None if args.quick else args.out_dir / "summary.json")
    return path
