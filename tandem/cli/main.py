"""The `tandem` command line.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and is imported only
when registered, so `tandem --help` stays fast. Usage errors exit with code 2 and a message,
never a traceback.

A closed stdout (`tandem generate ... | head -c 3`) ends any command quietly with exit code 141
(128 + SIGPIPE, what a shell shows for a process that SIGPIPE stopped): the command's answer is
cancelled as its client closes, and stdout then points at os.devnull so that the interpreter's
last flush cannot fail again (the recipe of Python's `signal` documentation).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from tandem.config import ConfigError

# subcommand name -> module that defines add_parser(subparsers)
_SUBCOMMANDS = {
    "models": "tandem.cli.models",
    "bench": "tandem.bench.main",
    "demo": "tandem.cli.demo",
    "serve": "tandem.cli.serve",
    "generate": "tandem.cli.client",
    "chat": "tandem.cli.client",
    "docs": "tandem.cli.client",
    "up": "tandem.cli.stack",
    "down": "tandem.cli.stack",
    "status": "tandem.cli.stack",
    "tokens": "tandem.cli.tokens",
}
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # stdout closed early, as a shell reports a SIGPIPE death


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in dict.fromkeys(_SUBCOMMANDS.values()):  # each module once, in order
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    try:
        try:
            return _run(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at os.devnull: what is still buffered goes nowhere."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real file (None, or a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError) as exc:
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tandem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
