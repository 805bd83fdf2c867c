"""`wavechain --help` speaks to users: every command and option says what it is for."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from service.cli import build_parser


def _parsers(
    parser: argparse.ArgumentParser, path: str = "wavechain"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_command_and_option_has_help() -> None:
    """Each subcommand is listed with a description, each option and argument has help."""
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                listed = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{path} {n}" for n in action.choices if not listed.get(n)]
                continue
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_top_level_help_names_where_to_start_and_no_internal_docstring() -> None:
    """The first screen names the commands to start with, in the user's words."""
    text = build_parser().format_help()
    assert "Start with:" in text
    for command in ("wavechain demo", "wavechain serve", "wavechain run"):
        assert command in text
    assert "``" not in text and "main()" not in text
    for _, parser in _parsers(build_parser()):
        assert "``" not in parser.format_help()


def test_one_name_value_parser_for_inputs_and_faults() -> None:
    """--set and --fault read NAME=VALUE alike: YAML scalars and lists are typed, anything
    else (a colon in a prompt, a mapping) stays the text as typed."""
    from service.cli import _assignment

    assert _assignment("seed=7") == ("seed", 7)
    assert _assignment("flag=true") == ("flag", True)
    assert _assignment("rate=0.5") == ("rate", 0.5)
    assert _assignment("prompt=a red fox: running") == ("prompt", "a red fox: running")
    assert _assignment("prompt={a: 1}") == ("prompt", "{a: 1}")
    assert _assignment("fail_models=[m1, m2]") == ("fail_models", ["m1", "m2"])
    assert _assignment("empty=") == ("empty", "")
    assert _assignment("none=null") == ("none", "null")
    args = build_parser().parse_args(["run", "x.yaml", "--set", "seed=7", "--set", "p=a: b"])
    assert dict(args.set) == {"seed": 7, "p": "a: b"}
    args = build_parser().parse_args(["emulator", "--fault", "drop_rate=1"])
    assert dict(args.fault) == {"drop_rate": 1}
