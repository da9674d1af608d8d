"""`tandem.paths`: one root, chosen as documented, and a module light enough for any runtime.

The environment and HOME are replaced per test (monkeypatch), so nothing real is read or made.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tandem import paths


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("TANDEM_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "user"


def test_default_is_the_user_cache_folder(home: Path) -> None:
    assert paths.tandem_home() == (home / ".cache" / "tandem").resolve()
    assert paths.models_dir() == paths.tandem_home() / "models"
    assert paths.downloads_dir() == paths.tandem_home() / "downloads"
    assert not home.exists(), "asking for a path creates nothing"


def test_tandem_home_wins(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TANDEM_HOME", "~/elsewhere")
    assert paths.tandem_home() == (home / "elsewhere").resolve()


def test_xdg_cache_home_when_absolute(home: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.tandem_home() == (tmp_path / "xdg" / "tandem").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: ignore it
    assert paths.tandem_home() == (home / ".cache" / "tandem").resolve()


@pytest.mark.skipif(sys.platform != "linux", reason="the roots agree on Linux only, by design")
@pytest.mark.parametrize("xdg", [None, "/srv/cache", "relative/cache"])
def test_same_root_as_platformdirs_on_linux(home: Path, xdg: str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    platformdirs = pytest.importorskip("platformdirs")
    if xdg is not None:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert paths.tandem_home() == Path(platformdirs.user_cache_dir("tandem")).resolve()


def test_imports_only_the_standard_library() -> None:
    """Runtimes import this module: it must pull in no other Tandem module and nothing heavy."""
    tree = ast.parse(Path(paths.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert outside <= {"__future__"}, outside
