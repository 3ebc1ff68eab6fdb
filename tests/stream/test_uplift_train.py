"""`promo train-uplift` (stream.uplift_train, stream.cli.uplift) on a CSV it has never seen:
it reads any randomized test, says clearly what is wrong with one it cannot use, and writes a
checkpoint with held-out figures that beat a random ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stream import uplift_model, uplift_train
from stream.cli import main
from stream.uplift_model import CONTROL


def write_test_csv(path: Path, n: int = 4_000, seed: int = 0) -> Path:
    """A randomized test in a shop's own words: arms 'ctrl' / 'ten_off', a yes/no outcome
    column named 'bought', a text feature, a number, and a post-treatment column."""
    rng = np.random.default_rng(seed)
    tier = rng.choice(["gold", "silver", "new"], size=n)
    arm = rng.choice(["ctrl", "ten_off"], size=n)
    base = np.where(tier == "gold", 0.6, 0.1)
    effect = np.where(tier == "silver", 0.35, 0.0)
    bought = (rng.random(n) < base + effect * (arm == "ten_off")).astype(int)
    lines = ["arm,tier,orders,bought,revenue_after"]
    for i in range(n):
        lines.append(f"{arm[i]},{tier[i]},{rng.poisson(4)},{bought[i]},{bought[i] * 30.0}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_randomized_csv_becomes_actions_outcomes_and_features(tmp_path: Path) -> None:
    table = uplift_train.read_csv(write_test_csv(tmp_path / "t.csv", n=50), "arm", "bought",
                                  "ctrl", ignore=("revenue_after",))
    assert set(table.actions.tolist()) == {CONTROL, "ten_off"}
    assert set(table.columns) == {"tier", "orders"}
    assert set(table.converted.tolist()) <= {0, 1}


@pytest.mark.parametrize(("args", "message"), [
    (("nope", "bought", "ctrl", ()), "no column 'nope'"),
    (("arm", "bought", "control", ()), "never has the control value 'control'"),
    (("arm", "orders", "ctrl", ()), "'orders' must be 0 or 1"),
    (("arm", "bought", "ctrl", ("tier", "orders", "revenue_after")), "no feature columns"),
])
def test_a_csv_that_is_not_a_usable_randomized_test_is_refused_with_the_reason(
        tmp_path: Path, args: tuple[str, str, str, tuple[str, ...]], message: str) -> None:
    path = write_test_csv(tmp_path / "t.csv", n=50)
    with pytest.raises(uplift_train.TableError, match=message):
        uplift_train.read_csv(path, *args)


def test_the_split_keeps_every_arm_and_outcome_in_proportion(tmp_path: Path) -> None:
    table = uplift_train.read_csv(write_test_csv(tmp_path / "t.csv"), "arm", "bought", "ctrl")
    train, held_out = uplift_train.split(table, 0.3, seed=0)
    assert len(held_out) == 1_200 and not set(train) & set(held_out)
    for rows in (train, held_out):
        part = uplift_train.subset(table, rows)
        assert np.mean(part.actions == CONTROL) == pytest.approx(
            np.mean(table.actions == CONTROL), abs=0.01)
        assert part.converted.mean() == pytest.approx(table.converted.mean(), abs=0.01)


def test_the_command_writes_a_verified_checkpoint_with_held_out_figures(tmp_path: Path) -> None:
    csv = write_test_csv(tmp_path / "t.csv")
    out = tmp_path / "model"
    args = ["train-uplift", "--csv", str(csv), "--treatment-col", "arm", "--control", "ctrl",
            "--outcome-col", "bought", "--ignore-col", "revenue_after", "--out", str(out),
            "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model = uplift_model.load(out)
    assert f"model_version {model.version} written to {out}" in result.output
    assert "ten_off" in result.output and "uplift@30%" in result.output
    held_out = json.loads((out / "metrics.json").read_text())["held_out"]
    assert held_out["rows"] == 1_200
    assert held_out["qini"]["ten_off"] > held_out["qini_random"]["ten_off"] + 0.05
    assert held_out["average_effect"]["ten_off"] == pytest.approx(0.35 / 3, abs=0.05)
    assert (out / "qini_curves.png").read_bytes()[:4] == b"\x89PNG"
    # Silver members are the ones the coupon changes.
    columns = {"tier": np.asarray(["gold", "silver", "new"]), "orders": np.full(3, 4.0)}
    assert model.uplift(columns)[:, 1].argmax() == 1

    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "pass --overwrite" in again.output
    wrong = CliRunner().invoke(main, [*args, "--overwrite", "--outcome-col", "tier"])
    assert wrong.exit_code != 0 and "'tier' must be 0 or 1" in wrong.output
