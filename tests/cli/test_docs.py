"""Every command is documented: help with a summary and an Example block, and a README section."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
COMMANDS = sorted(cli.commands)


def test_the_expected_commands_exist():
    assert COMMANDS == ["cancel", "demo", "logs", "plan", "resubmit", "run-cell", "status", "submit"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_summary_and_example(command):
    result = CliRunner().invoke(cli, [command, "-h"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {command}" in result.output or f"Usage: bakery-slurm {command}" in result.output
    assert "Example:" in result.output
    assert f"bakery-slurm {command}" in result.output.split("Example:")[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command):
    for param in cli.commands[command].params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.help, f"{command} {param.opts} has no help text"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_has_a_section(command):
    assert f"\n### {command}\n" in README
