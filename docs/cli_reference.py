"""Write docs/cli.md from the CLI's own help: `python docs/cli_reference.py` (a test checks it is current).

Each command's `--help` is rendered by typer at a fixed width without colour, so the page is the same on every
machine and says exactly what `eat COMMAND --help` says.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).with_name("cli.md")


def render() -> str:
    """The whole page: `eat --help`, then every command's help, each in a text block."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from eat.cli import app

    runner = CliRunner()
    env = {"COLUMNS": "110", "TERM": "dumb", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    sections = ["# `eat` command reference", "",
                "Generated from the CLI's own help by `python docs/cli_reference.py`; `tests/test_docs.py` fails when "
                "it is out of date. The guide ([guide.md](guide.md)) explains what the commands decide and why.", ""]
    commands = [None, *sorted(get_command(app).commands)]
    for name in commands:
        args = ["--help"] if name is None else [name, "--help"]
        result = runner.invoke(app, args, env=env, color=False, prog_name="eat")
        if result.exit_code != 0:
            raise RuntimeError(f"eat {' '.join(args)} failed: {result.output}")
        text = "\n".join(line.rstrip() for line in result.output.strip().splitlines())
        sections += ["## `eat`" if name is None else f"## `eat {name}`", "",
                     "```text", text, "```", ""]
    return "\n".join(sections)


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}", file=sys.stderr)
