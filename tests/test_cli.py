"""Every `ember` sub-command's --help renders (argparse formats help strings with %, so a stray
percent sign in a config field's help breaks it only when someone asks for help)."""

from __future__ import annotations

import pytest

from ember.cli import build_parser


def _commands(parser) -> list[list[str]]:
    found = [[]]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            found += [[name, *rest] for rest in _commands(sub)]
    return found


@pytest.mark.parametrize("command", _commands(build_parser()), ids=" ".join)
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: ember" in capsys.readouterr().out
