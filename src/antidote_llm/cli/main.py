"""The `antidote` command: one subcommand per module in `commands/`, each registering itself."""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError

from antidote_llm.errors import AntidoteError, validation_message

# Each module defines register(subparsers), which adds its subcommands with a `func` default.
COMMAND_MODULES = ("realign", "evaluate", "stages", "lab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antidote",
        description="Post-fine-tuning safety re-alignment of language models (Antidote, arXiv 2408.09600).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except AntidoteError as exc:
        print(f"antidote: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"antidote: error: {validation_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
