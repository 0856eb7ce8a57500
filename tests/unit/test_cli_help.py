"""The command line explains itself: every command and option has help text."""

from __future__ import annotations

import argparse

import pytest

from modelfleet.cli import _parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, node: argparse.ArgumentParser) -> None:
        for action in node._actions:  # argparse's documented way to introspect a parser
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix} {name}".strip()] = sub
                    walk(f"{prefix} {name}", sub)

    walk("", parser)
    found["(top)"] = parser
    return found


COMMANDS = _commands()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help(name: str) -> None:
    parser = COMMANDS[name]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)


@pytest.mark.parametrize("name", sorted(n for n in COMMANDS if n != "(top)"))
def test_every_command_describes_itself_and_the_settings(name: str) -> None:
    text = COMMANDS[name].format_help()
    assert COMMANDS[name].description, name
    for flag in ("--namespace", "--amqp-url", "--json", "--config"):
        assert flag in text, (name, flag)
    assert "MODELFLEET_" in text and "exit codes" in text
