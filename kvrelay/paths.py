"""Where built artefacts live: outside git, under $KVRELAY_HOME (default ~/.cache/kvrelay)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("KVRELAY_HOME") or Path.home() / ".cache" / "kvrelay")


def family_dir(family: str) -> Path:
    return home() / "families" / family


def repo_root() -> Path:
    """The source checkout (profiles/, model_repository/ templates live there)."""
    return Path(__file__).resolve().parent.parent


def profiles_dir(configured: str | Path | None = None) -> Path:
    """The profiles directory: a deployment's or a command's own (`configured`), else the checkout's."""
    return Path(configured) if configured else repo_root() / "profiles"
