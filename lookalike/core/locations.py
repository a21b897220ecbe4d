"""Where collections live and what marks a folder as one; importing it loads nothing else,
so the command line finds a collection (and a server of it) before loading the library."""

from __future__ import annotations

import os
from pathlib import Path

CATALOG_FILE = "catalog.sqlite"
# Names the catalog a collection folder uses when it is not the folder's own SQLite file.
CATALOG_LINK = "catalog.url"


def default_collection_dir(name: str = "default") -> Path:
    """Where a named collection lives: $LOOKALIKE_HOME/NAME, else ~/.local/share/lookalike/NAME."""
    home = os.environ.get("LOOKALIKE_HOME")
    if home:
        return Path(home) / name
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "lookalike" / name
