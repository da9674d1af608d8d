"""Where Tandem keeps its files.

Guarantees: every location derives from one root, `TANDEM_HOME` when set, else the user cache
folder (`~/.cache/tandem` on Linux). Nothing here creates folders on import.
"""

from __future__ import annotations

import os
from pathlib import Path


def tandem_home() -> Path:
    """The root folder for models, downloads and local data."""
    env = os.environ.get("TANDEM_HOME")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "tandem").resolve()


def models_dir() -> Path:
    return tandem_home() / "models"


def downloads_dir() -> Path:
    return tandem_home() / "downloads"
