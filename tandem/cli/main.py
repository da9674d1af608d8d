"""The `tandem` command line.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and is imported only
when registered, so `tandem --help` stays fast. Usage errors exit with code 2 and a message,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
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
