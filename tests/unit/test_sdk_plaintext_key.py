"""The SDK never sends an API key in clear text beyond loopback unless told `insecure=True`; the
CLI likewise, with `--insecure`. (No server is contacted: the check runs before any call.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tandem_sdk
from tandem.security import write_secret

KEY = "an-api-key-0123456789"


@pytest.mark.parametrize("address", ["192.0.2.1:7070", "myhost:7070", "dns:///example.internal:7070",
                                     "[2001:db8::1]:7070", "10.0.0.5:7070"])
def test_a_key_in_clear_text_beyond_loopback_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="^api_key: refusing to send it in clear text") as info:
        tandem_sdk.Client(address, api_key=KEY)
    assert KEY not in str(info.value)
    with tandem_sdk.Client(address, api_key=KEY, insecure=True):  # said by name
        pass
    with tandem_sdk.Client(address, api_key=KEY, tls=True):  # over TLS
        pass
    with tandem_sdk.Client(address):  # no key, nothing to leak
        pass


@pytest.mark.parametrize("address", ["127.0.0.1:7070", "localhost:7070", "[::1]:7070", "dns:///localhost:7070",
                                     "127.8.9.10:1", "unix:/tmp/orchestrator.sock"])
def test_loopback_takes_a_key_without_tls(address: str) -> None:
    with tandem_sdk.Client(address, api_key=KEY):
        pass


def test_insecure_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="^insecure: must be True or False"):
        tandem_sdk.Client("127.0.0.1:7070", insecure="yes")  # type: ignore[arg-type]


def test_the_cli_exits_2_naming_its_flags(tmp_path: Path) -> None:
    key_file = write_secret(tmp_path / "api.key", KEY)
    proc = subprocess.run([sys.executable, "-m", "tandem", "generate", "--address", "192.0.2.1:7070",
                           "--api-key-file", str(key_file), "hi"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--api-key-file: refusing to send it in clear text to 192.0.2.1:7070" in proc.stderr
    assert "--ca-cert PATH (or --tls)" in proc.stderr and "--insecure" in proc.stderr
    assert KEY not in proc.stderr + proc.stdout
