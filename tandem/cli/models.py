"""`tandem models fetch` and `tandem models list`.

Guarantees: every failure the user can act on (no registry, hash mismatch, full disk, unknown
group) becomes `CliError` (one line, exit code 2). Progress goes to stderr; `list` prints its
table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time

from tandem.cli.main import CliError
from tandem.models import registry as models

GROUP_HELP = "pair (target + drafter, the default), smollm2, minilm; repeatable"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("models", help="fetch, convert and list the models")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True

    fetch = sub.add_parser("fetch", help="download, verify and convert models (idempotent)")
    fetch.add_argument("--only", action="append", choices=list(models.MANIFEST), metavar="GROUP",
                       help=GROUP_HELP)
    fetch.set_defaults(func=run_fetch)

    ls = sub.add_parser("list", help="show every known model and whether it is complete")
    ls.add_argument("--fast", "--no-verify", dest="fast", action="store_true",
                    help="check sizes against the completion marker instead of sha256")
    ls.set_defaults(func=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    from tandem.models import fetch as models_fetch

    groups = args.only or list(models.DEFAULT_GROUPS)
    t0 = time.monotonic()
    try:
        with models.progress_logging():
            lines = models_fetch.fetch(groups, manifest=models.MANIFEST)
    except models.ModelsError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.strerror or exc} at {exc.filename}") from None
    print(f"models ready ({', '.join(groups)}) in {time.monotonic() - t0:.1f} s:",
          file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    statuses = models.list_models(deep=not args.fast, manifest=models.MANIFEST)
    width = max(len(s.name) for s in statuses)
    print(f"{'model':<{width}}  {'state':<7}  {'size':>8}  verified  path")
    for s in statuses:
        size = f"{s.size / models.GB:.2f} GB" if s.present else "-"
        verified = "yes" if s.verified.ok else "no"
        state = "present" if s.present else "absent"
        print(f"{s.name:<{width}}  {state:<7}  {size:>8}  {verified:<8}  {s.path}")
        if s.present:
            print(f"{'':<{width}}  ({s.verified.reason})")
    return 0
