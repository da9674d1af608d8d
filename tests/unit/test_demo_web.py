"""`tandem demo --web`'s console step without the stack: the URL it prints and opens, the key kept out
of the browser's command line, Ctrl-C as the normal end, and a process that dies ends it."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tandem.cli.demo import serve_console
from tandem.cli.main import CliError
from tandem.ops.local_stack import StackSecrets, console_url
from tandem.security import write_secret

KEY = "k3y-for-the-demo"


@dataclass
class FakeProc:
    polls_before_ctrl_c: int = 1
    exit_code: int | None = None  # None: running until Ctrl-C
    polls: int = 0
    returncode: int | None = None

    def poll(self) -> int | None:
        self.polls += 1
        if self.exit_code is not None:
            self.returncode = self.exit_code
            return self.exit_code
        if self.polls > self.polls_before_ctrl_c:
            raise KeyboardInterrupt
        return None


@dataclass
class FakeChild:
    proc: FakeProc
    fields: dict[str, str] = field(default_factory=dict)
    log_path: Path = Path("/tmp/orchestrator.log")


def _secrets(folder: Path) -> StackSecrets:
    key = write_secret(folder / "api.key", KEY + "\n")
    return StackSecrets(folder, folder / "ca.pem", folder / "s.pem", folder / "s.key", folder / "t.json",
                        folder / "e.token", folder / "e.key", key)


def test_console_url() -> None:
    assert console_url("127.0.0.1:7080", secure=False) == "http://127.0.0.1:7080/"
    assert console_url("127.0.0.1:7080", secure=True, api_key="abc") == "https://127.0.0.1:7080/#key=abc"


def test_insecure_stack_prints_and_opens_the_plain_url(capsys: pytest.CaptureFixture[str]) -> None:
    opened: list[str] = []
    children: dict[str, Any] = {"orchestrator": FakeChild(FakeProc(), {"http": "127.0.0.1:7080"})}
    serve_console(children, None, opener=opened.append, poll_s=0)
    out = capsys.readouterr()
    assert "web console: http://127.0.0.1:7080/\n" in out.out and opened == ["http://127.0.0.1:7080/"]
    assert "Ctrl-C: stopping every process" in out.err


def test_secure_stack_puts_the_key_in_the_fragment_and_the_browser_gets_a_private_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opened: list[str] = []
    children: dict[str, Any] = {"orchestrator": FakeChild(FakeProc(), {"http": "127.0.0.1:7443"})}
    serve_console(children, _secrets(tmp_path), opener=opened.append, poll_s=0)
    assert f"web console: https://127.0.0.1:7443/#key={KEY}" in capsys.readouterr().out
    (uri,) = opened
    assert uri.startswith("file://") and KEY not in uri
    page = tmp_path / "console.html"
    assert f"https://127.0.0.1:7443/#key={KEY}" in page.read_text()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600


def test_a_browser_that_fails_to_open_is_harmless(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(url: str) -> None:
        raise OSError("no browser here")

    children: dict[str, Any] = {"orchestrator": FakeChild(FakeProc(), {"http": "127.0.0.1:1"})}
    serve_console(children, None, opener=broken, poll_s=0)
    assert "could not open a browser" in capsys.readouterr().err


def test_a_process_that_ends_stops_the_console() -> None:
    children: dict[str, Any] = {"orchestrator": FakeChild(FakeProc(), {"http": "127.0.0.1:1"}),
                                "edge": FakeChild(FakeProc(exit_code=3))}
    with pytest.raises(CliError, match="edge process ended .exit code 3"):
        serve_console(children, None, opener=lambda url: None, poll_s=0)


def test_web_and_in_process_do_not_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.cli import demo
    from tandem.cli.main import build_parser
    from tandem.models import registry

    monkeypatch.setattr(registry, "require_pair", lambda: None)
    args = build_parser().parse_args(["demo", "--web", "--in-process"])
    with pytest.raises(CliError, match="--web needs the processes"):
        demo.run(args)
