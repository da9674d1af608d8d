"""`tandem generate`, `tandem chat` and `tandem docs`: the orchestrator's client commands.

Guarantees: every command talks to a running orchestrator through `tandem_sdk` at the address
`resolve_address` picks (flag, then TANDEM_ADDRESS, then the stack file `tandem up` writes,
then 127.0.0.1:7070). Answers stream to stdout as they arrive; statistics and notices go to
stderr. `docs list` fetches the documents page by page, so it works whatever the store holds
(a title stored longer than the server's limit shows cut, ending in "…"). An unreachable
orchestrator, a request the server rejects (INVALID_ARGUMENT), an unknown document, an
unreadable file, text that is not UTF-8 (an argument, a file name or stdin) or a number the wire
cannot hold is one line on stderr and exit code 2, never a traceback; a bad argument is named by
its flag. A closed stdout cancels the answer (see `tandem.cli.main`).

Security: `--api-key-file PATH` (mode 0600), else $TANDEM_API_KEY, gives the orchestrator's API
key; there is no flag taking the key itself (`ps` would show it). `--ca-cert PATH` (implies
`--tls`) or `--tls` (the system's CAs) use TLS. When the address comes from the stack record of
a secure `tandem up`, its CA and API-key file are used unless given here. A missing or refused key, an unsafe key file or
an unreadable certificate is one line on stderr and exit code 2; no line holds the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tandem.cli.main import CliError
from tandem.config import refuse_secret_flag

if TYPE_CHECKING:
    from tandem_sdk import Client, Generation, Stats

DEFAULT_ADDRESS = "127.0.0.1:7070"
API_KEY_ENV = "TANDEM_API_KEY"  # the orchestrator's API key itself (or --api-key-file)
ROUTES = ("auto", "local", "speculative", "cloud")
# The SDK's argument names (the start of its ValueError messages) -> what this CLI calls them.
_FLAGS = {
    "address": "--address", "prompt": "PROMPT", "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
    "deadline_s": "--deadline-s", "category": "--category", "title": "--title", "api_key": "--api-key-file",
}


def resolve_address(flag: str | None) -> str:
    """The orchestrator's "host:port": `flag`, else $TANDEM_ADDRESS, else the
    "orchestrator_grpc" entry of $TANDEM_HOME/run/stack.json, else 127.0.0.1:7070."""
    return _resolve(flag)[0]


def _resolve(flag: str | None) -> tuple[str, dict[str, Any]]:
    """(address, the stack record when the address came from it, else {})."""
    if flag and flag.strip():
        return flag.strip(), {}
    env = os.environ.get("TANDEM_ADDRESS", "").strip()
    if env:
        return env, {}
    from tandem.paths import tandem_home

    stack = tandem_home() / "run" / "stack.json"
    if not stack.is_file():
        return DEFAULT_ADDRESS, {}
    try:
        data = json.loads(stack.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {stack} ({exc}); pass --address HOST:PORT") from None
    if not isinstance(data, dict):
        raise CliError(f"{stack} is not a JSON object; pass --address HOST:PORT")
    value = data.get("orchestrator_grpc")
    if isinstance(value, str) and value.strip():
        return value.strip(), data
    return DEFAULT_ADDRESS, {}


def _stack_security(record: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """(API key file, CA certificate) a secure `tandem up` stack recorded (paths, never keys)."""
    key = (record.get("auth") or {}).get("api_key_file")
    ca = (record.get("tls") or {}).get("ca_cert")
    return (Path(key) if isinstance(key, str) and key else None), (Path(ca) if isinstance(ca, str) and ca else None)


# --- parsers -----------------------------------------------------------------------------------



def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `generate`, `chat` and `docs` (each once, however many times this is called)."""
    adders = {"generate": _add_generate, "chat": _add_chat, "docs": _add_docs}
    for name, adder in adders.items():
        if name not in subparsers.choices:
            adder(subparsers)


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--address", metavar="HOST:PORT",
                        help="the orchestrator (default: $TANDEM_ADDRESS, the `tandem up` stack, "
                             f"else {DEFAULT_ADDRESS})")
    parent.add_argument("--api-key-file", type=Path, metavar="PATH",
                        help=f"file (mode 0600) holding the orchestrator's API key (default: ${API_KEY_ENV})")
    refuse_secret_flag(parent, "--api-key", f"--api-key-file PATH or {API_KEY_ENV}")
    parent.add_argument("--tls", action="store_true",
                        help="use TLS, checking the orchestrator against the system's CAs (see --ca-cert)")
    parent.add_argument("--ca-cert", type=Path, metavar="PATH",
                        help="PEM CA certificate that signed the orchestrator's (implies --tls)")
    parent.add_argument("--insecure", action="store_true",
                        help="send the API key without TLS to an address that is not loopback (INSECURE: it "
                             "crosses the network in clear text)")
    return parent


