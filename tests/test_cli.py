"""The command line: every subcommand explains itself, and `rsna19 --help` stays fast (no torch import)."""

import subprocess
import sys

import pytest

from rsna19.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def test_discovery_does_not_import_heavy_libraries():
    code = (
        "import sys, rsna19.cli; rsna19.cli.build_parser(); "
        "print(sorted({'torch', 'timm', 'lightgbm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"building the parser imported {out}: import heavy libraries inside the command's func"


def test_expected_stages_are_there():
    names = set(_subcommands())
    assert {"synth", "index", "convert", "folds", "train", "predict", "stack", "submit", "score", "models"} <= names


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "synth" in capsys.readouterr().out
