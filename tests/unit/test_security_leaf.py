"""`tandem.security`'s pure parts: the bind rule, secrets on disk and bearer tokens (no sockets)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tandem.security import SecurityError, bearer_from, check_bind, is_loopback, read_secret, same_secret, write_secret

SECRET = "s3cr3t-Key_0123456789"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.5", True), ("localhost", True), ("LocalHost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("[::]", False), ("192.168.1.10", False),
    ("10.0.0.1", False), ("tandem.example.com", False), ("localhost.evil.com", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"])
def test_loopback_needs_nothing(host: str) -> None:
    check_bind("node", host, tls=False, credential=False, insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "tandem.example.com"])
@pytest.mark.parametrize("tls, credential, missing", [
    (False, False, ("TLS", "credential")), (True, False, ("credential",)), (False, True, ("TLS",)),
])
def test_non_loopback_needs_tls_and_a_credential(host: str, tls: bool, credential: bool, missing: tuple[str, ...]
                                                 ) -> None:
    with pytest.raises(SecurityError) as info:
        check_bind("node", host, tls=tls, credential=credential, insecure=False)
    message = str(info.value)
    assert message.startswith("node: ") and host in message and "--insecure" in message and "\n" not in message
    for word in missing:
        assert word in message
    if tls:
        assert "TLS" not in message.split("without", 1)[1].split(";")[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "tandem.example.com"])
def test_non_loopback_with_both_or_insecure_is_allowed(host: str) -> None:
    check_bind("node", host, tls=True, credential=True, insecure=False)
    check_bind("node", host, tls=False, credential=False, insecure=True)


def _secret_file(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_read_secret_from_a_private_file_is_stripped(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, f"  {SECRET}\n", 0o600)
    assert read_secret(file=path, what="api key", environ={}) == SECRET
    assert read_secret(file=_secret_file(tmp_path, SECRET, 0o400), what="api key", environ={}) == SECRET
    # a group may read it: a Kubernetes Secret mounted for a non-root container (defaultMode 0440, fsGroup)
    assert read_secret(file=_secret_file(tmp_path, SECRET, 0o440), what="api key", environ={}) == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o620, 0o604, 0o660, 0o666, 0o602])
def test_read_secret_refuses_a_file_others_may_read_or_change(tmp_path: Path, mode: int) -> None:
    path = _secret_file(tmp_path, SECRET, mode)
    with pytest.raises(SecurityError) as info:
        read_secret(file=path, what="api key", environ={})
    message = str(info.value)
    assert message.startswith("api key: ") and str(path) in message and "chmod 600" in message
    assert f"{mode:o}" in message and SECRET not in message


@pytest.mark.parametrize("text", ["", "\n", "   \n\t"])
def test_read_secret_refuses_an_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(SecurityError, match="is empty"):
        read_secret(file=_secret_file(tmp_path, text, 0o600), what="api key", environ={})


def test_read_secret_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="cannot read"):
        read_secret(file=tmp_path / "absent", what="api key", environ={})


def test_read_secret_prefers_the_file_over_the_environment(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "from-file", 0o600)
    environ = {"KEY_VAR": "from-env"}
    assert read_secret(file=path, env="KEY_VAR", what="api key", environ=environ) == "from-file"
    assert read_secret(file=None, env="KEY_VAR", what="api key", environ=environ) == "from-env"
    assert read_secret(file=None, env="KEY_VAR", what="api key", environ={"KEY_VAR": "  spaced \n"}) == "spaced"
    assert read_secret(file=None, env="KEY_VAR", what="api key", environ={"KEY_VAR": "  "}) is None
    assert read_secret(file=None, env="KEY_VAR", what="api key", environ={}) is None
    assert read_secret(file=None, env=None, what="api key", environ=environ) is None


def test_read_secret_with_a_bad_file_never_falls_back_to_the_environment(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, SECRET, 0o644)
    with pytest.raises(SecurityError):
        read_secret(file=path, env="KEY_VAR", what="api key", environ={"KEY_VAR": "from-env"})


def test_write_secret_is_0600_even_with_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = write_secret(tmp_path / "new" / "token", SECRET)
        again = write_secret(path, SECRET + "2")  # replaces an existing file, same mode
    finally:
        os.umask(old)
    assert again == path and path.read_text() == SECRET + "2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert read_secret(file=path, what="token", environ={}) == SECRET + "2"
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temporary file left behind


def test_a_failed_write_secret_leaves_no_temporary_copy(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        write_secret(tmp_path / "token", SECRET)
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # the secret's temporary copy is gone


def test_write_secret_narrows_a_wide_existing_file(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "old", 0o666)
    write_secret(path, SECRET)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_same_secret() -> None:
    assert same_secret(SECRET, SECRET)
    assert not same_secret(SECRET + "x", SECRET)
    assert not same_secret("", SECRET)
    assert not same_secret(None, SECRET)
    assert same_secret("clé-é", "clé-é")  # non-ASCII compares too (hmac needs bytes)


@pytest.mark.parametrize("metadata, token", [
    ((("authorization", f"Bearer {SECRET}"),), SECRET),
    ((("x-other", "1"), ("Authorization", f"Bearer {SECRET} ")), SECRET),
    ((("authorization", f"Bearer {SECRET}".encode()),), SECRET),
    ({"Authorization": f"Bearer {SECRET}"}, SECRET),
    ((("authorization", f"Basic {SECRET}"),), None),
    ((("authorization", SECRET),), None),
    ((("x-other", "1"),), None),
    ((), None),
    (None, None),
])
def test_bearer_from(metadata: object, token: str | None) -> None:
    assert bearer_from(metadata) == token
