"""The `tandem` CLI, as real processes: a closed stdout, text that is not UTF-8 and numbers the
wire cannot hold end quietly or in one line, never in a traceback.

A closed pipe (`tandem generate ... | head -c 3`) ends the command quietly with exit code 141
(128 + SIGPIPE, what a shell reports for a process that SIGPIPE killed) and cancels the answer.
The fake orchestrator streams deltas until its client goes away and records that it went away.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protos.tandem.v1 import orchestrator_pb2 as pb
from protos.tandem.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.support.orch_server import orchestrator_server

ROOT = Path(__file__).resolve().parents[2]
EXIT_PIPE = 141
NOWHERE = "127.0.0.1:1"  # nothing listens: every check below happens before a call


class EndlessOrchestrator(pb_grpc.OrchestratorServicer):
    """Streams one delta every 10 ms until the client cancels (then sets `cancelled`)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        context.add_callback(self.cancelled.set)  # runs when the call ends; it never ends on its own
        yield pb.GenerateTextResponse(started=pb.GenerationStarted(route="local"))
        for i in range(100_000):
            if not context.is_active():
                return
            yield pb.GenerateTextResponse(delta=pb.TextDelta(text=f"word{i} "))
            time.sleep(0.01)


@dataclass
class Server:
    servicer: EndlessOrchestrator
    address: str


@pytest.fixture()
def endless() -> Iterator[Server]:
    servicer = EndlessOrchestrator()
    with orchestrator_server(servicer) as address:
        yield Server(servicer, address)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_ADDRESS", "PYTHONUNBUFFERED")}
    env["TANDEM_HOME"] = str(home)
    return env


def _argv(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "tandem", *args]


def _closed_stdout(argv: list[str | bytes], home: Path, *, read_first: int = 0) -> tuple[int, str, bytes]:
    """Run `argv` with stdout a pipe that the reader closes after `read_first` bytes."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env=_env(home))
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.read(read_first) if read_first else b""
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err, first


def _run(*args: str | bytes, home: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(_argv(*args), input=stdin, check=False, capture_output=True, timeout=120, cwd=ROOT,
                          env=_env(home))
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr.strip()


# --- a closed stdout ---------------------------------------------------------------------------


def test_generate_into_a_closed_pipe_exits_quietly_and_cancels_the_answer(endless: Server, tmp_path: Path) -> None:
    argv = _argv("generate", "hi", "--address", endless.address, "--stats")
    code, err, first = _closed_stdout(argv, tmp_path, read_first=3)
    assert first == b"wor"
    assert (code, err) == (EXIT_PIPE, "")
    assert endless.servicer.cancelled.wait(10) and endless.servicer.calls == 1


def test_chat_into_a_closed_pipe_exits_quietly(endless: Server, tmp_path: Path) -> None:
    proc = subprocess.Popen(_argv("chat", "--address", endless.address), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=_env(tmp_path))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()
    assert proc.stdout.read(3) == b"wor"
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    proc.stdin.close()
    assert (code, err) == (EXIT_PIPE, "")
    assert endless.servicer.cancelled.wait(10)


@pytest.mark.parametrize("args", [("generate", "--help"), ("tokens", "list")])
def test_other_commands_into_a_closed_pipe_exit_quietly(tmp_path: Path, args: tuple[str, ...]) -> None:
    store = tmp_path / "tokens.json"
    for name in ("phone", "tablet"):
        assert _run("tokens", "--store", str(store), "issue", name, home=tmp_path).returncode == 0
    argv = _argv(*args) if args[0] != "tokens" else _argv("tokens", "--store", str(store), *args[1:])
    code, err, _ = _closed_stdout(argv, tmp_path)
    assert (code, err) == (EXIT_PIPE, "")


def test_control_an_open_pipe_still_gets_everything(tmp_path: Path) -> None:
    done = _run("generate", "--help", home=tmp_path)
    assert done.returncode == 0 and "--deadline-s" in done.stdout


# --- text that is not UTF-8, and numbers the wire cannot hold -----------------------------------


def test_a_prompt_argument_that_is_not_utf8_exits_2_in_one_line(tmp_path: Path) -> None:
    line = _one_line(_run("generate", b"bad\xff", "--address", NOWHERE, home=tmp_path))
    assert "PROMPT" in line and "UTF-8" in line


def test_a_prompt_on_stdin_that_is_not_utf8_exits_2_in_one_line(tmp_path: Path) -> None:
    line = _one_line(_run("generate", "-", "--address", NOWHERE, home=tmp_path, stdin=b"bad\xff\n"))
    assert "stdin" in line and "UTF-8" in line


def test_chat_lines_that_are_not_utf8_exit_2_in_one_line(tmp_path: Path) -> None:
    line = _one_line(_run("chat", "--address", NOWHERE, home=tmp_path, stdin=b"bad\xff\n"))
    assert "stdin" in line and "UTF-8" in line


@pytest.mark.parametrize("flag", ["--category", "--system"])
def test_a_text_flag_that_is_not_utf8_exits_2_naming_it(tmp_path: Path, flag: str) -> None:
    command = ("chat",) if flag == "--system" else ("generate", "hi")
    line = _one_line(_run(*command, flag, b"x\xff", "--address", NOWHERE, home=tmp_path, stdin=b""))
    assert flag in line and "UTF-8" in line


@pytest.mark.parametrize(("flag", "value"), [("--deadline-s", "1e10"), ("--deadline-s", "inf"),
                                             ("--max-new-tokens", "5000000000"), ("--deadline-s", "0"),
                                             ("--max-new-tokens", "0"), ("--deadline-s", "-1")])
def test_a_number_the_wire_cannot_hold_exits_2_naming_the_flag(tmp_path: Path, flag: str, value: str) -> None:
    line = _one_line(_run("generate", "hi", flag, value, "--address", NOWHERE, home=tmp_path))
    assert line.startswith(f"tandem generate: error: {flag}: "), line


def test_a_token_printed_into_a_closed_pipe_is_revoked(tmp_path: Path) -> None:
    store = tmp_path / "tokens.json"
    code, err, _ = _closed_stdout(_argv("tokens", "--store", str(store), "issue", "phone"), tmp_path)
    assert code == EXIT_PIPE and "Traceback" not in err
    assert "stdout closed before the token was shown" in err and "was revoked" in err
    listed = _run("tokens", "--store", str(store), "list", home=tmp_path)
    assert listed.returncode == 0 and "phone" in listed.stdout and " live" not in listed.stdout


def test_docs_add_with_a_file_name_that_is_not_utf8_exits_2_naming_it(tmp_path: Path) -> None:
    path = os.path.join(os.fsencode(tmp_path), b"note\xff.txt")
    with open(path, "wb") as f:
        f.write(b"some text")
    line = _one_line(_run("docs", "add", path, "--address", NOWHERE, home=tmp_path))
    assert "the path" in line and "UTF-8" in line
