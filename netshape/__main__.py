"""`python -m netshape`: run a link shaper as its own process.

Prints `listen=HOST:PORT` and `control=HOST:PORT` (ports resolved) on stdout once both are
listening, then shapes until SIGINT or SIGTERM and exits 0. Bad flags or conditions: a message
and exit code 2. A bind failure: a message and exit code 1.

Both addresses are loopback unless the operator says otherwise: `--control` (no authentication)
is loopback only, always; a non-loopback `--listen` is refused (exit 2, naming the flag) unless
`--insecure` is given. The shaper cannot speak TLS or check a credential itself (it forwards
bytes, which are TLS end to end when the stack is secure), so the house rule for a listener
beyond loopback (TLS and a credential, or `--insecure` by name) reduces to `--insecure` here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from netshape.control import is_loopback
from netshape.link import MODES, Address, LinkConditions, format_address, parse_address
from netshape.shaper import LinkShaper


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m netshape",
                                     description="User-space TCP link shaper.")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                        help="where clients connect (default 127.0.0.1:0)")
    parser.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT",
                        help="the server to forward to")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="added round-trip time")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="one-way delay varies uniformly in [-jitter, +jitter] per piece")
    parser.add_argument("--bandwidth-kbps", type=float, default=0.0,
                        help="per direction, 1 kbps = 1000 bit/s; 0 = unlimited")
    parser.add_argument("--mode", choices=MODES, default="up")
    parser.add_argument("--control", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                        help="loopback address of the HTTP control endpoint (default 127.0.0.1:0)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --listen address: anyone who can reach it may use the link")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter")
    parser.add_argument("--log-level", default="WARNING",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


async def _serve(shaper: LinkShaper) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await shaper.start()
    try:
        control = shaper.control_address
        assert control is not None
        print(f"listen={format_address(shaper.address)}", flush=True)
        print(f"control={format_address(control)}", flush=True)
        await stop.wait()
    finally:
        await shaper.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        conditions = LinkConditions(rtt_ms=args.rtt_ms, jitter_ms=args.jitter_ms,
                                    bandwidth_kbps=args.bandwidth_kbps, mode=args.mode)
    except ValueError as exc:
        parser.error(str(exc))
    # One line each (no usage): these are refusals of a setting, not a misuse of the syntax.
    if not is_loopback(args.control[0]):
        parser.exit(2, f"{parser.prog}: error: --control: must be a loopback address, got {args.control[0]!r}\n")
    if not args.insecure and not is_loopback(args.listen[0]):
        parser.exit(2, f"{parser.prog}: error: --listen: refusing to listen on {args.listen[0]!r}, a non-loopback "
                       "address, without TLS or a credential (the shaper has neither); bind 127.0.0.1, or pass "
                       "--insecure to expose it unprotected\n")
    logging.basicConfig(level=args.log_level, format="netshape %(levelname)s %(message)s")
    shaper = LinkShaper(args.upstream, conditions, listen=args.listen, control=args.control,
                        seed=args.seed)
    try:
        asyncio.run(_serve(shaper))
    except OSError as exc:
        print(f"netshape: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
