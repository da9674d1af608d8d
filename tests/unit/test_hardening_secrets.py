"""`tandem.security` hardening: `write_secret` never writes through a name another user could plant,
`read_secret` refuses a secret that no gRPC or HTTP header could carry, and `bearer_from` takes the
scheme in any case (RFC 7235). Real files in a temporary folder; no fakes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tandem.config import ConfigError
from tandem.security import SecurityError, bearer_from, read_secret, write_secret

SECRET = "s3cr3t-Key_0123456789"


def test_write_secret_does_not_follow_a_symlink_planted_at_the_old_temporary_name(tmp_path: Path) -> None:
    """The old code wrote to `.NAME.PID.tmp` with O_CREAT|O_TRUNC, following a symlink planted there
    (in a shared folder, by another user) and then renaming that symlink over the destination."""
    loot = tmp_path / "attacker-owned"
    loot.write_text("")
    dest = tmp_path / "key"
    (tmp_path / f".key.{os.getpid()}.tmp").symlink_to(loot)
    write_secret(dest, SECRET)
    assert loot.read_text() == ""
    assert not dest.is_symlink() and dest.read_text() == SECRET
    assert stat.S_IMODE(dest.lstat().st_mode) == 0o600


def test_write_secret_does_not_write_through_a_hard_link_planted_at_the_old_temporary_name(tmp_path: Path) -> None:
    loot = tmp_path / "attacker-owned"
    loot.write_text("")
    os.link(loot, tmp_path / f".key.{os.getpid()}.tmp")
    write_secret(tmp_path / "key", SECRET)
    assert loot.read_text() == ""
    assert (tmp_path / "key").read_text() == SECRET


def test_write_secret_replaces_a_symlink_at_the_destination_without_following_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    dest = tmp_path / "key"
    dest.symlink_to(target)
    write_secret(dest, SECRET)
    assert target.read_text() == "untouched"
    assert not dest.is_symlink() and dest.read_text() == SECRET


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_write_secret_under_any_umask_leaves_one_0600_file_and_nothing_else(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        for text in ("first", SECRET):  # a second write replaces the first
            write_secret(tmp_path / "key", text)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert (tmp_path / "key").read_text() == SECRET


def _secret_bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "key"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("data, problem", [
    (f"{SECRET}\nsecond-line\n".encode(), "a line break"),
    (f"{SECRET}\r\nsecond-line".encode(), "a line break"),
    (f"{SECRET}\0tail".encode(), "a NUL character"),
    ("\ufeff".encode() + SECRET.encode(), "a byte order mark"),
    (f"{SECRET}\ttail".encode(), "a control character (U+0009)"),
    (f"{SECRET}\x7ftail".encode(), "a control character (U+007F)"),
    (f"{SECRET}\u00e9tail".encode(), "a non-ASCII character (U+00E9)"),
    (SECRET.encode() + b"\xff\xfe", "is not UTF-8 text"),
])
def test_read_secret_refuses_what_no_header_can_carry_naming_the_file_not_the_secret(
        tmp_path: Path, data: bytes, problem: str) -> None:
    path = _secret_bytes(tmp_path, data)
    with pytest.raises(SecurityError) as info:
        read_secret(file=path, what="api key")
    message = str(info.value)
    assert isinstance(info.value, ConfigError)  # every CLI answers it with one line and exit code 2
    assert message.startswith("api key: ") and str(path) in message and problem in message
    assert SECRET not in message and "second-line" not in message and "tail" not in message
    assert "\n" not in message


@pytest.mark.parametrize("data", [f"{SECRET}\n", f"  {SECRET}  \n", f"{SECRET}\r\n", f"\n{SECRET}\n\n",
                                  "key with inner spaces ~!@#$%^&*()"])
def test_read_secret_allows_surrounding_whitespace_and_printable_ascii(tmp_path: Path, data: str) -> None:
    path = _secret_bytes(tmp_path, data.encode())
    assert read_secret(file=path, what="api key") == data.strip()


def test_read_secret_refuses_a_two_line_environment_variable_naming_it() -> None:
    with pytest.raises(SecurityError) as info:
        read_secret(file=None, env="TANDEM_TEST_KEY", what="api key",
                    environ={"TANDEM_TEST_KEY": f"{SECRET}\nsecond-line"})
    message = str(info.value)
    assert "TANDEM_TEST_KEY" in message and "a line break" in message and SECRET not in message
    assert read_secret(file=None, env="TANDEM_TEST_KEY", what="api key",
                       environ={"TANDEM_TEST_KEY": f" {SECRET}\n"}) == SECRET


@pytest.mark.parametrize("value", [f"Bearer {SECRET}", f"bearer {SECRET}", f"BEARER {SECRET}", f"bEaReR  {SECRET} ",
                                   f"bearer {SECRET}".encode()])
def test_bearer_scheme_is_case_insensitive(value: str | bytes) -> None:
    assert bearer_from((("authorization", value),)) == SECRET
    assert bearer_from({"Authorization": value}) == SECRET


@pytest.mark.parametrize("value", [f"Bearerx {SECRET}", f"Basic {SECRET}", SECRET, f"xbearer {SECRET}"])
def test_other_schemes_give_no_token(value: str) -> None:
    assert bearer_from((("authorization", value),)) is None
