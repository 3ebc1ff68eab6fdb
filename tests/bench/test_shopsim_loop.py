"""The closed-loop benchmark's --quick mode (bench/shopsim_loop.py): every policy runs on the
same shop, the figures come from the shop's own ledger, and what must hold whatever the
figures does hold: budgets kept, the holdout never sent anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.slow(seconds=60)
def test_quick_mode_runs_every_policy_on_one_shop_and_keeps_the_rules(tmp_path: Path) -> None:
    _, merged = run_bench("shopsim_loop.py", tmp_path)
    result = json.loads((tmp_path / "shopsim_loop_quick.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"static", "ungated", "learned", "oracle"}
    for name, run in runs.items():
        assert run["over_budget"] == {}, name
        assert run["holdout_users_sent_anything"] == 0, name
        assert run["issued"].get("store-wide", 0.0) <= result["coupon"]["budget"] + 1e-6
        assert run["incremental_conversions"] == run["extra_orders"] - run["skipped_orders"]
    # The oracle knows every user's true response: it must earn more than the hand-set tiers.
    assert runs["oracle"]["incremental_profit"] > runs["static"]["incremental_profit"]
    assert runs["oracle"]["skipped_orders"] == 0  # it never pushes a do-not-disturb user
    # The learning runs retrain on schedule. The product's judges each candidate before it
    # may serve; the ungated run serves every one, and what it then achieved is measured.
    learned, ungated = result["retrains"]["learned"], result["retrains"]["ungated"]
    assert learned and all(step["gain"]["low"] > 0 for step in learned if step["served"])
    served = [step for step in ungated if step["served"]]
    assert len(served) == len(ungated) == 2  # days 4.5 and 7.5 of 8
    assert served[0]["achieved"] is not None  # the second serves half a day: too few rows
    assert merged["shopsim_vs_oracle"] == result["shopsim_vs_oracle"]
    assert merged["shopsim_incremental_per_cost_vs_static"] == \
        result["shopsim_incremental_per_cost_vs_static"]
