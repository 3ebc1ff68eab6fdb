"""The `promo` command line: every command documents itself."""

from __future__ import annotations

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
            "evaluate", "config"} <= names


def test_config_prints_effective_settings() -> None:
    result = CliRunner().invoke(main, ["config"], env={"PROMO_KAFKA_PARTITIONS": "6"})
    assert result.exit_code == 0
    assert "partitions = 6" in result.output
