"""What every command's parser shares: `--help` names each default, one range check for numbers."""

from __future__ import annotations

import argparse
import importlib

import pytest

from minigpt4.__main__ import COMMANDS
from minigpt4.commands.common import HelpFormatter, at_least, positive
from minigpt4.curate import STEPS


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """The parser each command builds, caught as it starts parsing `--help` (nothing loads)."""

    def catch(self, args=None, namespace=None):
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    found = {}
    calls = [(name, [name]) for name in COMMANDS] + [(f"curate {s}", ["curate", s]) for s in STEPS]
    calls += [("bench train", ["bench", "train"])]
    for label, argv in calls:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        try:
            module.main([*argv[1:], "--help"])
        except _Built as built:
            found[label] = built.parser
    return found


def _with_subcommands(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _with_subcommands(sub)


def test_every_commands_help_names_its_defaults(monkeypatch):
    parsers = _parsers(monkeypatch)
    assert {"train", "eval", "bench", "caption", "chat", "serve", "make-data", "curate refine"} <= set(
        parsers
    )
    silent = []
    for top in parsers.values():
        for parser in _with_subcommands(top):
            assert issubclass(parser.formatter_class, HelpFormatter), parser.prog
            formatter = parser.formatter_class(parser.prog)
            for action in parser._actions:
                no_default = action.default is None or action.default is False or action.default == []
                if not action.option_strings or no_default or action.default == argparse.SUPPRESS:
                    continue
                if action.help == argparse.SUPPRESS:
                    continue
                if action.help is None or "default" not in formatter._get_help_string(action).lower():
                    silent.append(f"{parser.prog} {action.option_strings[0]}")
    assert not silent, "options whose --help does not say their default:\n" + "\n".join(silent)


def test_ranges_are_checked_by_one_type_with_one_message():
    assert at_least(1)("3") == 3 and positive(float)("0.5") == 0.5
    for check, text, said in ((at_least(1), "0", "must be ≥ 1, got 0"), (positive(float), "0", "must be > 0"),
                              (at_least(2), "x", "expected a int, got 'x'")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            check(text)
