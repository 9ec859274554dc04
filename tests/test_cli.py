"""The one command line: every stage registers its subcommands and each answers --help."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cthub.cli import build_parser, main
from cthub.provenance import command_line

EXPECTED = ["data", "hub", "pretrain", "finetune", "study", "cam", "robustness", "export", "serve", "demo"]
EXPECTED += ["pacs", "quickstart"]


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_all_stage_commands_registered() -> None:
    assert set(EXPECTED) <= set(_subcommands())


@pytest.mark.parametrize("cmd", EXPECTED)
def test_each_subcommand_has_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: cthub " + cmd in capsys.readouterr().out


def test_python_dash_m_and_user_error_exit_code() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cthub", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "ct-ssl-hub" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cthub", "hub", "show", "no-such-model-xyz"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "no-such-model-xyz" in bad.stderr and "Traceback" not in bad.stderr


def test_recorded_commands_start_at_the_subcommand_and_write_home_as_tilde() -> None:
    home = str(Path.home())
    argv = ["-v", "study", "--out", f"{home}/runs/a b", "--data", "../shared/x.npz"]
    assert command_line("study", argv=argv) == "cthub study --out ~'/runs/a b' --data ../shared/x.npz"
    parsed = argparse.Namespace(model=f"{home}/m", int8=True, json=False, func=print)
    rebuilt = command_line("export", parsed, argv=[])
    assert rebuilt == "cthub export --int8 --model ~/m"
