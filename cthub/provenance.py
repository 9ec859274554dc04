"""The command line recorded with every result (model cards, study tables, pretraining reports)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["command_line"]

_NOT_OPTIONS = {"func", "command", "verbose"}


def _quoted(arg: str) -> str:
    """The argument shell-quoted, with this user's home directory written as an unquoted `~` (results are
    shared, homes differ, and the command must still run when pasted)."""
    home = str(Path.home())
    if home != "/" and (arg == home or arg.startswith(home + "/")):
        return "~" + shlex.quote(arg[len(home) :]) if arg != home else "~"
    return shlex.quote(arg)


def command_line(sub: str, args: argparse.Namespace | None = None, argv: list[str] | None = None) -> str:
    """`cthub <sub> ...` as typed (from `sub` on in `argv`, default sys.argv), else rebuilt from the parsed
    options, else just `cthub <sub>`."""
    argv = sys.argv[1:] if argv is None else argv
    if sub in argv:
        return " ".join(["cthub", *map(_quoted, argv[argv.index(sub) :])])
    parts = ["cthub", sub]
    for k, v in sorted(vars(args or argparse.Namespace()).items()):
        if k in _NOT_OPTIONS or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, _quoted(str(v))]
    return " ".join(parts)
