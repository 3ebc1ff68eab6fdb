"""The `promo` command line: every command documents itself."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from stream.cli import main


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


@pytest.mark.parametrize("path", all_commands(main), ids=" ".join)
def test_every_subcommand_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = main
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    assert command.help, f"promo {' '.join(path)} has no help text"


def test_the_expected_commands_exist() -> None:
    names = {" ".join(p) for p in all_commands(main)}
    assert {"broker start", "broker stop", "broker status", "replay", "worker", "demo", "train",
            "evaluate", "config", "report", "report uplift", "shop-sim", "offers",
            "train-uplift"} <= names


def test_config_prints_effective_settings() -> None:
    result = CliRunner().invoke(main, ["config"], env={"PROMO_KAFKA_PARTITIONS": "6"})
    assert result.exit_code == 0
    assert "partitions = 6" in result.output


def test_the_command_line_loads_without_torch() -> None:
    """Only commands that run a model pay for torch; `promo --help` or `promo broker status`
    must not (it used to cost seconds before anything happened)."""
    import subprocess
    import sys

    probe = ("import sys, stream.cli; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["train", "--out", "unused"], ["replay"], ["simulate"]])
def test_every_command_finds_named_datasets_where_the_settings_say(
        command: list[str], tmp_path: Path) -> None:
    where = tmp_path / "my-datasets"
    where.mkdir()
    result = CliRunner().invoke(main, [*command, "--dataset", "games"],
                                env={"PROMO_REPLAY_DATASETS_DIR": str(where)})
    assert result.exit_code != 0
    assert str(where) in result.output, result.output


def test_shop_sim_offline_rehearses_a_campaign_file_with_no_broker(tmp_path: Path) -> None:
    campaigns = tmp_path / "campaigns.json"
    campaigns.write_text('[{"coupon_id": "five-off", "value": 5, "budget": 100000}]')
    out = tmp_path / "truth.json"
    result = CliRunner().invoke(main, [
        "shop-sim", "--offline", "--users", "150", "--days", "4", "--coupons", str(campaigns),
        "--coupon-uplift", "0.9", "--out", str(out), "--no-progress"],
        env={"PROMO_POLICY_COUPON_MIN_INTERVAL_SECONDS": "0",
             "PROMO_POLICY_COUPON_DAILY_CAP": "1000", "PROMO_POLICY_QUIET_END_HOUR": "0",
             "PROMO_POLICY_QUIET_START_HOUR": "0"})
    assert result.exit_code == 0, result.output
    import json

    truth = json.loads(out.read_text())
    assert "live" not in truth and truth["coupons"] == ["five-off"]
    row = truth["truth"]["campaigns"]["five-off"]
    assert row["treatment"]["decisions"] > 0 and row["true_lift"] > 0
    assert "five-off" in result.output and "true lift" in result.output


def test_offers_says_what_is_missing_in_one_line() -> None:
    no_token = CliRunner().invoke(main, ["offers", "u-1"], env={"PROMO_API_TOKEN": ""})
    assert no_token.exit_code == 1 and "no API token" in no_token.output
    nobody = CliRunner().invoke(main, ["offers", "u-1", "--url", "http://127.0.0.1:9",
                                       "--token", "t"])
    assert nobody.exit_code == 1 and "cannot reach http://127.0.0.1:9" in nobody.output


def test_config_masks_api_tokens() -> None:
    result = CliRunner().invoke(main, ["config"], env={"PROMO_API_TOKENS": "s3cret,other"})
    assert result.exit_code == 0
    assert "s3cret" not in result.output and 'tokens = ["***", "***"]' in result.output
