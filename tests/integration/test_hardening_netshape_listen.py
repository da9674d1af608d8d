"""`python -m netshape` listens beyond loopback only when the operator passes `--insecure`: the
shaper has no TLS or credential of its own. A refusal is exit code 2 and one line naming the flag,
before anything listens.

Real `python -m netshape` processes; the one that starts is stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netshape.control import ShaperControl
from netshape.link import parse_address

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.10", "shaper.example.com"])
def test_a_non_loopback_listen_is_refused_with_one_line_naming_the_flag(host: str) -> None:
    port = _free_port()
    argv = [sys.executable, "-m", "netshape", "--listen", f"{host}:{port}", "--upstream", "127.0.0.1:1"]
    try:
        done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"netshape started on {host} without --insecure")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--listen" in lines[0] and host.strip("[]") in lines[0] and "--insecure" in lines[0]
    assert done.stdout == ""  # nothing printed `listen=`: nothing listened


def test_insecure_by_name_lets_it_listen_on_all_interfaces() -> None:
    argv = [sys.executable, "-m", "netshape", "--listen", "0.0.0.0:0", "--upstream", "127.0.0.1:1", "--insecure"]
    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        printed = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(2))
        assert parse_address(printed["listen"])[0] == "0.0.0.0"
        assert ShaperControl(printed["control"]).stats().connections_dropped == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

