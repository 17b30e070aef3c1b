"""Every `moeflow` command line in the README parses with the CLI as it is (flags renamed or
removed in the code, or misspelt in the README, fail here); the main job's command runs in
test_cli.py, the others' behaviour in their own tests."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from moeflow.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The moeflow invocations in the README's shell blocks, continuation lines joined:
    `moeflow ARGS`, `.venv/bin/moeflow ARGS` and `torchrun ... -m moeflow ARGS`."""
    commands, in_fence, in_shell, pending = [], False, False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            in_shell = in_fence and line.strip() in ("```bash", "```sh", "```")
            continue
        if not in_shell:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        for part in line.split("&&"):
            if "moeflow" not in part:
                continue
            words = shlex.split(part, comments=True)
            if "-m" in words and words[words.index("-m") + 1:][:1] == ["moeflow"]:
                words = words[words.index("-m") + 1:]
            if words and Path(words[0]).name == "moeflow":
                commands.append(shlex.join(words[1:]))
    return commands


def test_the_readme_has_commands():
    commands = readme_commands()
    assert len(commands) > 30
    assert "demo" in commands and any(c.startswith("train ") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    parser = build_parser()
    try:
        parser.parse_args(shlex.split(command))
    except SystemExit as e:
        pytest.fail(f"`moeflow {command}` does not parse (exit {e.code})")
