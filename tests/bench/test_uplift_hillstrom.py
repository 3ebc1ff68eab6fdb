"""The Hillstrom uplift benchmark's --quick mode on a synthetic CSV of the same shape (the real
one lives in ../shared, which the suite must not need): where the e-mails' effects differ
between customers, our model ranks and targets better than chance and than one e-mail for all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support import run_bench

HEADER = ("recency,history_segment,history,mens,womens,zip_code,newbie,channel,segment,visit,"
          "conversion,spend")


def hillstrom_like(path: Path, n: int = 6_000, seed: int = 0) -> Path:
    """Women's e-mail works on women's-wear buyers only; men's a little on everyone."""
    rng = np.random.default_rng(seed)
    segment = rng.choice(["Mens E-Mail", "Womens E-Mail", "No E-Mail"], size=n)
    womens = rng.integers(0, 2, n)
    recency = rng.integers(1, 13, n)
    base = 0.08 + 0.1 * (recency < 4)
    lift = np.where(segment == "Womens E-Mail", 0.30 * womens, 0.0)
    lift += np.where(segment == "Mens E-Mail", 0.05, 0.0)
    visit = (rng.random(n) < base + lift).astype(int)
    history = rng.lognormal(5, 1, n).round(2)
    lines = [HEADER]
    for i in range(n):
        lines.append(f"{recency[i]},band,{history[i]},{rng.integers(0, 2)},{womens[i]},"
                     f"{rng.choice(['Urban', 'Rural'])},{rng.integers(0, 2)},Web,{segment[i]},"
                     f"{visit[i]},0,0.0")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow(seconds=30)
def test_quick_mode_compares_us_with_the_library_and_targets_on_held_out_data(
        tmp_path: Path) -> None:
    csv = hillstrom_like(tmp_path / "hillstrom.csv")
    _, merged = run_bench("uplift_hillstrom.py", tmp_path, "--csv", str(csv))
    result = json.loads((tmp_path / "uplift_hillstrom_quick.json").read_text())
    assert result["rows"] == 6_000 and result["seeds"] == 1
    womens = result["qini_mean"]["womens"]
    assert {"ours", "TwoModels", "ClassTransformation", "SoloModel", "random"} <= set(womens)
    assert womens["ours"] > womens["random"] + 0.1
    assert merged["uplift_hillstrom_qini_vs_best_library"] == \
        result["uplift_hillstrom_qini_vs_best_library"] > 0.8
    # Women's e-mails to women's-wear buyers beat men's e-mails to anyone by far.
    assert merged["uplift_hillstrom_policy_vs_random"] == \
        result["uplift_hillstrom_policy_vs_random"] > 1.4
