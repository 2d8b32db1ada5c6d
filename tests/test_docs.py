"""The commands page and the CLI say the same: every flag in a command's --help is on
docs/commands.md under `## fmnist COMMAND`, and every flag the page gives a command exists.

    python -m pytest tests/test_docs.py
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fmnist.cli import build_parser

PAGE = Path(__file__).resolve().parents[1] / "docs" / "commands.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
CODE_BLOCK = re.compile(r"^```(\w*)\n.*?^```$", flags=re.MULTILINE | re.DOTALL)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Each `fmnist` subcommand's parser, by name."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def help_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings its --help lists, but -h/--help itself."""
    return {s for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            for s in a.option_strings}


def without_output(text: str) -> str:
    """The page without its code blocks that have no language: what a command prints."""
    return CODE_BLOCK.sub(lambda block: block[0] if block[1] else "", text)


def page_sections(text: str) -> dict[str, str]:
    """The text under each `## fmnist COMMAND` heading of the page, up to the next heading of
    that level, without the commands' printed output (`fmnist presets` prints train's flags)."""
    parts = re.split(r"^## fmnist (\S+)\s*$", without_output(text), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


COMMANDS = subcommands()
SECTIONS = page_sections(PAGE.read_text())


def test_every_command_has_a_section_and_every_section_a_command():
    assert sorted(SECTIONS) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_of_the_help_is_on_the_page(command):
    missing = help_flags(COMMANDS[command]) - set(FLAG.findall(SECTIONS.get(command, "")))
    assert not missing, f"docs/commands.md, `fmnist {command}`: add {sorted(missing)}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_on_the_page_exists(command):
    unknown = set(FLAG.findall(SECTIONS.get(command, ""))) - help_flags(COMMANDS[command])
    assert not unknown, f"docs/commands.md, `fmnist {command}`: no such flag {sorted(unknown)}"


def test_the_check_sees_a_missing_and_an_unknown_flag():
    section = SECTIONS["predict"].replace("--top-k", "--top-n")
    found = set(FLAG.findall(section))
    assert "--top-k" in help_flags(COMMANDS["predict"]) - found
    assert "--top-n" in found - help_flags(COMMANDS["predict"])
