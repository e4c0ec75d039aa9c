"""Every command's help, as a user's terminal shows it: -h, an example, flags shown as flags,
the INI section names it mentions intact; --version and shell completion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import __version__

from .conftest import ROOT, cli_env, run_cli

# one fresh process renders every command's help (a process per command would take ~1.5 s
# each); Click's own runner, so the texts are exactly what the terminal gets
RENDER_ALL = """
import json, typer.main
from typer.testing import CliRunner
from cli.main import app

def walk(command, path):
    yield path
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from walk(sub, path + [name])

runner = CliRunner()
root = typer.main.get_command(app)
out = {}
for path in walk(root, []):
    result = runner.invoke(app, path + ["-h"], prog_name="ringflow", terminal_width=100)
    out[" ".join(path) or "(root)"] = [result.exit_code, result.output]
print(json.dumps(out))
"""

SECTIONS_NAMED = {"config": "[dataset]", "flower": "[monitoring]", "status": "[queue]"}


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str]]:
    result = subprocess.run(
        [sys.executable, "-c", RENDER_ALL],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=cli_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {name: tuple(v) for name, v in json.loads(result.stdout).items()}


def test_every_command_has_help_under_h_with_an_example(helps):
    assert {"run", "status", "workers local", "plot", "export", "check"} <= set(helps)
    for name, (code, text) in helps.items():
        assert code == 0, (name, text)
        assert text.startswith("Usage: ringflow"), (name, text)
        assert "Example: ringflow " in text, f"ringflow {name} -h shows no example"


def test_flags_are_shown_as_flags(helps):
    for name, (_, text) in helps.items():
        assert "<bool>" not in text, (name, text)
    assert "--json " in helps["run"][1]


def test_section_names_in_help_texts_are_shown(helps):
    for name, section in SECTIONS_NAMED.items():
        assert section in helps[name][1], f"ringflow {name} -h lost {section}"


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ringflow {__version__}"


def test_shell_completion_script():
    """The installed `ringflow` command prints a bash completion script to install."""
    ringflow = Path(sys.executable).with_name("ringflow")
    assert ringflow.exists(), f"{ringflow}: not installed (pip install -e .)"
    result = subprocess.run(
        [str(ringflow), "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "_RINGFLOW_COMPLETE" in result.stdout
