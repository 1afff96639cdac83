"""Every option of every `coserve` command that has a default says it in --help (a user
reading `coserve serve --help` could not tell the port, the memory fraction or the batch
limits it would get; `coserve bench --help` hid --seed's default 0)."""

from __future__ import annotations

import argparse

import pytest

from coserve.cli import COMMANDS, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_default_is_in_the_help(command):
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    silent = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
            continue  # positionals, --help, switches
        if action.default is None or action.default is False:
            continue  # no default to state
        shown = formatter._expand_help(action) if action.help else ""
        if "default" not in shown:
            silent.append(f"{action.option_strings[0]} (default {action.default!r})")
    assert not silent, f"coserve {command} --help leaves out: {', '.join(silent)}"


def test_a_zero_default_is_shown():
    help_text = _subparsers()["bench"].format_help()
    assert "workload seed (default: 0)" in " ".join(help_text.split())