def _generation_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--route", choices=ROUTES, default="auto", help="default: auto")
    parent.add_argument("--max-new-tokens", type=int, metavar="N")
    parent.add_argument("--temperature", type=float, metavar="T", help="0 (default) is greedy")
    parent.add_argument("--top-k", type=int, metavar="K")
    parent.add_argument("--top-p", type=float, metavar="P")
    parent.add_argument("--seed", type=int, metavar="S")
    parent.add_argument("--deadline-s", type=float, metavar="S", help="bound on the whole answer")
    parent.add_argument("--personal", action="store_true", help="use your documents as context")
    parent.add_argument("--privacy", choices=("strict", "cloud_quality"), default="strict",
                        help="strict: private context keeps the request on the device (default)")
    parent.add_argument("--category", default="", help="acceptance is tracked per category")
    parent.add_argument("--stats", action="store_true", help="print route and statistics to stderr")
    return parent


def _add_generate(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("generate", parents=[_common(), _generation_options()],
                              help="stream one answer from the orchestrator")
    p.add_argument("prompt", metavar="PROMPT", help='the prompt ("-" reads it from stdin)')
    p.add_argument("--json", action="store_true", help="print one JSON object: text, started, stats")
    p.set_defaults(func=run_generate)


def _add_chat(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("chat", parents=[_common(), _generation_options()],
                              help="interactive chat; /reset clears the history, /exit ends")
    p.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    p.set_defaults(func=run_chat)


def _add_docs(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    docs = subparsers.add_parser("docs", help="personal documents stored on the device")
    sub = docs.add_subparsers(dest="docs_command", metavar="ACTION")
    sub.required = True
    add = sub.add_parser("add", parents=[_common()], help="add text files as documents (adding the same file "
                         "again returns the stored document; a large one may take minutes to embed)")
    add.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    label = add.add_mutually_exclusive_group()
    label.add_argument("--private", dest="privacy", action="store_const", const="private",
                       help="never leaves the device (default)")
    label.add_argument("--shareable", dest="privacy", action="store_const", const="shareable",
                       help="may be sent to the cloud inside a prompt")
    add.add_argument("--kind", choices=("document", "note", "profile"), default="document")
    add.add_argument("--title", help="the title (one PATH only; default: the file name)")
    add.set_defaults(func=run_docs_add, privacy="private")
    ls = sub.add_parser("list", parents=[_common()], help="list the stored documents")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    ls.set_defaults(func=run_docs_list)
    rm = sub.add_parser("rm", parents=[_common()], help="delete a document")
    rm.add_argument("id", metavar="ID")
    rm.set_defaults(func=run_docs_rm)
    priv = sub.add_parser("privacy", parents=[_common()], help="relabel a document")
    priv.add_argument("id", metavar="ID")
    priv.add_argument("privacy", choices=("private", "shareable"))
    priv.set_defaults(func=run_docs_privacy)


# --- talking to the orchestrator ---------------------------------------------------------------


@contextmanager
def _client(args: argparse.Namespace, timeout_s: float | None = None) -> Iterator[Client]:
    """A connected SDK client (each call's deadline `timeout_s`, else the SDK's); SDK errors become
    one-line `CliError`s naming the address."""
    from tandem.security import SecurityError, read_secret
    from tandem_sdk import AuthenticationError, Client, InvalidArgument, TandemError, Unavailable

    address, record = _resolve(args.address)
    stack_key, stack_ca = _stack_security(record)  # the `tandem up` stack's, unless given here
    key_file = getattr(args, "api_key_file", None)
    if key_file is None and not os.environ.get(API_KEY_ENV, "").strip():
        key_file = stack_key
    try:
        key = read_secret(file=key_file, env=API_KEY_ENV, what="api key")
    except SecurityError as exc:
        raise CliError(str(exc)) from None
    tls, ca_cert = bool(getattr(args, "tls", False)), getattr(args, "ca_cert", None) or stack_ca
    try:
        deadline = {} if timeout_s is None else {"timeout_s": timeout_s}
        with Client(address, api_key=key, tls=tls, ca_cert=ca_cert, insecure=bool(getattr(args, "insecure", False)),
                    **deadline) as client:
            yield client
    except Unavailable as exc:
        hint = "" if tls or ca_cert else "; if it serves TLS, pass --ca-cert PATH or --tls"
        raise CliError(f"the orchestrator at {address} is unavailable ({exc.details}); "
                       f"is it running? start it with `tandem up` or pass --address{hint}") from None
    except AuthenticationError as exc:
        how = "check the key" if key else f"pass --api-key-file PATH or set {API_KEY_ENV}"
        raise CliError(f"the orchestrator at {address} refused the request ({exc.details}); {how}") from None
    except InvalidArgument as exc:
        raise CliError(exc.details) from None
    except TandemError as exc:
        raise CliError(f"{exc} (orchestrator at {address})") from None
    except ValueError as exc:  # the SDK's own argument checks
        raise CliError(_flag_message(str(exc))) from None


def _flag_message(message: str) -> str:
    """An SDK message "name: why" with the name replaced by the CLI's flag for it."""
    name, sep, why = message.partition(": ")
    for sdk, flag in (("ca_cert (or tls=True)", "--ca-cert PATH (or --tls)"), ("insecure=True", "--insecure")):
        why = why.replace(sdk, flag)
    return f"{_FLAGS[name]}: {why}" if sep and name in _FLAGS else message


def utf8(what: str, value: str) -> str:
    """`value` (an argument, decoded as Python decodes argv) if it is valid UTF-8, else CliError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CliError(f"{what}: not valid UTF-8 text") from None
    return value


def _decode_stdin(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"stdin: not valid UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK's generate() arguments; CliError for a 0 the wire would read as "none"."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens} (leave it out for the default)")
    if args.deadline_s is not None and not args.deadline_s > 0:
        raise CliError(f"--deadline-s: must be > 0, got {args.deadline_s} (leave it out for no deadline)")
    return {
        "route": args.route, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "deadline_s": args.deadline_s,
        "privacy": args.privacy, "use_personal_context": args.personal, "category": args.category,
    }


def _stream(gen: Generation, out: TextIO) -> None:
    """Write each delta as it arrives; end the line even when the stream fails. When `out`
    fails (a closed pipe) the answer is cancelled and the error raised, with nothing more written."""
    try:
        for delta in gen:
            try:
                out.write(delta.text)
                out.flush()
            except OSError:
                gen.cancel()
                raise
    except OSError:
        raise  # `out` failed: no line to end there
    except BaseException:
        _end_line(gen, out)
        raise
    _end_line(gen, out)


def _end_line(gen: Generation, out: TextIO) -> None:
    if gen.text and not gen.text.endswith("\n"):
        out.write("\n")
        out.flush()


def stats_lines(gen: Generation) -> list[str]:
    """The `--stats` report: the route and why, then one line of figures."""
    lines = []
    route = gen.stats or gen.started
    if route is not None:
        lines.append(f"route: {route.route} ({route.reason})" if route.reason else f"route: {route.route}")
    if gen.stats is not None:
        lines.append("stats: " + _figures(gen.stats))
    return lines


def _figures(s: Stats) -> str:
    parts = [
        f"{s.generated_tokens} tokens" + (f" ({s.finish_reason})" if s.finish_reason else ""),
        f"ttft {s.ttft_ms:.0f} ms",
        f"{s.tokens_per_s:.1f} tok/s",
        f"acceptance {s.acceptance_rate:.2f}",
        f"verified {s.verified_tokens} / local {s.local_tokens}",
    ]
    if s.citations:
        parts.append(f"{len(s.citations)} citations")
    if s.private_chunks_dropped:
        parts.append(f"{s.private_chunks_dropped} private chunks dropped")
    for sw in s.switches:
        parts.append(f"switch {sw.from_route}->{sw.to_route} at token {sw.at_token} ({sw.reason})")
    return ", ".join(parts)


def _as_json(value: object) -> object:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


# --- commands ----------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    if args.prompt == "-":  # newlines translated as text-mode stdin would
        prompt = _decode_stdin(sys.stdin.buffer.read()).replace("\r\n", "\n").replace("\r", "\n")
    else:
        prompt = utf8("PROMPT", args.prompt)
    utf8("--category", args.category)
    kwargs = _generate_kwargs(args)
    with _client(args) as client:
        gen = client.generate(prompt, **kwargs)
        if args.json:
            result = gen.result()
            doc = {"text": result.text, "started": _as_json(result.started), "stats": _as_json(result.stats)}
            print(json.dumps(doc, ensure_ascii=False))
        else:
            _stream(gen, sys.stdout)
    if args.stats:
        for line in stats_lines(gen):
            print(line, file=sys.stderr)
    return 0


def _read_lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        for raw in sys.stdin.buffer:
            yield _decode_stdin(raw).rstrip("\r\n")
        return
    while True:
        try:
            yield utf8("stdin", input("> "))
        except UnicodeDecodeError:
            raise CliError("stdin: not valid UTF-8 text") from None
        except EOFError:
            print(file=sys.stderr)
            return


def run_chat(args: argparse.Namespace) -> int:
    for what, value in (("--system", args.system or ""), ("--category", args.category)):
        utf8(what, value)
    kwargs = _generate_kwargs(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    with _client(args) as client:
        for line in _read_lines(sys.stdin.isatty()):
            command = line.strip()
            if not command:
                continue
            if command == "/exit":
                break
            if command == "/reset":
                history = list(opening)
                print("(history cleared)", file=sys.stderr)
                continue
            messages = [*history, {"role": "user", "content": line}]
            gen = client.generate(messages=messages, **kwargs)
            _stream(gen, sys.stdout)
            history = [*messages, {"role": "assistant", "content": gen.text}]
            if args.stats:
                for stat in stats_lines(gen):
                    print(stat, file=sys.stderr)
    return 0


def _read_document(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None


def _doc_line(doc: Any) -> str:
    return f"{doc.id}\t{doc.privacy}\t{doc.kind}\t{doc.chunks} chunks\t{doc.title}"


def run_docs_add(args: argparse.Namespace) -> int:
    if args.title is not None and len(args.paths) > 1:
        raise CliError("--title needs exactly one PATH")
    utf8("--title", args.title or "")
    for path in args.paths:
        utf8(f"the path {path}", str(path))
    texts = [(path, _read_document(path)) for path in args.paths]  # every file before any call
    with _client(args, timeout_s=DOCS_ADD_TIMEOUT_S) as client:
        for path, text in texts:
            title, source = args.title or path.name, str(path.resolve())
            doc = client.add_document(text, title=title, kind=args.kind, privacy=args.privacy, source=source,
                                      idempotency_key=_document_key(title, text, args.kind, args.privacy, source))
            print(_doc_line(doc))
    return 0


# Embedding a document of the largest size (2 MB, ~3000 chunks) takes minutes on a slow device.
DOCS_ADD_TIMEOUT_S = 900.0


def _document_key(*fields: str) -> str:
    """The idempotency key of one document as the CLI adds it: the same file added again (a retry
    after a timeout, say) returns the stored document instead of storing a second copy."""
    import hashlib

    digest = hashlib.sha256("\x00".join(fields).encode("utf-8")).hexdigest()
    return f"cli-{digest[:60]}"


def run_docs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        docs = client.list_documents()  # page by page: no reply grows past gRPC's message limit
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in docs], ensure_ascii=False))
        return 0
    if not docs:
        print("no documents", file=sys.stderr)
        return 0
    width = max(len(d.id) for d in docs)
    print(f"{'id':<{width}}  {'privacy':<9}  {'kind':<8}  {'chunks':>6}  {'bytes':>8}  title")
    for d in docs:
        title = f"{d.title}…" if d.truncated else d.title  # stored longer than the server's limit
        print(f"{d.id:<{width}}  {d.privacy:<9}  {d.kind:<8}  {d.chunks:>6}  {d.bytes:>8}  {title}")
    return 0


def run_docs_rm(args: argparse.Namespace) -> int:
    from tandem_sdk import NotFound

    with _client(args) as client:
        try:
            deleted = client.delete_document(args.id)
        except NotFound:
            deleted = False
    if not deleted:
        raise CliError(f"no document with id {args.id!r}")
    print(f"deleted {args.id}")
    return 0


def run_docs_privacy(args: argparse.Namespace) -> int:
    from tandem_sdk import NotFound

    with _client(args) as client:
        try:
            doc = client.set_document_privacy(args.id, args.privacy)
        except NotFound:
            raise CliError(f"no document with id {args.id!r}") from None
    print(_doc_line(doc))
    return 0
