"""Where Tandem keeps its files.

Guarantees: every location derives from one root: `TANDEM_HOME` when set, else
`$XDG_CACHE_HOME/tandem` when XDG_CACHE_HOME is an absolute path (the XDG spec says to ignore a
relative one), else `~/.cache/tandem`, on every OS. On Linux this is what
`platformdirs.user_cache_dir("tandem")` gives; on macOS and Windows the root stays where the
README says rather than moving to the platform's cache folder. Nothing here creates folders, and
this module imports only the standard library (runtimes import it).
"""

from __future__ import annotations

import os
from pathlib import Path


def tandem_home() -> Path:
    """The root folder for models, downloads and local data."""
    env = os.environ.get("TANDEM_HOME")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return (base / "tandem").resolve()


def models_dir() -> Path:
    """Where the model folders live (see `tandem.models.registry`)."""
    return tandem_home() / "models"


def downloads_dir() -> Path:
    """Where fetched wheels and conversion scratch space live."""
    return tandem_home() / "downloads"
