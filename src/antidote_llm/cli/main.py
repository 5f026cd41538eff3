"""The `antidote` command: its subcommands come from the modules of this `cli` package named in COMMAND_MODULES,
each registering its own."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from pydantic import ValidationError

from antidote_llm.errors import AntidoteError, validation_message
from antidote_llm.runtime.version import __version__

# Each module defines register(subparsers), which adds its subcommands with a `func` default.
COMMAND_MODULES = ("realign", "guard", "evaluate", "stages", "lab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antidote",
        description="Post-fine-tuning safety re-alignment of language models (Antidote, arXiv 2408.09600).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def _hide_library_progress_bars() -> None:
    """--quiet / --no-progress also hide transformers' own bars (loading and writing weights)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


# Commands that keep their finished stages (cached and resumable); every other command writes atomically.
RESUMABLE_COMMANDS = ("lab", "demo")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _termination_as_interrupt():
    """SIGTERM (kill, a scheduler's stop) ends a command as Ctrl-C does: the stage jobs it started are stopped,
    its locks released and its temporary outputs removed, instead of the process vanishing mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    with _termination_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "quiet", False) or getattr(args, "no_progress", False):
            _hide_library_progress_bars()
        return args.func(args) or 0
    except AntidoteError as exc:
        print(f"antidote: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"antidote: error: {validation_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # outputs are written to a hidden folder and renamed at the end: an interrupted command leaves none
        if args is not None and args.command in RESUMABLE_COMMANDS:
            print("antidote: interrupted; finished stages are kept, run the same command again to resume", file=sys.stderr)
        else:
            print("antidote: interrupted, nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
