"""`cthub`: one command line, a subcommand per stage.

Each stage package owns its subcommands in `<stage>/cli.py`, which exposes
`register(subparsers) -> None`; this module only assembles them. Handlers are set with
`parser.set_defaults(func=handler)` and return an exit code. User errors (`CTHubError`) print one line and
exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import TYPE_CHECKING, TypeAlias

from cthub import __version__
from cthub.errors import CTHubError

if TYPE_CHECKING:
    # What `add_subparsers()` returns has no public name in argparse: each stage's `register(sub: SubParsers)`
    # uses this alias, the project's one reference to the private class.
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

STAGES: tuple[str, ...] = ("ctdata", "hub", "pretrain", "finetune", "export", "serving", "pacs", "quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cthub",
        description="Self-supervised CT encoders: hub, data, pretraining, fine-tuning, export, serving.",
    )
    parser.add_argument("--version", action="version", version=f"ct-ssl-hub {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        try:
            module = importlib.import_module(f"{stage}.cli")
        except ModuleNotFoundError as e:
            if e.name == f"{stage}.cli":
                continue  # stage without a command line yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return int(func(args) or 0)
    except CTHubError as e:
        print(f"cthub: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cthub: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
